"""The backup's alert hook against a real HTTP receiver on 127.0.0.1 (http.server in a thread): healthchecks-style
start/success/fail pings and the generic JSON webhook, and every way the hook itself can fail (HTTP 500, connection
refused, no answer within the timeout), none of which may fail or hide the backup's result or print the URL's secret
path."""

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from module_utils.crab_backup import Alerter, BackupConfig, BackupError, BackupRunner, read_state, redact_url
from tests.unit.test_backup_fixtures import BASE, DEAD_PORT, REPO, backup_cfg, pg_server, s3_server

# pytest finds fixtures by name in this module's namespace: these imports are how the tests get them.
FIXTURES = (backup_cfg, pg_server, s3_server)
HOOK_PORT = BASE + 9  # the last port of this session's block (PostgreSQL and SeaweedFS use BASE..BASE+8)
SECRET = "0f9c3a1e-7b2d-4c55-9e61-secretping"


class _Receiver(BaseHTTPRequestHandler):
    """/ok/... answers 200, /err/... 500, /slow/... answers 200 after 5 s; every request is recorded."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(
            {"path": self.path, "body": body, "type": self.headers.get("Content-Type"), "at": time.monotonic()}
        )
        if self.path.startswith("/slow/"):
            time.sleep(5)
        status = 500 if self.path.startswith("/err/") else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", HOOK_PORT), _Receiver)
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hook(receiver):
    receiver.requests.clear()
    base = f"http://127.0.0.1:{HOOK_PORT}"
    return {
        "ok": f"{base}/ok/{SECRET}",
        "err": f"{base}/err/{SECRET}",
        "slow": f"{base}/slow/{SECRET}",
        "dead": f"http://127.0.0.1:{DEAD_PORT}/ok/{SECRET}",
        "webhook": f"{base}/ok/hook?token={SECRET}",
        "requests": receiver.requests,
    }


def _no_secret(*texts) -> None:
    for text in texts:
        assert SECRET not in (text if isinstance(text, str) else json.dumps(text)), text


def test_success_pings_start_and_success_and_posts_json(backup_cfg, hook):
    cfg = replace(backup_cfg, alert_url=hook["ok"], alert_webhook_url=hook["webhook"])
    result = BackupRunner(cfg).run()
    paths = [r["path"] for r in hook["requests"]]
    assert paths == [
        f"/ok/{SECRET}/start",
        f"/ok/hook?token={SECRET}",
        f"/ok/{SECRET}",
        f"/ok/hook?token={SECRET}",
    ]
    start, success = json.loads(hook["requests"][1]["body"]), json.loads(hook["requests"][3]["body"])
    assert hook["requests"][3]["type"] == "application/json"
    assert start["event"] == "start" and start["status"] == "started" and start["job"] == "backup"
    assert success["event"] == "success" and success["status"] == "ok" and success["error"] is None
    assert (success["key"], success["size"], success["sha256"]) == (result.key, result.size, result.sha256)
    assert success["duration_s"] == result.duration_s > 0
    assert hook["requests"][2]["body"].decode().startswith(f"crab-backup: key={result.key} size={result.size}")
    assert [a["ok"] for a in result.alerts] == [True] * 4
    assert {a["url"] for a in result.alerts} == {f"http://127.0.0.1:{HOOK_PORT}/***"}
    assert read_state(cfg.state_file)["alert_errors"] == []
    _no_secret(result.alerts, read_state(cfg.state_file))


def test_failed_backup_pings_fail_with_the_error(backup_cfg, hook):
    cfg = replace(backup_cfg, db_password="wrong", alert_url=hook["ok"], alert_webhook_url=hook["webhook"])
    with pytest.raises(BackupError, match=r"^pg_dump of database crab") as err:
        BackupRunner(cfg).run()
    paths = [r["path"] for r in hook["requests"]]
    assert paths[0] == f"/ok/{SECRET}/start" and paths[2] == f"/ok/{SECRET}/fail"
    assert hook["requests"][2]["body"].decode() == f"crab-backup: {err.value}"
    fail = json.loads(hook["requests"][3]["body"])
    assert fail["event"] == "fail" and fail["status"] == "failed" and fail["error"] == str(err.value)
    assert fail["key"] is None and fail["duration_s"] > 0
    state = read_state(cfg.state_file)
    assert state["last_status"] == "failed" and state["error"] == str(err.value) and state["alert_errors"] == []


@pytest.mark.parametrize(
    ("kind", "error"),
    [("err", r"HTTP 500 Internal Server Error"), ("dead", r"ConnectionRefusedError"), ("slow", r"timed out|no answer")],
)
def test_hook_failure_never_fails_the_backup(backup_cfg, hook, kind, error):
    cfg = replace(backup_cfg, alert_url=hook[kind], alert_webhook_url=hook[kind], alert_timeout_s=1)
    started = time.monotonic()
    result = BackupRunner(cfg).run()
    elapsed = time.monotonic() - started
    assert result.key and len(result.alerts) == 4 and not any(a["ok"] for a in result.alerts)
    for alert in result.alerts:
        assert alert["duration_s"] <= 2.5, alert  # bounded by alert_timeout_s (+1 s hard stop)
        assert alert["error"], alert
    assert all(re.search(error, a["error"]) for a in result.alerts), result.alerts
    assert elapsed < result.duration_s + 4 * 2.5
    state = read_state(cfg.state_file)
    assert state["last_status"] == "ok" and state["key"] == result.key
    assert len(state["alert_errors"]) == 4 and state["alert_errors"][0].startswith("start alert to http://127.0.0.1")
    _no_secret(result.alerts, state)


def test_hook_failure_never_hides_a_failed_backup(backup_cfg, hook):
    plain = replace(backup_cfg, db_password="wrong")
    with pytest.raises(BackupError) as without_hook:
        BackupRunner(plain).run()
    cfg = replace(plain, alert_url=hook["err"], alert_webhook_url=hook["dead"], alert_timeout_s=1)
    runner = BackupRunner(cfg)
    with pytest.raises(BackupError) as with_hook:
        runner.run()
    assert str(with_hook.value) == str(without_hook.value)
    state = read_state(cfg.state_file)
    assert state["last_status"] == "failed" and state["error"] == str(with_hook.value)
    assert [r["event"] for r in runner.alerter.sent] == ["start", "start", "fail", "fail"]
    _no_secret(str(with_hook.value), state, runner.alerter.sent)


def test_cli_warns_about_the_hook_without_the_secret_and_exits_by_the_backup(backup_cfg, hook, tmp_path):
    conf = tmp_path / "backup.json"
    data = asdict(replace(backup_cfg, alert_url=hook["err"], alert_timeout_s=1))
    conf.write_text(json.dumps(data))
    conf.chmod(0o600)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "crab_backup.py").write_bytes((REPO / "module_utils" / "crab_backup.py").read_bytes())
    cli = [sys.executable, str(REPO / "roles" / "backup" / "files" / "crab-backup"), "--config", str(conf)]
    env = {"PATH": "/usr/bin:/bin", "CRAB_OPS_LIB": str(lib)}
    ok = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "crab-backup: ok s3://" in ok.stdout
    assert f"WARNING: success alert to http://127.0.0.1:{HOOK_PORT}/*** failed: HTTP 500" in ok.stderr
    data["db_password"] = "wrong"
    conf.write_text(json.dumps(data))
    bad = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED: pg_dump of database crab" in bad.stderr
    assert "WARNING: fail alert to" in bad.stderr
    _no_secret(ok.stdout, ok.stderr, bad.stdout, bad.stderr)
    assert [r["path"] for r in hook["requests"]][-1] == f"/err/{SECRET}/fail"


def test_alerter_without_urls_sends_nothing_and_urls_are_validated(backup_cfg):
    assert Alerter(backup_cfg).send("success", {"key": "k"}) == []
    assert redact_url(f"https://user:pw@hc-ping.com:8443/{SECRET}?x=1") == "https://hc-ping.com:8443/***"
    with pytest.raises(BackupError, match=r"^Invalid alert_url ftp://host/\*\*\*: use an http:// or https:// URL\.$"):
        BackupConfig(alert_url=f"ftp://host/{SECRET}").validate()
    with pytest.raises(BackupError, match=r"^Invalid alert_timeout_s 0"):
        BackupConfig(alert_timeout_s=0).validate()
