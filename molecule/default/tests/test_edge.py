"""Real state of the lab's store hosts after site.yml, read over SSH by testinfra (molecule/default)."""

testinfra_hosts = ["edge1", "edge2"]


def test_edge_database_is_wal_and_owned_by_the_app(host):
    header = host.check_output("od -An -tx1 -j18 -N2 /var/lib/crab/edge.db").split()
    assert header == ["02", "02"]
    for suffix in ("", "-wal", "-shm"):
        f = host.file("/var/lib/crab/edge.db" + suffix)
        if f.exists:
            assert f.user == "crab", suffix


def test_app_config_sets_busy_timeout(host):
    assert host.file("/etc/crab/edge-server.conf").contains("^SQLITE_BUSY_TIMEOUT_MS=5000$")
