"""Session fixtures for the lab end-to-end tests: one `lab` object that brings the lab up and reaches its parts.

def test_x(lab):
    lab.ssh("edge1", "id -un").stdout        # SSH with the lab key and known_hosts (host keys checked)
    lab.psql("SELECT count(*) FROM orders")   # psql in crab-postgres over TCP 127.0.0.1 as crab
    lab.s3().list_objects_v2(Bucket=lab.s3_bucket)
    lab.docker.containers.get("crab-postgres")
    run = lab.playbook("site.yml", "--check"); run.recap["cloud1"]["failed"] == 0
"""

import os
import re
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import boto3
import docker
import pytest
from botocore.config import Config

# site.yml's order-sensitive session fixture lives in tests/integration/site.py (pytest_plugins is not allowed
# in a non-root conftest); importing it here registers it for every integration test.
from tests.integration.site import site_applied

__all__ = ["Lab", "lab", "site_applied"]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PSQL = ["docker", "exec", "-i", "-e", "PGPASSWORD", "crab-postgres", "psql", "-X", "-h", "127.0.0.1", "-U", "crab"]
PSQL += ["-v", "ON_ERROR_STOP=1", "-tA"]
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$")


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of ansible-playbook output as {host: {"ok": n, "changed": n, "failed": n, ...}}."""
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        if in_recap:
            match = RECAP_LINE.match(line.strip())
            if match:
                counts = dict(pair.split("=") for pair in match["counts"].split())
                recap[match["host"]] = {key: int(value) for key, value in counts.items()}
            elif line.strip():
                in_recap = False
    return recap


class PlaybookRun(subprocess.CompletedProcess):
    """A finished ansible-playbook run: returncode, stdout, stderr and the parsed PLAY RECAP."""

    def __init__(self, proc: subprocess.CompletedProcess):
        super().__init__(proc.args, proc.returncode, proc.stdout, proc.stderr)
        self.recap = parse_recap(proc.stdout)

    def __str__(self) -> str:
        return f"rc={self.returncode}\n{self.stdout[-6000:]}\n{self.stderr[-3000:]}"


@dataclass
class Lab:
    """The running lab (lab/lab.sh up): paths, secrets and clients for its hosts, database and S3."""

    repo: Path = REPO
    dir: Path = REPO / ".lab"
    hosts: dict[str, int] = field(default_factory=lambda: {"cloud1": 2221, "edge1": 2222, "edge2": 2223})
    s3_endpoint: str = "http://127.0.0.1:8333"
    s3_bucket: str = "crab-backups"
    api_url: str = "http://127.0.0.1:18080/health"
    inventory: Path = REPO / "inventory" / "lab" / "hosts.yml"

    @property
    def ssh_dir(self) -> Path:
        return self.dir / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def secrets_dir(self) -> Path:
        return self.dir / "secrets"

    def secret(self, name: str) -> str:
        return (self.secrets_dir / name).read_text(encoding="utf-8").strip()

    @property
    def pg_password(self) -> str:
        return self.secret("pg_password")

    @property
    def s3_access_key(self) -> str:
        return self.secret("s3_access_key")

    @property
    def s3_secret_key(self) -> str:
        return self.secret("s3_secret_key")

    def ssh_args(self, host: str, key: Path | None = None) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(key or self.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
            "-p",
            str(self.hosts[host]),
            "root@127.0.0.1",
        ]

    def ssh(self, host: str, cmd: str, *, check: bool = False, timeout: float = 120, key: Path | None = None, **kw):
        """Run `cmd` as root on a lab host over SSH; returns the CompletedProcess (text)."""
        return subprocess.run(
            [*self.ssh_args(host, key), cmd], capture_output=True, text=True, timeout=timeout, check=check, **kw
        )

    @cached_property
    def docker(self) -> docker.DockerClient:
        return docker.from_env()

    def s3(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for the lab S3 (the lab keys unless others are given)."""
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=access_key or self.s3_access_key,
            aws_secret_access_key=secret_key or self.s3_secret_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=60),
        )

    def psql(self, sql: str, *, db: str = "crab", password: str | None = None, check: bool = True) -> str:
        """Run SQL in crab-postgres as user crab over TCP 127.0.0.1 (password auth); returns unaligned output."""
        env = dict(os.environ, PGPASSWORD=password if password is not None else self.pg_password)
        proc = subprocess.run(
            [*PSQL, "-d", db],
            input=sql,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"psql failed (rc={proc.returncode}) for {sql[:200]!r}: {proc.stderr.strip()}")
        return proc.stdout.strip() if check else proc

    def playbook(self, *args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> PlaybookRun:
        """Run ansible-playbook from the repo against the lab inventory; returns output and the parsed recap."""
        run_env = dict(
            os.environ,
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            ANSIBLE_CONFIG=str(self.repo / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            **(env or {}),
        )
        proc = subprocess.run(
            [str(VENV_BIN / "ansible-playbook"), "-i", str(self.inventory), *args],
            cwd=self.repo,
            capture_output=True,
            text=True,
            env=run_env,
            timeout=timeout,
            check=False,
        )
        return PlaybookRun(proc)


def lab_up() -> None:
    """Bring the lab up (idempotent; seconds when already up). A failure is an error, never a skip."""
    proc = subprocess.run(
        ["bash", str(REPO / "lab" / "lab.sh"), "up"], capture_output=True, text=True, timeout=1800, check=False
    )
    if proc.returncode != 0 or not (REPO / ".lab" / "ready").exists():
        raise RuntimeError(f"lab/lab.sh up failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The running lab. Runs `lab/lab.sh up` once per session (it restarts whatever a test stopped)."""
    lab_up()
    return Lab()


@pytest.fixture(scope="session")
def crab_lab_seed_mb() -> int:
    """The seed size the lab was asked for (CRAB_LAB_SEED_MB, default 100)."""
    return int(os.environ.get("CRAB_LAB_SEED_MB", "100"))
