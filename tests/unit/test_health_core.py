"""Health checks against real components: a PostgreSQL container, HTTP servers on 127.0.0.1, real files."""

import datetime as dt
import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from module_utils.crab_health import (
    BackupFreshnessCheck,
    CheckConfigError,
    ContainersCheck,
    DiskFreeCheck,
    HttpCheck,
    PostgresCheck,
    build_checks,
    notify_on_change,
    probe_main,
    prometheus_text,
    run_bounded,
    run_checks,
    state_document,
    summary,
)

PG_NAME = "crab-cl-unit-pg"
PORT = 28210


class Handler(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_GET(self):
        routes = {
            "/ok": (200, b'{"git": "abc123"}'),
            "/nokey": (200, b'{"version": 1}'),
            "/notjson": (200, b"hello"),
            "/fail": (500, b'{"error": "db down"}'),
        }
        if self.path == "/slow":
            time.sleep(3)
            status, body = 200, b'{"git": "x"}'
        else:
            status, body = routes.get(self.path, (404, b""))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        Handler.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{PORT}"
    server.shutdown()
    server.server_close()


def docker(*args, check=True):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture(scope="module")
def pg_container():
    """A real PostgreSQL 15 (the lab image), reached with docker exec like on the cloud host."""
    if docker("image", "inspect", "crab-lab/postgres:15", check=False).returncode != 0:
        raise RuntimeError("image crab-lab/postgres:15 is missing: run bash lab/lab.sh images first")
    docker("rm", "-f", PG_NAME, check=False)
    docker(
        "run",
        "-d",
        "--name",
        PG_NAME,
        "--network",
        "none",
        "-e",
        "POSTGRES_USER=crab",
        "-e",
        "POSTGRES_DB=crab",
        "-e",
        "POSTGRES_PASSWORD=unit-test-pw",
        "crab-lab/postgres:15",
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if PostgresCheck(container=PG_NAME, user="postgres", timeout=5).run()["ok"]:
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"{PG_NAME} did not accept queries within 90 s: {docker('logs', PG_NAME).stderr}")
    yield PG_NAME
    docker("rm", "-f", PG_NAME, check=False)


def test_postgres_ok_and_latency(pg_container):
    r = PostgresCheck(container=pg_container, user="postgres", timeout=5).run()
    assert r["ok"], r
    assert r["name"] == "postgres" and r["detail"] == "SELECT 1 -> 1"
    assert 0 < r["latency_ms"] < 5000


def test_postgres_password_over_tcp(pg_container):
    good = PostgresCheck(container=pg_container, user="crab", host="127.0.0.1", os_user="", password="unit-test-pw")
    assert good.run()["ok"]
    assert "PGPASSWORD" in good.argv() and "unit-test-pw" not in " ".join(good.argv())
    bad = PostgresCheck(container=pg_container, user="crab", host="127.0.0.1", os_user="", password="wrong").run()
    assert not bad["ok"] and "password authentication failed" in bad["detail"]


def test_postgres_wrong_expectation(pg_container):
    r = PostgresCheck(container=pg_container, user="postgres", query="SELECT 2", timeout=5).run()
    assert not r["ok"] and "expected '1'" in r["detail"]


def test_postgres_hung_gives_timeout_within_limit(pg_container):
    # SIGSTOP every process of the container from the host: the server hangs but docker exec still works
    pids = docker("top", pg_container, "-o", "pid").stdout.split()[1:]
    subprocess.run(["kill", "-STOP", *pids], check=True)
    try:
        start = time.monotonic()
        r = PostgresCheck(container=pg_container, user="postgres", timeout=2).run()
        took = time.monotonic() - start
    finally:
        subprocess.run(["kill", "-CONT", *pids], check=True)
    assert not r["ok"] and r["detail"].startswith("timeout:"), r
    assert took < 4, took


def test_postgres_paused_container(pg_container):
    docker("pause", pg_container)
    try:
        start = time.monotonic()
        r = PostgresCheck(container=pg_container, user="postgres", timeout=3).run()
    finally:
        docker("unpause", pg_container)
    assert not r["ok"] and r["detail"].startswith("timeout:") and time.monotonic() - start < 5


def test_postgres_stopped_container_fails_fast(pg_container):
    docker("stop", pg_container)
    try:
        start = time.monotonic()
        r = PostgresCheck(container=pg_container, user="postgres", timeout=5).run()
        took = time.monotonic() - start
    finally:
        docker("start", pg_container)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not PostgresCheck(container=pg_container, user="postgres").run()["ok"]:
            time.sleep(1)
    assert not r["ok"] and "is not running" in r["detail"], r
    assert took < 10


def test_postgres_missing_container():
    r = PostgresCheck(container="crab-cl-does-not-exist", timeout=5).run()
    assert not r["ok"] and "No such container" in r["detail"]


def test_http_checks(http_server):
    assert HttpCheck("api", f"{http_server}/ok", json_keys=["git"]).run()["ok"]
    assert HttpCheck("api", f"{http_server}/ok", json_equals={"git": "abc123"}).run()["ok"]
    r500 = HttpCheck("api", f"{http_server}/fail").run()
    assert not r500["ok"] and "HTTP 500" in r500["detail"]
    assert HttpCheck("api", f"{http_server}/fail", expect_status=500).run()["ok"]
    nokey = HttpCheck("api", f"{http_server}/nokey", json_keys=["git"]).run()
    assert not nokey["ok"] and "lacks git" in nokey["detail"]
    notjson = HttpCheck("api", f"{http_server}/notjson", json_keys=["git"]).run()
    assert not notjson["ok"] and "not JSON" in notjson["detail"]


def test_http_slow_is_a_timeout(http_server):
    start = time.monotonic()
    r = HttpCheck("api", f"{http_server}/slow", timeout=1).run()
    assert not r["ok"] and r["detail"].startswith("timeout:")
    assert time.monotonic() - start < 2.5


def test_http_refused():
    r = HttpCheck("api", "http://127.0.0.1:28299/health", timeout=2).run()
    assert not r["ok"] and "unreachable" in r["detail"]


def test_backup_freshness(tmp_path):
    state = tmp_path / "backup-state.json"
    missing = BackupFreshnessCheck(state_file=str(state)).run()
    assert not missing["ok"] and "no backup state file" in missing["detail"]
    now = dt.datetime.now(dt.UTC)
    state.write_text(json.dumps({"last_success": (now - dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")}))
    assert BackupFreshnessCheck(state_file=str(state), max_age_hours=26).run()["ok"]
    stale = BackupFreshnessCheck(state_file=str(state), max_age_hours=1).run()
    assert not stale["ok"] and "limit 1h" in stale["detail"]
    state.write_text("{not json")
    assert "cannot read" in BackupFreshnessCheck(state_file=str(state)).run()["detail"]
    state.write_text(json.dumps({"last_success": "yesterday"}))
    assert "no valid last_success" in BackupFreshnessCheck(state_file=str(state)).run()["detail"]


def test_disk_free(tmp_path):
    assert DiskFreeCheck(path=str(tmp_path), min_free_percent=0).run()["ok"]
    full = DiskFreeCheck(path=str(tmp_path), min_free_percent=100.1).run()
    assert not full["ok"] and "below" in full["detail"]
    assert DiskFreeCheck(path=str(tmp_path)).name == f"disk:{tmp_path}"
    assert "cannot stat" in DiskFreeCheck(path=str(tmp_path / "nope")).run()["detail"]


def test_containers_check(pg_container):
    proj = "crab-cl-unit-none"
    r = ContainersCheck(project=proj).run()
    assert not r["ok"] and "no containers" in r["detail"]


def test_run_checks_parallel_bounded(http_server):
    checks = [HttpCheck(f"slow{i}", f"{http_server}/slow", timeout=1) for i in range(3)]
    start = time.monotonic()
    results = run_checks(checks)
    assert time.monotonic() - start < 2.5
    assert [r["name"] for r in results] == ["slow0", "slow1", "slow2"]
    assert summary(results).startswith("failing: slow0")


def test_run_bounded_kills_group():
    start = time.monotonic()
    rc, _, _ = run_bounded(["sh", "-c", "sleep 30 & sleep 30"], 0.5)
    assert rc is None and time.monotonic() - start < 2


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ({"type": "ping"}, "unknown"),
        ({"type": "http", "name": "x", "url": "ftp://x"}, "not an http"),
        ({"type": "http", "name": "x", "url": "http://x", "bogus": 1}, "unexpected keyword"),
        ({"type": "postgres", "name": "p", "container": ""}, "container is empty"),
        ({"type": "disk", "name": "d", "timeout": "soon"}, "not a number"),
        ({"type": "disk", "name": "d", "timeout": 0}, "more than 0"),
        ({"type": "backup", "name": ""}, "no name"),
        ({"type": "disk", "name": "d", "min_free_percent": "ten"}, r"check d \(disk\): could not convert"),
        ({"type": "backup", "name": "b", "max_age_hours": "a day"}, r"check b \(backup\): could not convert"),
        ({"type": "http", "name": "a", "url": "http://x", "expect_status": "OK"}, r"check a \(http\): invalid"),
    ],
)
def test_build_checks_errors(spec, text):
    with pytest.raises(CheckConfigError, match=text):
        build_checks([spec])


def test_build_checks_duplicate_names():
    with pytest.raises(CheckConfigError, match="two checks are named d"):
        build_checks([{"type": "disk", "name": "d"}, {"type": "disk", "name": "d"}])


def test_prometheus_and_state():
    results = [{"name": "api", "type": "http", "ok": False, "latency_ms": 12.5, "detail": "HTTP 500"}]
    text = prometheus_text(results, now=1000)
    assert 'crab_health_check_ok{check="api",type="http"} 0' in text
    assert "crab_health_last_run_timestamp_seconds 1000" in text
    assert state_document(results)["failing"] == ["api"]


def test_webhook_only_on_change(http_server):
    Handler.received.clear()
    cur = {"ok": False, "failing": ["api"]}
    url = f"{http_server}/hook"
    assert notify_on_change({"failing": []}, cur, url) == "webhook HTTP 204"
    assert notify_on_change({"failing": ["api"]}, cur, url) is None
    assert Handler.received == [{"ok": False, "failing": ["api"], "previous_failing": []}]
    assert notify_on_change(None, cur, "") is None


def test_webhook_failure_does_not_reveal_the_url():
    # The webhook URL carries a token (it comes from the vault); failures end up in a world-readable state file.
    for url in ("hxxps://hc-ping.com/secret-uuid", "http://127.0.0.1:1/secret-uuid"):
        text = notify_on_change({"failing": []}, {"ok": False, "failing": ["api"]}, url, timeout=1)
        assert text.startswith("webhook ") and "failed" in text
        assert "secret-uuid" not in text


def test_probe_main_writes_state_and_textfile(tmp_path, http_server):
    cfg = tmp_path / "health.json"
    state = tmp_path / "state" / "health.json"
    prom = tmp_path / "text" / "crab_health.prom"
    cfg.write_text(
        json.dumps(
            {
                "checks": [
                    {"type": "http", "name": "api", "url": f"{http_server}/ok", "json_keys": ["git"]},
                    {"type": "backup", "name": "backup", "state_file": str(tmp_path / "none.json")},
                    {"type": "backup", "name": "off", "enabled": False},
                ],
                "state_file": str(state),
                "textfile": str(prom),
                "webhook_url": f"{http_server}/hook",
            }
        )
    )
    Handler.received.clear()
    assert probe_main(str(cfg)) == 1
    doc = json.loads(state.read_text())
    assert doc["failing"] == ["backup"] and [c["name"] for c in doc["checks"]] == ["api", "backup"]
    assert 'crab_health_check_ok{check="api",type="http"} 1' in prom.read_text()
    assert len(Handler.received) == 1
    assert probe_main(str(cfg)) == 1
    assert len(Handler.received) == 1, "no second alert while the state is unchanged"
    assert os.stat(state).st_mode & 0o777 == 0o644


def test_cli_template_runs_core(tmp_path):
    template = Path(__file__).resolve().parents[2] / "roles" / "healthcheck" / "templates" / "crab-health.j2"
    assert "from crab_health import probe_main" in template.read_text()
