"""Real components for the backup tests: a throwaway PostgreSQL 15 and a SeaweedFS S3 server on the backup
engineer's ports (28100-28199), both on 127.0.0.1 and removed at the end of the session.

Test modules import the fixtures from here. The one test in this file checks the fixtures themselves.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from module_utils.crab_backup import BackupConfig

REPO = Path(__file__).resolve().parents[2]
# The repo's own venv, else the first `weed` on PATH (a git worktree shares the main checkout's venv).
WEED = REPO / ".venv" / "bin" / "weed"
if not WEED.exists() and shutil.which("weed"):
    WEED = Path(shutil.which("weed"))
PG_BIN = Path("/usr/lib/postgresql/15/bin")
DEAD_PORT = 28199  # nothing listens here: "PostgreSQL stopped" and "S3 unreachable"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _port_block() -> int:
    """A block of 10 free ports in 28110-28189, so concurrent test sessions (other engineers) do not collide."""
    for base in range(28110, 28190, 10):
        if all(_free(base + i) for i in range(10)):
            return base
    raise RuntimeError("no free block of 10 ports in 28110-28189 for the backup tests")


# pytest imports this file under its own name and the test modules import it as tests.unit.test_backup_fixtures:
# two module objects. The port block and the servers must be one per process, so they live in one registry.
_REGISTRY = sys.modules.setdefault("_crab_bk_test_servers", types.ModuleType("_crab_bk_test_servers"))
if not hasattr(_REGISTRY, "base"):
    _REGISTRY.base = _port_block()
BASE = _REGISTRY.base
PG_PORT = BASE
S3_PORT = BASE + 7
PG_PASSWORD = "crab-test-pw"
S3_KEY, S3_SECRET = "AKCRABBKTEST", "crab-bk-secret-for-tests"
BUCKET = "crab-backups"

SEED_SQL = """
CREATE TABLE tenants (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, tenant_id int REFERENCES tenants(id), total numeric(12,2), note text);
CREATE TABLE event_log (id bigserial PRIMARY KEY, payload text NOT NULL, prev_hash text, hash text NOT NULL);
INSERT INTO tenants (name) SELECT 'tenant ' || g FROM generate_series(1, 20) g;
INSERT INTO orders (tenant_id, total, note)
  SELECT 1 + g % 20, (g % 997) / 7.0, md5(g::text) || md5((g * 7)::text) FROM generate_series(1, 60000) g;
DO $$
DECLARE prev text := ''; h text;
BEGIN
  FOR i IN 1..500 LOOP
    h := encode(sha256(convert_to(prev || 'event ' || i, 'UTF8')), 'hex');
    INSERT INTO event_log (payload, prev_hash, hash) VALUES ('event ' || i, prev, h);
    prev := h;
  END LOOP;
END $$;
"""


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class LocalPostgres:
    """PostgreSQL 15 run as the postgres OS user: scram password auth on TCP, trust on its private socket."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.sock = root / "sock"

    def _as_postgres(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, **kw)

    def start(self) -> None:
        self.sock.mkdir(parents=True)
        shutil.chown(self.root, "postgres")
        shutil.chown(self.sock, "postgres")
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )
        opts = f"-p {PG_PORT} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start"
        )
        self.admin(f"CREATE ROLE crab LOGIN PASSWORD '{PG_PASSWORD}';")
        self.admin("CREATE DATABASE crab OWNER crab;")
        self.sql("crab", SEED_SQL)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                capture_output=True,
                check=False,
            )

    def admin(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [
                "psql",
                "-h",
                str(self.sock),
                "-p",
                str(PG_PORT),
                "-U",
                "postgres",
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ],
            input=sql,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def sql(self, db: str, sql: str) -> str:
        out = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(PG_PORT),
                "-U",
                "crab",
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
            ],
            input=sql,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PGPASSWORD": PG_PASSWORD},
        )
        return out.stdout.strip()


class LocalS3:
    """SeaweedFS `weed server -s3` with one identity (key auth required) and SSE-S3 enabled by a KEK."""

    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{S3_PORT}"

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True)
        identity = {
            "name": "crab",
            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        env = {**os.environ, "WEED_S3_SSE_KEK": os.urandom(32).hex()}
        ports = {
            "master.port": BASE + 1,
            "volume.port": BASE + 2,
            "filer.port": BASE + 3,
            "master.port.grpc": BASE + 4,
            "volume.port.grpc": BASE + 5,
            "filer.port.grpc": BASE + 6,
            "s3.port": S3_PORT,
            "s3.port.grpc": BASE + 8,
        }
        argv = [str(WEED), "server", "-s3", "-ip", "127.0.0.1", "-ip.bind", "127.0.0.1", "-volume.max", "5"]
        # weed also opens Iceberg (8181) and Lance (9101) servers and may phone home: all off (loopback only)
        argv += ["-s3.port.iceberg", "0", "-s3.port.lance", "0", "-master.telemetry=false"]
        argv += ["-dir", str(self.root / "data"), "-s3.config", str(self.root / "s3.json")]
        for flag, port in ports.items():
            argv += [f"-{flag}", str(port)]
        with open(self.root / "weed.log", "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait_port(S3_PORT, 60)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def keys(self, prefix: str = "") -> dict[str, int]:
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = obj["Size"]
        return out


class _Shared:
    """One server per pytest session, even though several test modules import these fixtures (each import is its
    own fixture definition): started by the first user, stopped when the last one is done."""

    def __init__(self, factory, prefix: str):
        self.factory, self.prefix = factory, prefix
        self.users = 0
        self.server = None
        self.root: Path | None = None

    def acquire(self):
        if self.server is None:
            self.root = Path(tempfile.mkdtemp(prefix=self.prefix))
            server = self.factory(self.root)
            try:
                server.start()
            except BaseException:
                server.stop()
                shutil.rmtree(self.root, ignore_errors=True)
                raise
            self.server = server
        self.users += 1
        return self.server

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.server is not None:
            self.server.stop()
            shutil.rmtree(self.root, ignore_errors=True)
            self.server = None


if not hasattr(_REGISTRY, "pg"):
    _REGISTRY.pg = _Shared(LocalPostgres, "crab-bk-pg-")
    _REGISTRY.s3 = _Shared(LocalS3, "crab-bk-s3-")
_PG, _S3 = _REGISTRY.pg, _REGISTRY.s3


@pytest.fixture(scope="session")
def pg_server():
    server = _PG.acquire()
    try:
        yield server
    finally:
        _PG.release()


@pytest.fixture(scope="session")
def s3_server():
    server = _S3.acquire()
    try:
        yield server
    finally:
        _S3.release()


@pytest.fixture
def backup_cfg(pg_server, s3_server, tmp_path) -> BackupConfig:
    """A config for the local PostgreSQL (no container) and the local S3, with its own prefix per test."""
    prefix = f"t{time.monotonic_ns()}/pg/"
    return BackupConfig(
        container=None,
        db_port=PG_PORT,
        db_password=PG_PASSWORD,
        admin_host=str(pg_server.sock),
        endpoint_url=s3_server.endpoint,
        access_key=S3_KEY,
        secret_key=S3_SECRET,
        prefix=prefix,
        local_dir=str(tmp_path / "backups"),
        state_file=str(tmp_path / "state" / "backup-state.json"),
        s3_max_attempts=2,
        s3_connect_timeout_s=2,
    )


def test_fixtures_are_real(pg_server, s3_server):
    assert pg_server.sql("crab", "SELECT count(*) FROM orders;") == "60000"
    assert BUCKET in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key="wrong",
        config=Config(s3={"addressing_style": "path"}),
    )
    with pytest.raises(Exception, match=r"403|Forbidden|SignatureDoesNotMatch"):
        bad.head_bucket(Bucket=BUCKET)
