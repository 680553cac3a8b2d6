"""sqlite_pragmas on the lab's edge hosts, read back over SSH after site.yml (issue 2, done-when 4).

Both edge DBs are WAL by their file header; every connection of the edge-server stand-in reports busy_timeout
5000 (and the other configured pragmas); no -wal/-shm file is owned by root; the DB's owner and mode are as the
app made them. Also: the dry run listed the journal mode change, and the module refuses to run as root.
"""

import json
import os
import subprocess

import pytest

EDGES = ("edge1", "edge2")
DB = "/var/lib/crab/edge.db"
STATUS_DIR = "/run/crab/edge-server"
CONF = "/etc/crab/edge-server.conf"
READ_STATUS = (
    "python3 -c 'import glob, json, os, sys; "
    'files = sorted(glob.glob("' + STATUS_DIR + '/*.json")); '
    "json.dump([dict(json.load(open(f)), _file=f, _mtime=os.stat(f).st_mtime, "
    '_alive=os.path.exists("/proc/%d" % json.load(open(f))["pid"])) for f in files], sys.stdout)\''
)


def header_versions(lab, host: str) -> tuple[int, int]:
    """Bytes 18 and 19 of the DB header (2, 2 = WAL), read with od over SSH: no SQLite involved."""
    out = lab.ssh(host, f"od -An -tu1 -j18 -N2 {DB}", check=True).stdout.split()
    return int(out[0]), int(out[1])


def connection_reports(lab, host: str) -> list[dict]:
    return json.loads(lab.ssh(host, READ_STATUS, check=True).stdout)


def file_owners(lab, host: str) -> dict[str, tuple[str, str, str]]:
    out = lab.ssh(host, f"stat -c '%n %U %G %a' {DB} {DB}-wal {DB}-shm {DB}-journal 2>/dev/null; true").stdout
    return {name: (user, group, mode) for name, user, group, mode in (line.split() for line in out.splitlines())}


def conf_mtime(lab, host: str) -> float:
    return float(lab.ssh(host, f"stat -c %.Y {CONF}", check=True).stdout)


@pytest.fixture(scope="module")
def edges(site_applied):
    first = site_applied.first_run
    for host in EDGES:
        assert first.recap.get(host, {}).get("failed") == 0, f"site.yml failed on {host}:\n{first}"
    return site_applied.lab


@pytest.mark.parametrize("host", EDGES)
def test_edge_db_is_wal_by_its_file_header(edges, host):
    assert header_versions(edges, host) == (2, 2)


@pytest.mark.parametrize("host", EDGES)
def test_every_connection_reports_busy_timeout_5000(edges, host):
    reports = connection_reports(edges, host)
    live = [r for r in reports if r["_alive"]]
    assert {r["role"] for r in live} == {"orders", "archiver", "api"}, reports
    newer_than = conf_mtime(edges, host)
    for report in live:
        where = f"{host}:{report['_file']}"
        assert report["_mtime"] >= newer_than, f"{where} was written before the config changed"
        assert report["user"] == "crab", where
        assert report["pragmas"]["busy_timeout"] == 5000, where
        assert report["pragmas"]["journal_mode"] == "wal", where
        assert report["pragmas"]["synchronous"] == 1, where  # NORMAL
        assert report["pragmas"]["foreign_keys"] == 1, where


@pytest.mark.parametrize("host", EDGES)
def test_no_side_file_owned_by_root_and_db_owner_mode_kept(edges, host):
    owners = file_owners(edges, host)
    assert owners[DB] == ("crab", "crab", "640")
    assert f"{DB}-wal" in owners, f"{host}: the stand-in writes in WAL mode, yet there is no -wal file"
    for name, (user, _group, _mode) in owners.items():
        assert user == "crab", f"{host}: {name} is owned by {user}"


def test_dry_run_listed_the_journal_mode_change(site_applied):
    out = site_applied.check_run.stdout
    assert "-journal_mode = delete" in out and "+journal_mode = wal" in out, out[-4000:]
    assert "+SQLITE_BUSY_TIMEOUT_MS=5000" in out


def test_module_refuses_to_run_as_root_and_changes_nothing(edges):
    """Without become_user the module must fail naming the fix, and leave the DB and its side files alone."""
    before = file_owners(edges, "edge1")
    ansible = str(edges.repo / ".venv" / "bin" / "ansible")
    args = f"path={DB} journal_mode=delete"
    proc = subprocess.run(
        [ansible, "edge1", "-i", str(edges.inventory), "-m", "crab_sqlite_pragmas", "-a", args],
        cwd=edges.repo,
        capture_output=True,
        text=True,
        env=dict(os.environ, ANSIBLE_CONFIG=str(edges.repo / "ansible.cfg"), ANSIBLE_NOCOLOR="1"),
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    assert "become_user: crab" in proc.stdout + proc.stderr
    assert header_versions(edges, "edge1") == (2, 2)
    assert file_owners(edges, "edge1") == before
