"""Real state after converge on mol-sq-edge: header bytes, config, every connection's report, file owners."""

import json

DB = "/var/lib/crab/edge.db"
STATUS_DIR = "/run/crab/edge-server"
CONF = "/etc/crab/edge-server.conf"


def _header_versions(host) -> tuple[int, int]:
    out = host.check_output(f"python3 -c \"import sys; h=open('{DB}','rb').read(20); print(h[18], h[19])\"")
    first, second = out.split()
    return int(first), int(second)


def test_database_is_wal_by_its_header(host):
    assert _header_versions(host) == (2, 2)


def test_database_owner_and_mode_unchanged(host):
    db = host.file(DB)
    assert db.user == "crab" and db.group == "crab"
    assert db.mode == 0o640


def test_no_side_file_owned_by_anyone_but_crab(host):
    names = host.check_output(f"ls -1 {DB}-wal {DB}-shm {DB}-journal 2>/dev/null || true").split()
    assert f"{DB}-wal" in names  # the stand-in is writing in WAL mode right now
    for name in names:
        assert host.file(name).user == "crab", name


def test_config_file(host):
    conf = host.file(CONF)
    assert (conf.user, conf.group, conf.mode) == ("root", "crab", 0o640)
    lines = set(conf.content_string.splitlines())
    assert {"SQLITE_BUSY_TIMEOUT_MS=5000", "SQLITE_SYNCHRONOUS=NORMAL", "SQLITE_FOREIGN_KEYS=ON"} <= lines


def test_every_connection_reports_the_configured_settings(host):
    conf_mtime = host.file(CONF).mtime.timestamp()
    files = host.check_output(f"ls -1 {STATUS_DIR}/*.json").split()
    roles = set()
    for path in files:
        report = json.loads(host.file(path).content_string)
        assert host.file(f"/proc/{report['pid']}").exists, f"{path}: process gone"
        assert host.file(path).mtime.timestamp() >= conf_mtime, f"{path} predates the config"
        pragmas = report["pragmas"]
        assert pragmas["busy_timeout"] == 5000, path
        assert pragmas["journal_mode"] == "wal", path
        assert pragmas["synchronous"] == 1, path
        assert pragmas["foreign_keys"] == 1, path
        assert report["user"] == "crab", path
        roles.add(report["role"])
    assert roles == {"orders", "archiver", "api"}


def test_the_stand_in_keeps_committing_in_wal(host):
    # As crab, never root: a root sqlite3 could leave a root-owned -shm behind.
    query = "sudo -u crab sqlite3 /var/lib/crab/edge.db 'SELECT count(*) FROM orders'"
    first = int(host.check_output(query))
    host.check_output("sleep 2")
    assert int(host.check_output(query)) > first
