"""PostgreSQL backups to S3 that fail loudly: dump, compress, verify, upload, verify again, retain, restore, drill.

Plain Python, no Ansible import: the Ansible modules (library/crab_backup.py, library/crab_restore.py), the cron
CLI (/usr/local/sbin/crab-backup, see ``cli_main``) and pytest all run this same code.

Pipeline of one backup (every stage judged by its exit code, never by stderr text):

    docker exec -i -e PGPASSWORD <container> pg_dump -h 127.0.0.1 -Fc -Z0  (no TTY; password via env, not argv)
      | zstd -3 (or gzip -6)              SHA-256 + size computed while streaming into <local_dir>/<name>.partial
    zstd -dc <partial> | pg_restore -f /dev/null     (reads every byte: catches truncation, --list would not)
    rename <name>.partial -> <name>                  (only a verified archive gets a final-looking name)
    boto3 upload to the final key (S3 PUT / CompleteMultipartUpload is atomic: no partial object ever shows),
    then head_object: size, sha256 metadata and (when S3 computes it from content) the MD5 ETag must match.
    retention: only after all of that succeeded.

boto3 is imported lazily so that argument parsing and check mode work on hosts that lack it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field, fields

CHUNK = 1024 * 1024
MIB = 1024 * 1024
# S3 allows at most 10,000 parts per multipart upload; stay below it with room to spare.
S3_MAX_PARTS = 9000
S3_MIN_PART = 8 * MIB
# Directories searched for tools besides $PATH: cron runs jobs with PATH=/usr/bin:/bin only.
TOOL_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
TIMESTAMP_FMT = "%Y%m%dT%H%M%SZ"
EXTENSIONS = {"zstd": ".dump.zst", "gzip": ".dump.gz"}


class BackupError(Exception):
    """A failure with an operator-grade, one-sentence message (what failed, for which input, why, what to do)."""


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BackupConfig:
    """Everything one backup/restore run needs. Field names are the module options and the cron JSON keys."""

    db_name: str = "crab"
    db_user: str = "crab"
    db_password: str | None = None
    # Container that runs PostgreSQL; empty means the PostgreSQL client tools run on this host directly.
    container: str | None = "crab-postgres"
    db_host: str = "127.0.0.1"
    db_port: int = 5432
    # Superuser reached without a password for CREATE/DROP DATABASE (container: `docker exec -u postgres`,
    # local socket peer auth). admin_host is the socket dir or host for the local (no container) case.
    admin_user: str = "postgres"
    admin_host: str | None = None
    bucket: str = "crab-backups"
    prefix: str = "pg/"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    sse: str = "AES256"
    sse_kms_key_id: str | None = None
    local_dir: str = "/var/backups/crab"
    state_file: str = "/var/lib/crab-ops/backup-state.json"
    name: str = "crab"
    compressor: str = "auto"
    compress_level: int = 3
    keep_local: int = 3
    keep_remote: int = 14
    # Tiers on top of keep_*: the newest backup of each of the last N days / ISO weeks / months (0: tier off).
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    # Whether the tiers also apply to the local copies (by default locally only the newest keep_local stay).
    keep_local_tiers: bool = False
    lock_wait_s: float = 0
    # pg_dump gives up (and the run fails loudly) when a table stays locked exclusively this long; 0 waits forever.
    dump_lock_timeout_s: int = 600
    s3_connect_timeout_s: int = 5
    s3_max_attempts: int = 3
    docker: str = "docker"
    # Alert hook (see Alerter): a healthchecks.io-style ping URL and/or a generic JSON webhook. Both are secrets.
    alert_url: str | None = None
    alert_webhook_url: str | None = None
    alert_timeout_s: float = 10

    SECRET_FIELDS = ("db_password", "access_key", "secret_key", "alert_url", "alert_webhook_url")

    @classmethod
    def from_dict(cls, data: dict) -> BackupConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BackupError(
                f"Cannot read the backup configuration: unknown key(s) {', '.join(unknown)}. "
                f"Use only: {', '.join(sorted(known))}."
            )
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.compressor not in ("auto", "zstd", "gzip"):
            raise BackupError(f"Invalid compressor {self.compressor!r}: use auto, zstd or gzip.")
        if self.sse not in ("AES256", "aws:kms", "none"):
            raise BackupError(f"Invalid sse {self.sse!r}: use AES256, aws:kms or none.")
        if not self.bucket:
            raise BackupError("Invalid bucket '': set backup_s3_bucket to the S3 bucket that holds the backups.")
        if self.dump_lock_timeout_s < 0:
            raise BackupError(
                f"Invalid dump_lock_timeout_s {self.dump_lock_timeout_s}: use 0 (wait forever) or more seconds."
            )
        if self.prefix and not self.prefix.endswith("/"):
            raise BackupError(f"Invalid prefix {self.prefix!r}: it must end with '/', for example 'pg/'.")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise BackupError(f"Invalid backup name {self.name!r}: use letters, digits, '_', '.' or '-' only.")
        if self.keep_local < 1 or self.keep_remote < 1:
            raise BackupError(
                "Invalid retention: keep_local and keep_remote must be at least 1 (the newest good backup)."
            )
        for opt in ("alert_url", "alert_webhook_url"):
            url = getattr(self, opt)
            if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise BackupError(f"Invalid {opt} {redact_url(url)}: use an http:// or https:// URL.")
        if self.alert_timeout_s <= 0:
            raise BackupError(f"Invalid alert_timeout_s {self.alert_timeout_s}: use a positive number of seconds.")
        for opt in ("keep_daily", "keep_weekly", "keep_monthly"):
            if getattr(self, opt) < 0:
                raise BackupError(f"Invalid {opt} {getattr(self, opt)}: use 0 (tier off) or a positive count.")
        if bool(self.access_key) != bool(self.secret_key):
            raise BackupError("Invalid S3 credentials: set both access_key and secret_key, or neither (instance role).")

    def public(self) -> dict:
        """The configuration without secrets (for results and logs)."""
        data = asdict(self)
        for key in self.SECRET_FIELDS:
            if data.get(key):
                data[key] = "********"
        return data


# --------------------------------------------------------------------------------------------------------------
# Names and retention
# --------------------------------------------------------------------------------------------------------------
def backup_filename(name: str, when: dt.datetime, compressor: str) -> str:
    return f"{name}-{when.strftime(TIMESTAMP_FMT)}{EXTENSIONS[compressor]}"


def name_pattern(name: str) -> re.Pattern:
    """Only files/keys matching this are ours: retention never touches anything else."""
    return re.compile(rf"^{re.escape(name)}-(\d{{8}}T\d{{6}}Z)\.dump\.(zst|gz)$")


def parse_backup_name(name: str, basename: str) -> dt.datetime | None:
    match = name_pattern(name).match(basename)
    if not match:
        return None
    return dt.datetime.strptime(match.group(1), TIMESTAMP_FMT).replace(tzinfo=dt.UTC)


@dataclass
class RetentionPolicy:
    """Which backups to keep. ``last`` newest always; the tiers keep the newest backup of each of the most recent
    N days / ISO weeks / months (issue 3's 7/4/6). The newest backup is always kept, whatever the numbers."""

    last: int = 3
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def keep(self, items: list[tuple[str, dt.datetime]]) -> set[str]:
        ordered = sorted(items, key=lambda it: (it[1], it[0]), reverse=True)
        keep = {ident for ident, _ in ordered[: max(self.last, 1)]}
        for count, bucket_of in (
            (self.daily, lambda t: t.date()),
            (self.weekly, lambda t: t.isocalendar()[:2]),
            (self.monthly, lambda t: (t.year, t.month)),
        ):
            seen: list = []
            for ident, when in ordered:
                bucket = bucket_of(when)
                if bucket in seen:
                    continue
                if len(seen) >= count:
                    break
                seen.append(bucket)
                keep.add(ident)
        return keep

    def plan(self, items: list[tuple[str, dt.datetime]]) -> list[str]:
        """Identifiers to delete, oldest first."""
        keep = self.keep(items)
        return [ident for ident, when in sorted(items, key=lambda it: it[1]) if ident not in keep]


# --------------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------------
def find_tool(name: str) -> str:
    """Absolute path of a tool, searching $PATH and the usual sbin/bin dirs (cron's PATH is /usr/bin:/bin)."""
    if os.path.isabs(name):
        if os.access(name, os.X_OK):
            return name
        raise BackupError(f"Cannot run {name}: it is missing or not executable. Install it or fix the path.")
    search = os.pathsep.join([os.environ.get("PATH", ""), *TOOL_DIRS])
    found = shutil.which(name, path=search)
    if not found:
        raise BackupError(f"Cannot find the tool {name!r} on this host. Install it (Debian package: {_pkg(name)}).")
    return found


def _pkg(tool: str) -> str:
    return {
        "zstd": "zstd",
        "gzip": "gzip",
        "pg_restore": "postgresql-client",
        "pg_dump": "postgresql-client",
        "psql": "postgresql-client",
        "docker": "docker.io",
    }.get(tool, tool)


def _tool_env(password: str | None) -> dict:
    """A minimal, predictable environment: works the same from Ansible, a shell, or cron's bare env."""
    env = {
        "PATH": os.pathsep.join(TOOL_DIRS),
        "LC_ALL": "C",
        "HOME": os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir,
    }
    if password is not None:
        env["PGPASSWORD"] = password
    return env


def _stderr_tail(data: bytes, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace").strip().replace("\n", " | ")
    return text[-limit:] if text else "no error output"


class _StderrReader(threading.Thread):
    """Drains a process's stderr so it never blocks on a full pipe; keeps the last 64 KiB for messages."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.data = b""

    def run(self):
        while True:
            chunk = self.stream.read(8192)
            if not chunk:
                break
            self.data = (self.data + chunk)[-65536:]


class PgClient:
    """Builds argv for PostgreSQL client tools run inside the DB container (docker exec, no TTY) or on this host."""

    def __init__(self, cfg: BackupConfig):
        self.cfg = cfg

    def _wrap(self, argv: list[str], admin: bool = False) -> list[str]:
        if self.cfg.container:
            cmd = [find_tool(self.cfg.docker), "exec", "-i"]
            if admin:
                cmd += ["-u", "postgres"]
            else:
                # `-e NAME` without a value copies it from our environment: the password is never in argv.
                cmd += ["-e", "PGPASSWORD"]
            return [*cmd, self.cfg.container, *argv]
        return [find_tool(argv[0]), *argv[1:]]

    def user_conn(self, dbname: str) -> list[str]:
        return ["-h", self.cfg.db_host, "-p", str(self.cfg.db_port), "-U", self.cfg.db_user, "-d", dbname]

    def admin_conn(self, dbname: str = "postgres") -> list[str]:
        args = ["-U", self.cfg.admin_user, "-d", dbname]
        if self.cfg.admin_host:
            args = ["-h", self.cfg.admin_host, "-p", str(self.cfg.db_port), *args]
        return args

    def dump_argv(self) -> list[str]:
        argv = ["pg_dump", *self.user_conn(self.cfg.db_name), "-Fc", "-Z0", "--no-password"]
        if self.cfg.dump_lock_timeout_s > 0:
            argv.append(f"--lock-wait-timeout={self.cfg.dump_lock_timeout_s}s")
        return self._wrap(argv)

    def restore_argv(self, dbname: str, no_owner: bool = False) -> list[str]:
        argv = ["pg_restore", *self.user_conn(dbname), "--exit-on-error", "--no-password"]
        if no_owner:
            argv += ["--no-owner", "--no-acl"]
        return self._wrap(argv)

    def psql(
        self,
        sql: str,
        dbname: str | None = None,
        admin: bool = False,
        timeout: float = 600,
        variables: dict | None = None,
    ) -> str:
        conn = self.admin_conn(dbname or "postgres") if admin else self.user_conn(dbname or self.cfg.db_name)
        opts = ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-F", "\t"]
        for name, value in (variables or {}).items():
            opts += ["-v", f"{name}={value}"]
        argv = self._wrap(["psql", *conn, *opts], admin=admin)
        env = _tool_env(None if admin else self.cfg.db_password)
        try:
            proc = subprocess.run(argv, input=sql.encode(), capture_output=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackupError(
                f"psql on database {dbname} timed out after {timeout:.0f}s. Check that PostgreSQL responds."
            ) from exc
        if proc.returncode != 0:
            where = (
                f"container {self.cfg.container}" if self.cfg.container else f"{self.cfg.db_host}:{self.cfg.db_port}"
            )
            raise BackupError(
                f"psql on database {dbname or self.cfg.db_name} ({where}) exited {proc.returncode}: "
                f"{_stderr_tail(proc.stderr)}. Check that PostgreSQL runs and the credentials are right."
            )
        return proc.stdout.decode()


# --------------------------------------------------------------------------------------------------------------
# Files, lock, state
# --------------------------------------------------------------------------------------------------------------
def ensure_private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


class RunLock:
    """An flock on <local_dir>/.lock: two runs never write at once. The second waits lock_wait_s, then fails."""

    def __init__(self, path: str, wait_s: float = 0):
        self.path = path
        self.wait_s = wait_s
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        ensure_private_dir(os.path.dirname(self.path))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(self.fd)
                    self.fd = None
                    raise BackupError(
                        f"Another backup or restore holds {self.path} (pid {holder}); this run did nothing. "
                        "Wait for it to finish or raise lock_wait_s."
                    ) from None
                time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def read_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BackupError(f"Cannot read the backup state file {path}: {exc}. Fix or remove it.") from exc
    return data if isinstance(data, dict) else {}


def write_state(path: str, state: dict) -> None:
    """Atomic write (temp file + rename), 0600."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def iso(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def fresh_backup(state: dict, max_age_hours: float, now: dt.datetime | None = None) -> bool:
    """True when the state shows a successful backup younger than max_age_hours (0 or less: never fresh)."""
    if max_age_hours <= 0:
        return False
    last = parse_iso(state.get("last_success"))
    if last is None:
        return False
    age = (now or utcnow()) - last
    return dt.timedelta(0) <= age < dt.timedelta(hours=max_age_hours)


# --------------------------------------------------------------------------------------------------------------
# Alert hook
# --------------------------------------------------------------------------------------------------------------
def redact_url(url: str | None) -> str:
    """scheme://host[:port]/*** : the path (a healthchecks UUID), query and userinfo of a ping URL are its secret."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ":?"
    return f"{parts.scheme}://{host}{port}/***"


class Alerter:
    """Tells the outside world about a job's start, success and failure.

    ``alert_url`` is healthchecks.io style: POST ``<url>/start``, ``<url>`` (success, body = summary line) and
    ``<url>/fail`` (body = the error). ``alert_webhook_url`` gets a POST of JSON ``{"event", "status", "job",
    "host", "time", "key", "size", "sha256", "duration_s", "error"}``. A hook never fails or hides the job's result:
    each request is bounded by ``alert_timeout_s`` (a hard wall-clock bound, also against a server that trickles
    bytes), its failure is returned and recorded, and messages name only scheme://host:port/*** of the URL."""

    def __init__(self, cfg: BackupConfig, job: str = "backup"):
        self.cfg = cfg
        self.job = job
        self.sent: list[dict] = []

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.alert_url or self.cfg.alert_webhook_url)

    def _post(self, url: str, body: bytes, content_type: str) -> None:
        """One POST with http.client: only http/https, no proxy from the environment, no redirects followed."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=self.cfg.alert_timeout_s)
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=self.cfg.alert_timeout_s)
        else:
            raise ValueError(f"unsupported scheme {parts.scheme!r}")
        headers = {"Content-Type": content_type, "User-Agent": f"crab-ops-{self.job}"}
        if parts.username:
            token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            response.read(65536)
        finally:
            conn.close()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"HTTP {response.status} {response.reason}")

    def _deliver(self, target: str, url: str, body: bytes, content_type: str) -> dict:
        outcome: dict = {}

        def attempt() -> None:
            try:
                self._post(url, body, content_type)
                outcome["ok"] = True
            except RuntimeError as exc:
                outcome["error"] = str(exc)
            except OSError as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
            except Exception as exc:  # any failure of the hook is reported, never raised
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        worker = threading.Thread(target=attempt, daemon=True)
        started = time.monotonic()
        worker.start()
        # urllib's timeout bounds each socket operation; the join bounds the whole request.
        worker.join(self.cfg.alert_timeout_s + 1)
        record = {"target": target, "url": redact_url(url), "ok": bool(outcome.get("ok"))}
        if worker.is_alive():
            record["error"] = f"no answer within {self.cfg.alert_timeout_s:g}s"
        elif not record["ok"]:
            # Scrub the URL and its secret path from whatever the library said.
            text = str(outcome.get("error", "unknown error"))
            path = urllib.parse.urlsplit(url).path
            for secret in (url, path if len(path) > 1 else None):
                if secret:
                    text = text.replace(secret, "/***")
            record["error"] = text
        record["duration_s"] = round(time.monotonic() - started, 3)
        return record

    def send(self, event: str, info: dict | None = None) -> list[dict]:
        """event: start, success or fail. Returns one record per hook: target, url (redacted), ok, error."""
        if event not in ("start", "success", "fail"):
            raise ValueError(event)
        info = info or {}
        records = []
        if self.cfg.alert_url:
            base = self.cfg.alert_url.rstrip("/")
            url = {"start": f"{base}/start", "success": base, "fail": f"{base}/fail"}[event]
            if event == "fail":
                text = info.get("error") or "failed"
            else:
                text = " ".join(f"{k}={info[k]}" for k in ("key", "size", "sha256", "duration_s") if info.get(k))
            records.append(self._deliver("healthchecks", url, f"crab-{self.job}: {text}".encode(), "text/plain"))
        if self.cfg.alert_webhook_url:
            payload = {
                "event": event,
                "status": {"start": "started", "success": "ok", "fail": "failed"}[event],
                "job": self.job,
                "host": os.uname().nodename,
                "time": iso(utcnow()),
            }
            for key in ("key", "size", "sha256", "duration_s", "error"):
                payload[key] = info.get(key)
            body = json.dumps(payload, sort_keys=True).encode()
            records.append(self._deliver("webhook", self.cfg.alert_webhook_url, body, "application/json"))
        self.sent.extend({"event": event, **r} for r in records)
        return records

    def failures(self) -> list[str]:
        return [f"{r['event']} alert to {r['url']} failed: {r['error']}" for r in self.sent if not r["ok"]]


# --------------------------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------------------------
def part_size_for(size: int) -> int:
    """Multipart part size: at least 8 MiB, large enough that the file fits in S3_MAX_PARTS parts (5 TiB max)."""
    needed = -(-size // S3_MAX_PARTS)
    return max(S3_MIN_PART, -(-needed // MIB) * MIB)


def multipart_etag(path: str, part_size: int) -> str:
    """The ETag S3 computes for an unencrypted/SSE-S3 upload of this file with this part size."""
    size = os.path.getsize(path)
    digests = []
    with open(path, "rb") as handle:
        while True:
            block = handle.read(part_size)
            if not block:
                break
            digests.append(hashlib.md5(block, usedforsecurity=False).digest())
    if size < part_size:
        return digests[0].hex() if digests else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class S3Store:
    """The bucket/prefix where backups live, with errors turned into operator-grade messages."""

    def __init__(self, cfg: BackupConfig):
        self.cfg = cfg
        self._client = None

    @property
    def client(self):
        if self._client is None:
            try:
                import boto3  # lazy: check mode and argument parsing work without boto3
                from botocore.config import Config
            except ImportError as exc:
                raise BackupError(
                    "Cannot import boto3 on this host: install python3-boto3 (Debian) so the backup can reach S3."
                ) from exc
            extra = {"s3": {"addressing_style": "path"}} if self.cfg.endpoint_url else {}
            config = Config(
                connect_timeout=self.cfg.s3_connect_timeout_s,
                read_timeout=120,
                retries={"max_attempts": self.cfg.s3_max_attempts, "mode": "standard"},
                **extra,
            )
            session = boto3.session.Session(
                aws_access_key_id=self.cfg.access_key or None,
                aws_secret_access_key=self.cfg.secret_key or None,
                region_name=self.cfg.region or None,
            )
            self._client = session.client("s3", endpoint_url=self.cfg.endpoint_url or None, config=config)
        return self._client

    def url(self, key: str = "") -> str:
        return f"s3://{self.cfg.bucket}/{key}"

    def explain(self, exc: Exception, action: str, key: str = "") -> BackupError:
        """Turn a boto3/botocore exception into one sentence that says what to do."""
        where = self.url(key)
        endpoint = self.cfg.endpoint_url or "AWS S3"
        name = type(exc).__name__
        code = ""
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if not code and status:
                code = str(status)
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
            return BackupError(
                f"Cannot {action} {where}: the S3 endpoint {endpoint} is unreachable ({exc}). "
                "Check backup_s3_endpoint and that the S3 service runs."
            )
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return BackupError(
                f"Cannot {action} {where}: no S3 credentials were found. "
                "Set backup_s3_access_key/backup_s3_secret_key or attach an instance role."
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
            return BackupError(
                f"Cannot {action} {where}: access denied ({code}). Check backup_s3_access_key, "
                "backup_s3_secret_key or the instance role's permissions on the bucket."
            )
        if code in ("NoSuchBucket", "404") and not key:
            return BackupError(
                f"Cannot {action} {where}: the bucket {self.cfg.bucket} does not exist at {endpoint}. "
                "Create it or fix backup_s3_bucket."
            )
        if code == "NoSuchBucket":
            return BackupError(
                f"Cannot {action} {where}: the bucket {self.cfg.bucket} does not exist at {endpoint}. "
                "Create it or fix backup_s3_bucket."
            )
        detail = str(exc).rstrip(". ")
        return BackupError(f"Cannot {action} {where}: {name} {code}: {detail}. Check the S3 settings and service.")

    def check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.cfg.bucket)
        except Exception as exc:
            raise self.explain(exc, "reach the bucket") from exc

    def list_backups(self) -> list[tuple[str, dt.datetime, int]]:
        """(key, time from name, size) for our own keys under our own prefix."""
        out = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.cfg.bucket, Prefix=self.cfg.prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    rest = key[len(self.cfg.prefix) :]
                    if "/" in rest:
                        continue
                    when = parse_backup_name(self.cfg.name, rest)
                    if when is not None:
                        out.append((key, when, obj["Size"]))
        except BackupError:
            raise
        except Exception as exc:
            raise self.explain(exc, "list backups in", self.cfg.prefix) from exc
        return sorted(out, key=lambda it: it[1])

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.cfg.bucket, Key=key)
            return True
        except Exception as exc:
            code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self.explain(exc, "check", key) from exc

    def head(self, key: str) -> dict:
        try:
            return self.client.head_object(Bucket=self.cfg.bucket, Key=key)
        except Exception as exc:
            raise self.explain(exc, "read the metadata of", key) from exc

    def upload(self, path: str, key: str, sha256: str, size: int) -> dict:
        from boto3.s3.transfer import TransferConfig  # lazy, see S3Store.client

        part = part_size_for(size)
        extra = {"Metadata": {"sha256": sha256, "size": str(size), "crab-backup": "1"}}
        if self.cfg.sse != "none":
            extra["ServerSideEncryption"] = self.cfg.sse
            if self.cfg.sse == "aws:kms" and self.cfg.sse_kms_key_id:
                extra["SSEKMSKeyId"] = self.cfg.sse_kms_key_id
        transfer = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=4, use_threads=True
        )
        try:
            self.client.upload_file(path, self.cfg.bucket, key, ExtraArgs=extra, Config=transfer)
        except Exception as exc:
            cause = getattr(exc, "__cause__", None) or getattr(exc, "__context__", None) or exc
            raise self.explain(cause if cause is not exc else exc, "upload backup to", key) from exc
        return {"part_size": part}

    def verify(self, key: str, sha256: str, size: int, expected_etag: str | None) -> dict:
        head = self.head(key)
        meta = head.get("Metadata") or {}
        problems = []
        if head.get("ContentLength") != size:
            problems.append(f"size {head.get('ContentLength')} != {size}")
        if meta.get("sha256") != sha256:
            problems.append(f"sha256 metadata {meta.get('sha256')} != {sha256}")
        etag = str(head.get("ETag", "")).strip('"')
        etag_checked = bool(expected_etag) and re.fullmatch(r"[0-9a-f]{32}(-\d+)?", etag or "") is not None
        if etag_checked and etag != expected_etag:
            problems.append(f"ETag {etag} != {expected_etag} (content differs)")
        if self.cfg.sse != "none" and head.get("ServerSideEncryption") not in (self.cfg.sse, None):
            problems.append(f"server-side encryption {head.get('ServerSideEncryption')} != {self.cfg.sse}")
        if problems:
            raise BackupError(
                f"The uploaded object {self.url(key)} does not match the local backup: {'; '.join(problems)}. "
                "The object was removed; check the S3 service and run the backup again."
            )
        return {"etag": etag, "etag_verified": etag_checked, "sse": head.get("ServerSideEncryption")}

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.cfg.bucket, Key=key)
        except Exception as exc:
            raise self.explain(exc, "delete", key) from exc

    def download(self, key: str, path: str) -> None:
        try:
            self.client.download_file(self.cfg.bucket, key, path)
        except Exception as exc:
            raise self.explain(exc, "download", key) from exc


# --------------------------------------------------------------------------------------------------------------
# Dump and verify
# --------------------------------------------------------------------------------------------------------------
def pick_compressor(wanted: str) -> str:
    if wanted in ("zstd", "gzip"):
        find_tool(wanted)
        return wanted
    try:
        find_tool("zstd")
        return "zstd"
    except BackupError:
        find_tool("gzip")
        return "gzip"


def compress_argv(compressor: str, level: int) -> list[str]:
    if compressor == "zstd":
        return [find_tool("zstd"), f"-{level}", "-q", "-c", "-T0"]
    return [find_tool("gzip"), f"-{min(max(level, 1), 9)}", "-c"]


def decompress_argv(compressor: str) -> list[str]:
    return [find_tool("zstd"), "-d", "-q", "-c"] if compressor == "zstd" else [find_tool("gzip"), "-d", "-c"]


def compressor_of(path_or_key: str) -> str:
    return "gzip" if path_or_key.endswith(".gz") else "zstd"


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def _describe_exit(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited {code}"


def dump_to_file(cfg: BackupConfig, pg: PgClient, compressor: str, path: str) -> dict:
    """pg_dump | compressor > path (0600), hashing while streaming. Returns sha256, size, raw (uncompressed) bytes.

    Judged by exit codes: pg_dump non-zero (stopped DB, wrong password, permission denied, killed) or compressor
    non-zero, or a write error (disk full) raises BackupError; the caller removes the partial file."""
    env = _tool_env(cfg.db_password)
    digest = hashlib.sha256()
    size = 0
    dump = comp = None
    dump_err = comp_err = None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        dump = subprocess.Popen(
            pg.dump_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        comp = subprocess.Popen(
            compress_argv(compressor, cfg.compress_level),
            stdin=dump.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_tool_env(None),
        )
        dump.stdout.close()  # the compressor owns the read end; pg_dump gets SIGPIPE if the compressor dies
        dump_err = _StderrReader(dump.stderr)
        comp_err = _StderrReader(comp.stderr)
        dump_err.start()
        comp_err.start()
        with os.fdopen(fd, "wb", closefd=True) as out:
            fd = -1
            while True:
                block = comp.stdout.read(CHUNK)
                if not block:
                    break
                digest.update(block)
                size += len(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        comp_rc = comp.wait()
        dump_rc = dump.wait()
        dump_err.join(5)
        comp_err.join(5)
    except OSError as exc:
        _kill(dump)
        _kill(comp)
        if exc.errno == errno.ENOSPC:
            raise BackupError(
                f"Cannot write the backup to {path}: the disk is full. Free space in {cfg.local_dir} "
                "(a backup needs about the compressed size of the database) and run it again."
            ) from exc
        raise BackupError(f"Cannot write the backup to {path}: {exc.strerror}. Check {cfg.local_dir}.") from exc
    finally:
        if fd >= 0:
            os.close(fd)
        _kill(dump)
        _kill(comp)
    source = f"container {cfg.container}" if cfg.container else f"{cfg.db_host}:{cfg.db_port}"
    if dump_rc != 0:
        raise BackupError(
            f"pg_dump of database {cfg.db_name} on {source} {_describe_exit(dump_rc)}: "
            f"{_stderr_tail(dump_err.data)}. Check that PostgreSQL runs and that user {cfg.db_user} "
            "can log in and read every table; no backup was written."
        )
    if comp_rc != 0:
        raise BackupError(
            f"The compressor {compressor} {_describe_exit(comp_rc)} while compressing the dump of {cfg.db_name}: "
            f"{_stderr_tail(comp_err.data)}. Check the {compressor} install and free disk space."
        )
    if size == 0:
        raise BackupError(f"The dump of {cfg.db_name} is empty although pg_dump exited 0. Check the database.")
    return {"sha256": digest.hexdigest(), "size": size}


def verify_archive(path: str, compressor: str) -> dict:
    """Decompress and read the whole archive with pg_restore -f /dev/null: a truncated or corrupt dump fails here.

    Also checks the custom-format header (magic 'PGDMP'). Returns the uncompressed size."""
    env = _tool_env(None)
    decomp = restore = None
    try:
        decomp = subprocess.Popen(
            [*decompress_argv(compressor), path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        restore = subprocess.Popen(
            [find_tool("pg_restore"), "-f", os.devnull],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        restore_err = _StderrReader(restore.stderr)
        decomp_err = _StderrReader(decomp.stderr)
        restore_err.start()
        decomp_err.start()
        raw = 0
        header = b""
        try:
            while True:
                block = decomp.stdout.read(CHUNK)
                if not block:
                    break
                if len(header) < 5:
                    header += block[: 5 - len(header)]
                raw += len(block)
                restore.stdin.write(block)
        except BrokenPipeError:
            pass
        with contextlib.suppress(BrokenPipeError):
            restore.stdin.close()
        decomp_rc = decomp.wait()
        restore_rc = restore.wait()
        restore_err.join(5)
        decomp_err.join(5)
    finally:
        _kill(decomp)
        _kill(restore)
    if decomp_rc != 0:
        raise BackupError(
            f"The archive {path} does not decompress ({compressor} {_describe_exit(decomp_rc)}: "
            f"{_stderr_tail(decomp_err.data)}); it is truncated or corrupt and is not a usable backup."
        )
    if header != b"PGDMP":
        raise BackupError(f"The archive {path} is not a pg_dump custom-format archive (header {header!r}).")
    if restore_rc != 0:
        raise BackupError(
            f"pg_restore cannot read the archive {path} to the end ({_describe_exit(restore_rc)}: "
            f"{_stderr_tail(restore_err.data)}); it is truncated or corrupt and is not a usable backup."
        )
    return {"raw_size": raw}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Backup run
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BackupResult:
    key: str
    local_path: str
    size: int
    raw_size: int
    sha256: str
    compressor: str
    duration_s: float
    part_size: int
    etag: str
    etag_verified: bool
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)


class BackupRunner:
    """One backup run. ``run()`` returns a BackupResult or raises BackupError; the state file records either."""

    def __init__(self, cfg: BackupConfig, s3: S3Store | None = None, now=utcnow):
        cfg.validate()
        self.cfg = cfg
        self.pg = PgClient(cfg)
        self.s3 = s3 or S3Store(cfg)
        self.now = now
        self.alerter = Alerter(cfg, "backup")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.cfg.local_dir, ".lock")

    def plan(self) -> dict:
        """What a run would do, for check mode; touches nothing."""
        compressor = self.cfg.compressor if self.cfg.compressor != "auto" else "zstd (gzip if zstd is missing)"
        name = backup_filename(self.cfg.name, self.now(), "zstd" if self.cfg.compressor != "gzip" else "gzip")
        return {
            "would_dump": f"{self.cfg.db_name} from {self.cfg.container or self.cfg.db_host}",
            "compressor": compressor,
            "would_upload": self.s3.url(self.cfg.prefix + name),
            "local_dir": self.cfg.local_dir,
        }

    def run(self) -> BackupResult:
        """The backup; the alert hook hears start, then success or fail. A hook's own failure changes nothing about
        the result: it is listed in ``self.alerter.sent`` / ``result.alerts`` and in the state file's
        ``alert_errors``."""
        started = time.monotonic()
        start_time = self.now()
        self.alerter.send("start")
        try:
            with RunLock(self.lock_path, self.cfg.lock_wait_s):
                result = self._run_locked(start_time, started)
        except BackupError as exc:
            self._record_failure(start_time, started, str(exc))
            self.alerter.send("fail", {"error": str(exc), "duration_s": round(time.monotonic() - started, 3)})
            self._record_alerts()
            raise
        self.alerter.send("success", asdict(result))
        result.alerts = list(self.alerter.sent)
        self._record_alerts()
        return result

    def _record_alerts(self) -> None:
        """alert_errors in the state file: what the hook could not deliver in this run (empty when all went)."""
        if not self.alerter.enabled:
            return
        with contextlib.suppress(Exception):
            state = read_state(self.cfg.state_file)
            state["alert_errors"] = self.alerter.failures()
            write_state(self.cfg.state_file, state)

    def _record_failure(self, start_time: dt.datetime, started: float, message: str) -> None:
        with contextlib.suppress(Exception):
            state = read_state(self.cfg.state_file)
            state.update(
                {
                    "last_failure": iso(start_time),
                    "last_run": iso(start_time),
                    "last_status": "failed",
                    "error": message,
                    "failed_duration_s": round(time.monotonic() - started, 3),
                }
            )
            write_state(self.cfg.state_file, state)

    def _run_locked(self, start_time: dt.datetime, started: float) -> BackupResult:
        cfg = self.cfg
        ensure_private_dir(cfg.local_dir)
        compressor = pick_compressor(cfg.compressor)
        find_tool("pg_restore")
        if cfg.container:
            find_tool(cfg.docker)
        # Preflight: a wrong bucket/credential/endpoint fails in seconds, not after an hour of dumping.
        self.s3.check_bucket()
        filename = backup_filename(cfg.name, start_time, compressor)
        final_path = os.path.join(cfg.local_dir, filename)
        key = cfg.prefix + filename
        if os.path.exists(final_path) or self.s3.exists(key):
            raise BackupError(
                f"A backup named {filename} already exists locally or at {self.s3.url(key)}; "
                "refusing to overwrite it. Wait a second and run again."
            )
        partial = final_path + ".partial"
        try:
            dumped = dump_to_file(cfg, self.pg, compressor, partial)
            verified = verify_archive(partial, compressor)
            os.replace(partial, final_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        expected_etag = multipart_etag(final_path, part_size_for(dumped["size"])) if cfg.sse != "aws:kms" else None
        uploaded = False
        try:
            upload = self.s3.upload(final_path, key, dumped["sha256"], dumped["size"])
            uploaded = True
            check = self.s3.verify(key, dumped["sha256"], dumped["size"], expected_etag)
        except BaseException:
            if uploaded:
                with contextlib.suppress(Exception):
                    self.s3.delete(key)
            # The local archive is verified and good: keep it (retention runs only after success).
            raise
        result = BackupResult(
            key=key,
            local_path=final_path,
            size=dumped["size"],
            raw_size=verified["raw_size"],
            sha256=dumped["sha256"],
            compressor=compressor,
            duration_s=round(time.monotonic() - started, 3),
            part_size=upload["part_size"],
            etag=check["etag"],
            etag_verified=check["etag_verified"],
        )
        state = read_state(cfg.state_file)
        state.update(
            {
                "last_success": iso(start_time),
                "last_run": iso(start_time),
                "last_status": "ok",
                "key": key,
                "bucket": cfg.bucket,
                "local_path": final_path,
                "size": result.size,
                "raw_size": result.raw_size,
                "sha256": result.sha256,
                "duration_s": result.duration_s,
                "error": None,
            }
        )
        write_state(cfg.state_file, state)
        # Retention only after a fully successful run, and never the backup just made.
        result.deleted_local = self.prune_local(protect=final_path)
        result.deleted_remote = self.prune_remote(protect=key)
        return result

    def policy(self, local: bool) -> RetentionPolicy:
        tiers = not local or self.cfg.keep_local_tiers
        return RetentionPolicy(
            last=self.cfg.keep_local if local else self.cfg.keep_remote,
            daily=self.cfg.keep_daily if tiers else 0,
            weekly=self.cfg.keep_weekly if tiers else 0,
            monthly=self.cfg.keep_monthly if tiers else 0,
        )

    def _protected(self, extra: str | None) -> set[str]:
        """Never deleted: the backup just made and the last good one the state file records."""
        protect = {extra} if extra else set()
        with contextlib.suppress(BackupError):
            state = read_state(self.cfg.state_file)
            protect.update(v for v in (state.get("key"), state.get("local_path")) if v)
        return protect

    def prune_local(self, protect: str | None = None, dry_run: bool = False) -> list[str]:
        """Delete (or, dry run, list) local backups the policy drops: only our own names in local_dir."""
        items = []
        if os.path.isdir(self.cfg.local_dir):
            for entry in os.listdir(self.cfg.local_dir):
                when = parse_backup_name(self.cfg.name, entry)
                path = os.path.join(self.cfg.local_dir, entry)
                if when is not None and os.path.isfile(path) and not os.path.islink(path):
                    items.append((path, when))
        keep = self._protected(protect)
        doomed = [p for p in self.policy(local=True).plan(items) if p not in keep]
        if not dry_run:
            for path in doomed:
                os.unlink(path)
        return doomed

    def prune_remote(self, protect: str | None = None, dry_run: bool = False) -> list[str]:
        """Delete (or, dry run, list) S3 keys the policy drops: only our own names directly under our prefix."""
        items = [(key, when) for key, when, _ in self.s3.list_backups()]
        keep = self._protected(protect)
        doomed = [k for k in self.policy(local=False).plan(items) if k not in keep]
        if not dry_run:
            for key in doomed:
                self.s3.delete(key)
        return doomed

    def retention_dry_run(self) -> dict:
        """What retention would delete now (local and S3), deleting nothing and taking no backup."""
        return {
            "would_delete_local": self.prune_local(dry_run=True),
            "would_delete_remote": self.prune_remote(dry_run=True),
            "policy_local": asdict(self.policy(local=True)),
            "policy_remote": asdict(self.policy(local=False)),
        }


# --------------------------------------------------------------------------------------------------------------
# Restore and drill
# --------------------------------------------------------------------------------------------------------------
# All SQL is constant text; names and values reach it only as psql variables (:'v' literal, :"v" identifier)
# or through server-side format('%I'), so no quoting happens in Python.
DB_EXISTS_SQL = "SELECT 1 FROM pg_database WHERE datname = :'db';"
CREATE_DB_SQL = 'CREATE DATABASE :"db" OWNER :"owner";'
DROP_DB_SQL = 'DROP DATABASE IF EXISTS :"db" WITH (FORCE);'
RELATION_COUNT_SQL = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f');
"""
# Exact row count of every table and materialized view (partitions counted as their own tables), one query.
TABLE_COUNTS_SQL = """
SELECT n.nspname || '.' || c.relname,
       (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', n.nspname, c.relname),
                                            false, true, '')))[1]::text::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
ORDER BY 1;
"""
# md5 of the newest row (by primary key) of the hash-chained event log: equal heads mean an equal chain end.
EVENT_LOG_HEAD_SQL = """
SELECT format('SELECT md5(t::text) FROM %s t ORDER BY %s DESC LIMIT 1', c.oid::regclass,
              coalesce((SELECT string_agg(quote_ident(a.attname), ', '
                                          ORDER BY array_position(i.indkey::int2[], a.attnum))
                        FROM pg_index i
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                        WHERE i.indrelid = c.oid AND i.indisprimary), 'ctid'))
FROM pg_class c WHERE c.oid = to_regclass(:'tbl') \\gexec
"""


class Restorer:
    """Fetch a backup, verify it, restore it into a named database; the drill restores into a scratch DB."""

    def __init__(self, cfg: BackupConfig, s3: S3Store | None = None):
        cfg.validate()
        self.cfg = cfg
        self.pg = PgClient(cfg)
        self.s3 = s3 or S3Store(cfg)

    def choose(self, key: str | None = None) -> tuple[str, str | None]:
        """(key, expected sha256). Newest of our keys by default."""
        if key:
            if "/" not in key:
                key = self.cfg.prefix + key
        else:
            backups = self.s3.list_backups()
            if not backups:
                raise BackupError(
                    f"No backup found under {self.s3.url(self.cfg.prefix)} named {self.cfg.name}-<timestamp>.dump.*; "
                    "run playbooks/backup-now.yml first."
                )
            key = backups[-1][0]
        head = self.s3.head(key)
        return key, (head.get("Metadata") or {}).get("sha256")

    def fetch(self, key: str, expected_sha: str | None, workdir: str) -> str:
        path = os.path.join(workdir, os.path.basename(key))
        self.s3.download(key, path)
        os.chmod(path, 0o600)
        actual = sha256_file(path)
        if not expected_sha:
            raise BackupError(
                f"The object {self.s3.url(key)} has no sha256 metadata, so its integrity cannot be proven; "
                "restore it by hand if you trust it."
            )
        if actual != expected_sha:
            raise BackupError(
                f"The downloaded {self.s3.url(key)} has sha256 {actual} but its metadata says {expected_sha}: "
                "the object is corrupt. Restore an older backup."
            )
        return path

    def database_exists(self, dbname: str) -> bool:
        out = self.pg.psql(DB_EXISTS_SQL, admin=True, variables={"db": dbname})
        return out.strip() == "1"

    def user_relation_count(self, dbname: str) -> int:
        return int(self.pg.psql(RELATION_COUNT_SQL, dbname=dbname, admin=True).strip() or 0)

    def create_database(self, dbname: str) -> None:
        self.pg.psql(CREATE_DB_SQL, admin=True, variables={"db": dbname, "owner": self.cfg.db_user})

    def drop_database(self, dbname: str) -> None:
        self.pg.psql(DROP_DB_SQL, admin=True, variables={"db": dbname})

    def restore_file(self, path: str, dbname: str) -> None:
        compressor = compressor_of(path)
        decomp = restore = None
        try:
            decomp = subprocess.Popen(
                [*decompress_argv(compressor), path],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_tool_env(None),
            )
            restore = subprocess.Popen(
                self.pg.restore_argv(dbname),
                stdin=decomp.stdout,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=_tool_env(self.cfg.db_password),
            )
            decomp.stdout.close()
            restore_err = _StderrReader(restore.stderr)
            decomp_err = _StderrReader(decomp.stderr)
            restore_err.start()
            decomp_err.start()
            restore_rc = restore.wait()
            decomp_rc = decomp.wait()
            restore_err.join(5)
            decomp_err.join(5)
        finally:
            _kill(decomp)
            _kill(restore)
        if restore_rc != 0:
            raise BackupError(
                f"pg_restore into database {dbname} stopped at the first error ({_describe_exit(restore_rc)}): "
                f"{_stderr_tail(restore_err.data)}. The database is partly restored; drop it and fix the cause."
            )
        if decomp_rc != 0:
            raise BackupError(
                f"Cannot decompress {path} ({_describe_exit(decomp_rc)}): {_stderr_tail(decomp_err.data)}."
            )

    def restore(self, target_db: str, key: str | None = None, force: bool = False) -> dict:
        started = time.monotonic()
        with RunLock(os.path.join(self.cfg.local_dir, ".lock"), self.cfg.lock_wait_s):
            key, sha = self.choose(key)
            exists = self.database_exists(target_db)
            if exists and self.user_relation_count(target_db) > 0:
                if not force:
                    raise BackupError(
                        f"Database {target_db} is not empty; refusing to restore {self.s3.url(key)} over it. "
                        "Choose another target or set restore_force=true to drop and recreate it."
                    )
                self.drop_database(target_db)
                exists = False
            ensure_private_dir(self.cfg.local_dir)
            with tempfile.TemporaryDirectory(dir=self.cfg.local_dir, prefix=".restore-") as workdir:
                path = self.fetch(key, sha, workdir)
                if not exists:
                    self.create_database(target_db)
                self.restore_file(path, target_db)
        return {"key": key, "sha256": sha, "database": target_db, "duration_s": round(time.monotonic() - started, 3)}

    def table_counts(self, dbname: str) -> dict[str, int]:
        counts = {}
        for line in self.pg.psql(TABLE_COUNTS_SQL, dbname=dbname, admin=True).splitlines():
            if line.strip():
                name, count = line.rsplit("\t", 1)
                counts[name] = int(count)
        return counts

    def event_log_head(self, dbname: str, table: str = "public.event_log") -> str | None:
        out = self.pg.psql(EVENT_LOG_HEAD_SQL, dbname=dbname, admin=True, variables={"tbl": table})
        return out.strip() or None

    def drill(self, key: str | None = None, scratch_db: str | None = None) -> dict:
        """Restore into a scratch DB, compare per-table row counts and the event_log head with the source, drop it."""
        started = time.monotonic()
        scratch = scratch_db or f"{self.cfg.db_name}_drill_{utcnow().strftime('%Y%m%d%H%M%S')}"
        if scratch == self.cfg.db_name:
            raise BackupError(f"The drill's scratch database must not be the source {scratch}; choose another name.")
        with RunLock(os.path.join(self.cfg.local_dir, ".lock"), self.cfg.lock_wait_s):
            key, sha = self.choose(key)
            if self.database_exists(scratch):
                raise BackupError(f"The drill's scratch database {scratch} already exists; drop it or choose another.")
            ensure_private_dir(self.cfg.local_dir)
            try:
                with tempfile.TemporaryDirectory(dir=self.cfg.local_dir, prefix=".drill-") as workdir:
                    path = self.fetch(key, sha, workdir)
                    self.create_database(scratch)
                    self.restore_file(path, scratch)
                source_counts = self.table_counts(self.cfg.db_name)
                restored_counts = self.table_counts(scratch)
                source_head = self.event_log_head(self.cfg.db_name)
                restored_head = self.event_log_head(scratch)
            finally:
                with contextlib.suppress(BackupError):
                    self.drop_database(scratch)
        mismatches = {}
        for table in sorted(set(source_counts) | set(restored_counts)):
            if source_counts.get(table) != restored_counts.get(table):
                mismatches[table] = {"source": source_counts.get(table), "restored": restored_counts.get(table)}
        return {
            "key": key,
            "sha256": sha,
            "scratch_db": scratch,
            "tables": len(source_counts),
            "rows": sum(source_counts.values()),
            "counts": restored_counts,
            "mismatches": mismatches,
            "event_log_head_match": source_head == restored_head,
            "event_log_head": restored_head,
            "ok": not mismatches and source_head == restored_head,
            "duration_s": round(time.monotonic() - started, 3),
        }


# --------------------------------------------------------------------------------------------------------------
# Cron CLI (installed as /usr/local/lib/crab-ops/crab_backup.py, run by /usr/local/sbin/crab-backup)
# --------------------------------------------------------------------------------------------------------------
def load_config_file(path: str) -> BackupConfig:
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise BackupError(f"Cannot read the backup configuration {path}: {exc}. Re-run the backup role.") from exc
    if mode & 0o077:
        raise BackupError(f"The backup configuration {path} holds secrets but is readable by others; chmod 0600 it.")
    return BackupConfig.from_dict(data)


def _print_alert_failures(runner) -> None:
    for line in runner.alerter.failures() if runner is not None else []:
        print(f"crab-backup: WARNING: {line}", file=sys.stderr)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crab-backup", description="Back up the crab database to S3.")
    parser.add_argument("--config", default="/etc/crab-ops/backup.json")
    parser.add_argument("--max-age-hours", type=float, default=0, help="do nothing if a backup is younger")
    parser.add_argument(
        "--retention-dry-run",
        action="store_true",
        help="take no backup and delete nothing: list the local files and S3 keys retention would delete now",
    )
    args = parser.parse_args(argv)
    runner = None
    try:
        cfg = load_config_file(args.config)
        if args.retention_dry_run:
            plan = BackupRunner(cfg).retention_dry_run()
            store = S3Store(cfg)
            print(
                f"crab-backup: retention dry run: would delete {len(plan['would_delete_local'])} local and "
                f"{len(plan['would_delete_remote'])} S3 backup(s); nothing was deleted."
            )
            for path in plan["would_delete_local"]:
                print(f"would delete {path}")
            for key in plan["would_delete_remote"]:
                print(f"would delete {store.url(key)}")
            return 0
        if fresh_backup(read_state(cfg.state_file), args.max_age_hours):
            print("crab-backup: a backup younger than the maximum age exists; nothing to do.")
            return 0
        runner = BackupRunner(cfg)
        result = runner.run()
    except BackupError as exc:
        print(f"crab-backup: FAILED: {exc}", file=sys.stderr)
        _print_alert_failures(runner)
        return 1
    _print_alert_failures(runner)
    print(
        f"crab-backup: ok {S3Store(cfg).url(result.key)} size={result.size} sha256={result.sha256} "
        f"duration_s={result.duration_s}"
    )
    return 0


# --------------------------------------------------------------------------------------------------------------
# Shared Ansible option fragments (plain dicts: no Ansible import here)
# --------------------------------------------------------------------------------------------------------------
def common_argument_spec() -> dict:
    """Options crab_backup and crab_restore share: where the database and the bucket are, and how to reach them."""
    return {
        "container": {"type": "str", "default": "crab-postgres"},
        "docker": {"type": "str", "default": "docker"},
        "db_name": {"type": "str", "default": "crab"},
        "db_user": {"type": "str", "default": "crab"},
        "db_password": {"type": "str", "no_log": True},
        "db_host": {"type": "str", "default": "127.0.0.1"},
        "db_port": {"type": "int", "default": 5432},
        "admin_user": {"type": "str", "default": "postgres"},
        "admin_host": {"type": "str"},
        "bucket": {"type": "str", "default": "crab-backups"},
        "prefix": {"type": "str", "default": "pg/"},
        "endpoint_url": {"type": "str"},
        "region": {"type": "str", "default": "us-east-1"},
        "access_key": {"type": "str", "no_log": True},
        "secret_key": {"type": "str", "no_log": True},
        "sse": {"type": "str", "default": "AES256", "choices": ["AES256", "aws:kms", "none"]},
        "sse_kms_key_id": {"type": "str"},
        "local_dir": {"type": "path", "default": "/var/backups/crab"},
        "state_file": {"type": "path", "default": "/var/lib/crab-ops/backup-state.json"},
        "name": {"type": "str", "default": "crab"},
        "lock_wait_s": {"type": "float", "default": 0},
        "s3_connect_timeout_s": {"type": "int", "default": 5},
        "s3_max_attempts": {"type": "int", "default": 3},
    }


def alert_argument_spec() -> dict:
    """The alert hook's options (secrets: no_log)."""
    return {
        "alert_url": {"type": "str", "no_log": True},
        "alert_webhook_url": {"type": "str", "no_log": True},
        "alert_timeout_s": {"type": "float", "default": 10},
    }


def backup_argument_spec() -> dict:
    spec = common_argument_spec()
    spec.update(alert_argument_spec())
    spec.update(
        {
            "compressor": {"type": "str", "default": "auto", "choices": ["auto", "zstd", "gzip"]},
            "compress_level": {"type": "int", "default": 3},
            "dump_lock_timeout_s": {"type": "int", "default": 600},
            "keep_local": {"type": "int", "default": 3},
            "keep_remote": {"type": "int", "default": 14},
            "keep_daily": {"type": "int", "default": 0},
            "keep_weekly": {"type": "int", "default": 0},
            "keep_monthly": {"type": "int", "default": 0},
            "keep_local_tiers": {"type": "bool", "default": False},
            "retention_dry_run": {"type": "bool", "default": False},
            "max_age_hours": {"type": "float", "default": 0},
        }
    )
    return spec


def restore_argument_spec() -> dict:
    spec = common_argument_spec()
    spec.update(
        {
            "action": {"type": "str", "default": "drill", "choices": ["restore", "drill"]},
            "key": {"type": "str"},
            "target_db": {"type": "str"},
            "force": {"type": "bool", "default": False},
            "scratch_db": {"type": "str"},
        }
    )
    return spec


def config_from_params(params: dict) -> BackupConfig:
    """BackupConfig from module params (ignores the module-only options)."""
    known = {f.name for f in fields(BackupConfig)}
    return BackupConfig.from_dict({k: v for k, v in params.items() if k in known})


def state_summary(state: dict) -> str:
    keys = ("last_status", "last_success", "last_failure", "key", "size", "sha256", "error")
    return "".join(f"{k}: {state.get(k)}\n" for k in keys if k in state)
