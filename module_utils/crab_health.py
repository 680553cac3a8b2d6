"""Health checks for the crab cloud host: PostgreSQL, HTTP, backup freshness, disk free, compose containers.

Every check has its own timeout and returns {name, ok, latency_ms, detail}; no check can hang the caller
(subprocesses are killed with their process group at the deadline, checks run in parallel threads).
The same file serves the crab_health module and the host's cron probe (/usr/local/sbin/crab-health), which
imports it from /usr/local/lib/crab-ops/. Standard library only; no Ansible import.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.parse

CHECK_TYPES = ("postgres", "http", "backup", "disk", "containers")


class CheckConfigError(ValueError):
    """A check's configuration is unusable; the message names the check and the field."""


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def run_bounded(argv: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, str]:
    """Run argv; at the deadline kill its whole process group. Returns (rc or None on timeout, out, err)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out or "", err or ""


def http_request(method: str, url: str, body: bytes | None, timeout: float, validate_certs: bool = True):
    """One HTTP(S) request with a socket timeout; returns (status, first 64 KiB of the body)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError(f"{url!r} is not an http(s) URL")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        if not validate_certs:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    try:
        headers = {"User-Agent": "crab-health"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(65536)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} took longer than {timeout:g}s")
        return resp.status, data
    finally:
        conn.close()


class Check:
    """Base: subclasses implement probe() returning (ok, detail) and may raise; run() times and wraps it."""

    kind = "check"

    def __init__(self, name: str, timeout: float = 5.0):
        if not name:
            raise CheckConfigError(f"a {self.kind} check has no name; give every check a name")
        try:
            self.timeout = float(timeout)
        except (TypeError, ValueError):
            raise CheckConfigError(f"check {name}: timeout {timeout!r} is not a number of seconds") from None
        if self.timeout <= 0:
            raise CheckConfigError(f"check {name}: timeout must be more than 0 seconds")
        self.name = name

    def probe(self) -> tuple[bool, str]:
        raise NotImplementedError

    def run(self) -> dict:
        start = time.monotonic()
        try:
            ok, detail = self.probe()
        except Exception as exc:  # a check must report, never raise
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        return {"name": self.name, "type": self.kind, "ok": bool(ok), "latency_ms": _ms(start), "detail": detail}


class PostgresCheck(Check):
    """`SELECT 1` through the container with psql (docker exec), bounded by connect/statement/overall timeouts."""

    kind = "postgres"

    def __init__(
        self,
        name: str = "postgres",
        container: str = "crab-postgres",
        database: str = "crab",
        user: str = "crab",
        host: str = "",
        os_user: str = "postgres",
        password: str | None = None,
        query: str = "SELECT 1",
        expect: str = "1",
        timeout: float = 5.0,
        docker: str = "docker",
    ):
        super().__init__(name, timeout)
        if not container:
            raise CheckConfigError(f"check {name}: container is empty; name the PostgreSQL container")
        self.container, self.database, self.user, self.host = container, database, user, host
        self.os_user, self.password, self.query, self.expect, self.docker = os_user, password, query, expect, docker

    def argv(self) -> list[str]:
        connect = max(1, int(self.timeout / 2))
        stmt_ms = max(100, int(self.timeout * 1000 / 2))
        argv = [
            self.docker,
            "exec",
            "-e",
            f"PGCONNECT_TIMEOUT={connect}",
            "-e",
            f"PGOPTIONS=-c statement_timeout={stmt_ms}",
        ]
        if self.password:
            argv += ["-e", "PGPASSWORD"]  # value taken from our environment, never on a command line
        if self.os_user:
            argv += ["-u", self.os_user]
        argv += [
            self.container,
            "psql",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.database,
            "-U",
            self.user,
        ]
        if self.host:
            argv += ["-h", self.host]
        return [*argv, "-c", self.query]

    def probe(self) -> tuple[bool, str]:
        if shutil.which(self.docker) is None and not os.path.isabs(self.docker):
            return False, f"{self.docker} CLI not found on this host; install the docker CLI"
        env = dict(os.environ)
        if self.password:
            env["PGPASSWORD"] = self.password
        rc, out, err = run_bounded(self.argv(), self.timeout, env)
        if rc is None:
            return False, f"timeout: no answer from {self.container} within {self.timeout:g}s (hung or paused?)"
        if rc != 0 and "is paused" in err:
            return False, f"timeout: {self.container} is paused and cannot answer (docker unpause {self.container})"
        if rc != 0 and ("timeout expired" in err or "statement timeout" in err):
            return False, f"timeout: {self.container} did not answer {self.query} in time ({err.strip()})"
        if rc != 0:
            msg = (err or out).strip().splitlines()
            return False, f"{self.query} failed in {self.container} (rc {rc}): {msg[-1] if msg else 'no output'}"
        got = out.strip()
        if self.expect is not None and got != self.expect:
            return False, f"{self.query} returned {got!r}, expected {self.expect!r}"
        return True, f"{self.query} -> {got}"


class HttpCheck(Check):
    """GET a URL: expected status, optional JSON keys present (and optional exact values)."""

    kind = "http"

    def __init__(
        self,
        name: str = "http",
        url: str = "",
        expect_status: int = 200,
        json_keys: list | None = None,
        json_equals: dict | None = None,
        validate_certs: bool = True,
        timeout: float = 5.0,
    ):
        super().__init__(name, timeout)
        if not url.startswith(("http://", "https://")):
            raise CheckConfigError(f"check {name}: url {url!r} is not an http(s) URL")
        self.url, self.expect_status = url, int(expect_status)
        self.json_keys, self.json_equals = list(json_keys or []), dict(json_equals or {})
        self.validate_certs = validate_certs

    def probe(self) -> tuple[bool, str]:
        try:
            status, body = http_request("GET", self.url, None, self.timeout, self.validate_certs)
        except TimeoutError:
            return False, f"timeout: {self.url} did not answer within {self.timeout:g}s"
        except OSError as exc:
            return False, f"{self.url} unreachable: {exc}"
        if status != self.expect_status:
            return False, f"{self.url} returned HTTP {status}, expected {self.expect_status}"
        if self.json_keys or self.json_equals:
            try:
                data = json.loads(body)
            except ValueError:
                return False, f"{self.url} returned HTTP {status} but not JSON"
            if not isinstance(data, dict):
                return False, f"{self.url} returned JSON that is not an object"
            missing = [k for k in self.json_keys if k not in data]
            if missing:
                return False, f"{self.url} JSON lacks {', '.join(missing)}"
            wrong = [k for k, v in self.json_equals.items() if data.get(k) != v]
            if wrong:
                return False, f"{self.url} JSON has unexpected {', '.join(f'{k}={data.get(k)!r}' for k in wrong)}"
        return True, f"HTTP {status}"


def parse_time(text) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


class BackupFreshnessCheck(Check):
    """The backup state file's `last_success` is younger than max_age_hours. A missing file fails."""

    kind = "backup"

    def __init__(
        self,
        name: str = "backup",
        state_file: str = "/var/lib/crab-ops/backup-state.json",
        max_age_hours: float = 26,
        timeout: float = 2.0,
        now=None,
    ):
        super().__init__(name, timeout)
        self.state_file, self.max_age_hours, self.now = state_file, float(max_age_hours), now

    def probe(self) -> tuple[bool, str]:
        try:
            with open(self.state_file, encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return False, f"no backup state file {self.state_file}: no backup has ever succeeded here"
        except (OSError, ValueError) as exc:
            return False, f"cannot read backup state {self.state_file}: {exc}"
        last = parse_time(state.get("last_success") if isinstance(state, dict) else None)
        if last is None:
            return False, f"{self.state_file} has no valid last_success time"
        now = self.now or dt.datetime.now(dt.UTC)
        age_h = (now - last).total_seconds() / 3600
        if age_h < -0.1:
            return False, f"last_success {state['last_success']} is in the future; check the clock"
        if age_h > self.max_age_hours:
            return False, f"last backup {age_h:.1f}h ago ({state['last_success']}), limit {self.max_age_hours:g}h"
        return True, f"last backup {age_h:.1f}h ago"


class DiskFreeCheck(Check):
    """Free space on a path is at least min_free_percent and min_free_mb."""

    kind = "disk"

    def __init__(
        self, name: str = "", path: str = "/", min_free_percent: float = 10, min_free_mb: float = 0, timeout=2.0
    ):
        super().__init__(name or f"disk:{path}", timeout)
        self.path, self.min_free_percent, self.min_free_mb = path, float(min_free_percent), float(min_free_mb)

    def probe(self) -> tuple[bool, str]:
        try:
            usage = shutil.disk_usage(self.path)
        except OSError as exc:
            return False, f"cannot stat {self.path}: {exc.strerror}"
        pct = 100.0 * usage.free / usage.total if usage.total else 0.0
        mb = usage.free / 1048576
        detail = f"{self.path}: {mb:.0f} MB free ({pct:.1f}%)"
        if pct < self.min_free_percent or mb < self.min_free_mb:
            return False, f"{detail}, below {self.min_free_percent:g}% / {self.min_free_mb:g} MB"
        return True, detail


class ContainersCheck(Check):
    """Every container of a compose project runs, is healthy when it has a healthcheck, restarts seldom."""

    kind = "containers"

    def __init__(self, name="containers", project="crab", max_restarts=5, timeout=5.0, docker="docker"):
        super().__init__(name, timeout)
        self.project, self.max_restarts, self.docker = project, int(max_restarts), docker

    def probe(self) -> tuple[bool, str]:
        rc, out, err = run_bounded(
            [self.docker, "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"], self.timeout
        )
        if rc is None:
            return False, f"timeout: docker did not answer within {self.timeout:g}s"
        if rc != 0:
            return False, f"docker ps failed: {err.strip()}"
        ids = out.split()
        if not ids:
            return False, f"project {self.project} has no containers"
        fmt = (
            "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.RestartCount}}"
        )
        rc, out, err = run_bounded([self.docker, "inspect", "-f", fmt, *ids], self.timeout)
        if rc is None:
            return False, f"timeout: docker inspect did not answer within {self.timeout:g}s"
        if rc != 0:
            return False, f"docker inspect failed: {err.strip()}"
        bad = []
        for line in out.strip().splitlines():
            cname, status, health, restarts = line.split()
            if status != "running" or health not in ("-", "healthy") or int(restarts) > self.max_restarts:
                bad.append(f"{cname.lstrip('/')} {status}/{health}/restarts={restarts}")
        if bad:
            return False, "; ".join(bad)
        return True, f"{len(ids)} containers running"


_FACTORIES = {
    "postgres": PostgresCheck,
    "http": HttpCheck,
    "backup": BackupFreshnessCheck,
    "disk": DiskFreeCheck,
    "containers": ContainersCheck,
}


def build_checks(specs: list[dict]) -> list[Check]:
    """Check objects from config dicts ({type, name, ...options}); unknown fields are errors."""
    checks, names = [], set()
    for spec in specs:
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind not in _FACTORIES:
            raise CheckConfigError(f"check type {kind!r} is unknown; use one of {', '.join(CHECK_TYPES)}")
        spec.pop("enabled", None)
        try:
            check = _FACTORIES[kind](**spec)
        except CheckConfigError:
            raise
        except (TypeError, ValueError) as exc:
            # unknown field, or a number field (min_free_percent, max_age_hours, expect_status, ...) not a number
            raise CheckConfigError(f"check {spec.get('name', kind)} ({kind}): {exc}; fix that field") from None
        if check.name in names:
            raise CheckConfigError(f"two checks are named {check.name}; give each check its own name")
        names.add(check.name)
        checks.append(check)
    return checks


def run_checks(checks: list[Check]) -> list[dict]:
    """All checks in parallel; total time is bounded by the slowest check's own timeout."""
    if not checks:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(checks)) as pool:
        return list(pool.map(lambda c: c.run(), checks))


def summary(results: list[dict]) -> str:
    failing = [r for r in results if not r["ok"]]
    if not failing:
        return f"all {len(results)} health checks pass"
    return "failing: " + "; ".join(f"{r['name']} ({r['detail']})" for r in failing)


def prometheus_text(results: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        "# HELP crab_health_check_ok 1 when the crab health check passes.",
        "# TYPE crab_health_check_ok gauge",
    ]
    lines += [f'crab_health_check_ok{{check="{r["name"]}",type="{r.get("type", "")}"}} {int(r["ok"])}' for r in results]
    lines += [
        "# HELP crab_health_check_latency_ms Check latency in milliseconds.",
        "# TYPE crab_health_check_latency_ms gauge",
    ]
    lines += [f'crab_health_check_latency_ms{{check="{r["name"]}"}} {r["latency_ms"]}' for r in results]
    lines += [
        "# HELP crab_health_last_run_timestamp_seconds When the probe last ran.",
        "# TYPE crab_health_last_run_timestamp_seconds gauge",
    ]
    lines.append(f"crab_health_last_run_timestamp_seconds {now:.0f}")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".crab-health-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_document(results: list[dict]) -> dict:
    return {
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ok": all(r["ok"] for r in results),
        "failing": [r["name"] for r in results if not r["ok"]],
        "checks": results,
    }


def notify_on_change(previous: dict | None, current: dict, url: str, timeout: float = 5.0) -> str | None:
    """POST the state to a webhook when the set of failing checks changed; returns what happened."""
    if not url:
        return None
    before = sorted(previous.get("failing", [])) if isinstance(previous, dict) else None
    if before == sorted(current["failing"]):
        return None
    body = json.dumps({"ok": current["ok"], "failing": current["failing"], "previous_failing": before}).encode()
    try:
        status, _ = http_request("POST", url, body, timeout)
    except OSError as exc:
        # The URL is a secret (it carries the alert token) and this text lands in the 0644 state file and the log.
        parts = urllib.parse.urlsplit(url)
        shown = f"{parts.scheme}://{parts.hostname}/..." if parts.hostname else "<webhook_url>"
        return f"webhook {shown} failed: {str(exc).replace(url, shown)}; check healthcheck_webhook_url"
    return f"webhook HTTP {status}"


def probe_main(config_path: str) -> int:
    """The cron probe: run the configured checks, write JSON state and the Prometheus textfile, alert on change."""
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    checks = build_checks([c for c in config.get("checks", []) if c.get("enabled", True)])
    results = run_checks(checks)
    state = state_document(results)
    state_file = config.get("state_file", "/var/lib/crab-ops/health.json")
    previous = None
    try:
        with open(state_file, encoding="utf-8") as fh:
            previous = json.load(fh)
    except (OSError, ValueError):
        previous = None
    hook = notify_on_change(previous, state, config.get("webhook_url", ""))
    if hook:
        state["webhook"] = hook
    write_atomic(state_file, json.dumps(state, indent=2) + "\n", 0o644)
    if config.get("textfile"):
        write_atomic(config["textfile"], prometheus_text(results), 0o644)
    print(summary(results))
    return 0 if state["ok"] else 1
