"""main() of crab_health with patched args: pass, fail naming checks, report_only, bad config."""

import http.server
import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

import module_utils.crab_health as crab_health

REPO = Path(__file__).resolve().parents[2]
basic._ANSIBLE_PROFILE = "legacy"
sys.modules.setdefault("ansible.module_utils.crab_health", crab_health)
_spec = importlib.util.spec_from_file_location("crab_health_module", REPO / "library" / "crab_health.py")
module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module)
PORT = 28211


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200 if self.path == "/health" else 500
        body = b'{"git": "abc"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{PORT}"
    srv.shutdown()
    srv.server_close()


def run(args: dict, capsys, check_mode=False) -> dict:
    with patch_module_args(dict(args, _ansible_check_mode=check_mode)), pytest.raises(SystemExit):
        module.main()
    return json.loads(capsys.readouterr().out)


def test_all_pass(server, tmp_path, capsys):
    checks = [
        {"type": "http", "name": "api", "url": f"{server}/health", "json_keys": ["git"]},
        {"type": "disk", "path": str(tmp_path), "min_free_percent": 0},
        {"type": "backup", "name": "backup", "enabled": False},
    ]
    out = run({"checks": checks}, capsys, check_mode=True)
    assert out.get("failed") is not True and out["changed"] is False
    assert [r["name"] for r in out["results"]] == ["api", f"disk:{tmp_path}"]
    assert out["summary"] == "all 2 health checks pass"


def test_fails_naming_every_failing_check(server, tmp_path, capsys):
    checks = [
        {"type": "http", "name": "api", "url": f"{server}/broken"},
        {"type": "backup", "name": "backup", "state_file": str(tmp_path / "none.json")},
        {"type": "disk", "name": "scratch-disk", "path": str(tmp_path), "min_free_percent": 0},
    ]
    out = run({"checks": checks}, capsys)
    assert out["failed"] is True and out["failing"] == ["api", "backup"]
    assert "api (" in out["msg"] and "backup (" in out["msg"] and "scratch-disk" not in out["msg"]
    out = run({"checks": checks, "report_only": True}, capsys)
    assert out.get("failed") is not True and out["failing"] == ["api", "backup"]


def test_bad_config(capsys):
    out = run({"checks": [{"type": "ping", "name": "x"}]}, capsys)
    assert out["failed"] is True and out["msg"].startswith("Cannot run the health checks: check type 'ping'")


def test_password_is_masked(capsys):
    checks = [{"type": "postgres", "name": "pg", "container": "crab-cl-none", "password": "s3cret-pw", "timeout": 3}]
    out = run({"checks": checks, "report_only": True}, capsys)
    assert "s3cret-pw" not in json.dumps(out)
