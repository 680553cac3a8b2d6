"""The lab itself is real: SSH by key to three hosts, the compose project, a seeded PostgreSQL with password auth,
an S3 that checks keys and encrypts, loopback-only ports, and edge stand-ins writing as crab."""

import hashlib
import json
import subprocess
import time
import urllib.request

import pytest
from botocore.exceptions import ClientError

HOSTS = ("cloud1", "edge1", "edge2")
MIB = 1024 * 1024
# Print every status report of a stand-in's run dir as one JSON list on one line.
REPORTS = (
    "\npython3 -c 'import glob, json, sys;"
    ' print(json.dumps([json.load(open(f)) for f in glob.glob(sys.argv[1])]))\' "{run}/*.json"\n'
)


@pytest.mark.parametrize("host", HOSTS)
def test_ssh_by_lab_key_as_root_with_python(lab, host):
    proc = lab.ssh(host, "id -un; python3 -c 'import sys; print(sys.version_info[0])'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["root", "3"]


def test_ssh_rejects_another_key(lab, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    proc = lab.ssh("edge1", "true", key=other)
    assert proc.returncode == 255
    assert "Permission denied" in proc.stderr


def test_ssh_checks_host_keys(lab, tmp_path):
    wrong = tmp_path / "known_hosts"
    # edge2's key recorded for edge1's address: ssh must refuse to connect.
    edge2_key = lab.known_hosts.read_text().splitlines()[2].split(" ", 1)[1]
    wrong.write_text(f"[127.0.0.1]:2222 {edge2_key}\n")
    args = [
        a if not a.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={wrong}" for a in lab.ssh_args("edge1")
    ]
    proc = subprocess.run([*args, "true"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in proc.stderr or "verification failed" in proc.stderr


def test_compose_project_runs_in_cloud1(lab):
    proc = lab.ssh(
        "cloud1",
        "cd /opt/crab && docker compose ps --format json && stat -c '%a %U' /opt/crab/.env"
        " && grep -c -E '^\\s+(logging|healthcheck):' docker-compose.yml || true",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    services = {json.loads(line)["Service"]: json.loads(line) for line in lines if line.startswith("{")}
    assert set(services) == {"postgres", "api"}
    assert all(s["State"] == "running" for s in services.values()), services
    assert "600 root" in lines
    for name in ("crab-postgres", "crab-cloud"):
        container = lab.docker.containers.get(name)
        assert container.labels["com.docker.compose.project"] == "crab"
        assert container.status == "running"


def test_api_health_returns_only_a_git_hash(lab):
    with urllib.request.urlopen(lab.api_url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert list(body) == ["git"]
    assert len(body["git"]) == 40
    int(body["git"], 16)


def test_db_seeded_to_size_with_realistic_tables(lab, crab_lab_seed_mb):
    size = int(lab.psql("SELECT pg_database_size('crab')"))
    assert size >= crab_lab_seed_mb * MIB, f"{size / MIB:.0f} MiB < {crab_lab_seed_mb} MiB"
    counts = dict(
        line.split("|")
        for line in lab.psql(
            "SELECT 'tenants', count(*) FROM tenants UNION ALL SELECT 'stores', count(*) FROM stores"
            " UNION ALL SELECT 'products', count(*) FROM products UNION ALL SELECT 'orders', count(*) FROM orders"
            " UNION ALL SELECT 'order_items', count(*) FROM order_items"
            " UNION ALL SELECT 'payments', count(*) FROM payments UNION ALL SELECT 'event_log', count(*) FROM event_log"
        ).splitlines()
    )
    counts = {k: int(v) for k, v in counts.items()}
    assert counts["tenants"] > 0 and counts["stores"] > 0 and counts["products"] > 0
    assert counts["order_items"] == 3 * counts["orders"]
    assert 0 < counts["payments"] <= counts["orders"]
    assert counts["event_log"] == counts["orders"]
    # crab owns the database but is no superuser (the backup faults need permissions that can be denied).
    assert lab.psql("SELECT rolsuper, rolcreatedb FROM pg_roles WHERE rolname = 'crab'") == "f|t"


def test_event_log_hash_chain_verifies_independently(lab):
    rows = lab.psql(
        "SELECT id, prev_hash, hash, kind, payload::text,"
        " to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
        " FROM event_log WHERE id <= 500 ORDER BY id"
    ).splitlines()
    assert len(rows) == 500
    prev = "0" * 64
    for row in rows:
        ident, prev_hash, digest, kind, payload, at = row.split("|")
        assert prev_hash == prev, f"event {ident}: chain broken"
        expected = hashlib.sha256(f"{prev_hash}|{ident}|{at}|{kind}|{payload}".encode()).hexdigest()
        assert digest == expected, f"event {ident}: hash does not match its content"
        prev = digest
    # The whole chain, checked in the database: every link and every hash.
    bad = lab.psql(
        "SELECT count(*) FROM event_log e LEFT JOIN event_log p ON p.id = e.id - 1"
        " WHERE e.prev_hash <> coalesce(p.hash, repeat('0', 64))"
        " OR e.hash <> event_log_hash(e.prev_hash, e.id, e.occurred_at, e.kind, e.payload)"
    )
    assert bad == "0"


def test_event_log_is_append_only(lab):
    proc = lab.psql("UPDATE event_log SET kind = 'x' WHERE id = 1", check=False)
    assert proc.returncode != 0
    assert "append-only" in proc.stderr


def test_postgres_rejects_a_wrong_password(lab):
    proc = lab.psql("SELECT 1", password="not-the-password", check=False)
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    assert lab.psql("SELECT 1") == "1"


def test_s3_accepts_the_lab_key_and_encrypts(lab):
    s3 = lab.s3()
    key = f"lab-test/{time.time_ns()}.bin"
    data = b"crab-lab " * 1000
    s3.put_object(Bucket=lab.s3_bucket, Key=key, Body=data, ServerSideEncryption="AES256")
    try:
        head = s3.head_object(Bucket=lab.s3_bucket, Key=key)
        assert head["ContentLength"] == len(data)
        assert head.get("ServerSideEncryption") == "AES256"
        assert s3.get_object(Bucket=lab.s3_bucket, Key=key)["Body"].read() == data
    finally:
        s3.delete_object(Bucket=lab.s3_bucket, Key=key)


@pytest.mark.parametrize("which", ["secret", "access"])
def test_s3_rejects_a_wrong_key(lab, which):
    wrong = {"secret": {"secret_key": lab.s3_secret_key + "x"}, "access": {"access_key": "AKIANOTTHELABKEY0000"}}
    s3 = lab.s3(**wrong[which])
    with pytest.raises(ClientError) as err:
        s3.list_objects_v2(Bucket=lab.s3_bucket)
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"}
    with pytest.raises(ClientError):
        s3.put_object(Bucket=lab.s3_bucket, Key="lab-test/denied", Body=b"x")


def test_every_published_port_is_on_loopback(lab):
    containers = lab.docker.containers.list(filters={"label": "crab-lab=1"})
    containers += lab.docker.containers.list(filters={"label": "com.docker.compose.project=crab"})
    assert {c.name for c in containers} >= {"crab-lab-cloud1", "crab-lab-edge1", "crab-lab-edge2", "crab-postgres"}
    published = 0
    for container in containers:
        for bindings in (container.attrs["NetworkSettings"]["Ports"] or {}).values():
            for binding in bindings or []:
                published += 1
                assert binding["HostIp"] == "127.0.0.1", f"{container.name} publishes {binding}"
    assert published >= 3  # edge1 ssh, edge2 ssh, crab-cloud
    # cloud1 shares the host network: its sshd must listen on 127.0.0.1 only.
    listen = lab.ssh("cloud1", "ss -Htln sport = :2221").stdout.split()
    assert [w for w in listen if w.endswith(":2221")] == ["127.0.0.1:2221"]
    # SeaweedFS started by the lab: every listening socket on 127.0.0.1.
    pid = (lab.dir / "s3" / "weed.pid").read_text().strip()
    sockets = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    weed = [line.split()[3] for line in sockets if f"pid={pid}," in line]
    assert "127.0.0.1:8333" in weed
    assert all(addr.startswith("127.0.0.1:") for addr in weed), weed


@pytest.mark.parametrize("host", ["edge1", "edge2"])
def test_edge_stand_in_writes_as_crab_and_reports_each_connection(lab, host):
    script = (
        "set -e; stat -c '%U' /var/lib/crab/edge.db;"
        " sqlite3 /var/lib/crab/edge.db 'SELECT count(*) FROM events';" + REPORTS.format(run="/run/crab/edge-server")
    )
    first = lab.ssh(host, script)
    assert first.returncode == 0, first.stderr
    owner, events, reports = first.stdout.strip().splitlines()
    assert owner == "crab"
    reports = json.loads(reports)
    assert len(reports) >= 3
    assert {r["role"] for r in reports} >= {"orders", "archiver", "api"}
    for report in reports:
        assert report["user"] == "crab" and report["uid"] != 0
        assert {"busy_timeout", "synchronous", "foreign_keys", "journal_mode"} <= set(report["pragmas"])
    time.sleep(3)
    second = lab.ssh(host, script)
    assert int(second.stdout.strip().splitlines()[1]) > int(events), "no new events in 3 s"
    # No file next to the DB belongs to root (the DB is never opened as root).
    owners = lab.ssh(host, "stat -c '%U %n' /var/lib/crab/edge.db*").stdout.split("\n")
    assert all(line.startswith("crab ") for line in owners if line.strip()), owners


def test_edge_stand_in_applies_every_setting(lab):
    """A private stand-in instance (own DB, config and run dir) on edge2: what it reports is what it was told."""
    conf = "\n".join(
        [
            "# test",
            "SQLITE_BUSY_TIMEOUT_MS=4321",
            "SQLITE_SYNCHRONOUS=NORMAL",
            "SQLITE_FOREIGN_KEYS=1",
            "SQLITE_CACHE_SIZE=-4096",
            "SQLITE_WAL_AUTOCHECKPOINT=500",
            "SQLITE_JOURNAL_SIZE_LIMIT=1048576",
            "SQLITE_TXN_MODE=immediate",
            "SQLITE_BUSY_RETRIES=3",
        ]
    )
    script = f"""
set -e
d=$(mktemp -d /tmp/crab-lab-es.XXXXXX); chown crab: "$d"; trap 'kill $pid 2>/dev/null; rm -rf "$d"' EXIT
printf '%s\\n' '{conf}' > "$d/conf"
export EDGE_SERVER_CONF="$d/conf" EDGE_SERVER_DB="$d/edge.db" EDGE_SERVER_RUN_DIR="$d/run" EDGE_SERVER_PID_FILE="$d/pid"
/usr/local/bin/edge-server 2>"$d/log" & pid=$!
for i in $(seq 50); do [ "$(ls "$d/run" 2>/dev/null | grep -c '[.]json$')" -ge 3 ] && break; sleep 0.2; done
stat -c '%U' "$d/edge.db"
""" + REPORTS.format(run="$d/run")
    proc = lab.ssh("edge2", script)
    assert proc.returncode == 0, proc.stderr
    owner, reports = proc.stdout.strip().splitlines()
    assert owner == "crab"
    reports = json.loads(reports)
    assert len(reports) == 3
    for report in reports:
        assert report["pragmas"]["busy_timeout"] == 4321
        assert report["pragmas"]["synchronous"] == 1
        assert report["pragmas"]["foreign_keys"] == 1
        assert report["pragmas"]["cache_size"] == -4096
        assert report["pragmas"]["wal_autocheckpoint"] == 500
        assert report["pragmas"]["journal_size_limit"] == 1048576
        assert report["pragmas"]["journal_mode"] == "delete"
        assert report["txn_mode"] == "IMMEDIATE"
        assert report["busy_retries"] == 3


def test_edge_server_ctl_restart_is_quick_and_replaces_every_writer(lab):
    before = lab.ssh("edge1", "ls /run/crab/edge-server/").stdout.split()
    start = time.monotonic()
    proc = lab.ssh("edge1", "edge-server-ctl restart && ls /run/crab/edge-server/")
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    after = proc.stdout.split()
    assert len(after) >= 3
    assert not set(before) & set(after), "a writer survived the restart"
    assert elapsed < 15


def test_host_image_runs_without_sshd_and_stops_fast(lab):
    """Molecule runs the host images with LAB_SSHD=0: cron (and on edge the stand-in) must still run."""
    name = "crab-lab-test-nosshd"
    with_sshd = None
    container = lab.docker.containers.run(
        "crab-lab/edge", name=name, detach=True, environment={"LAB_SSHD": "0"}, labels={"crab-lab": "1"}
    )
    try:
        for _ in range(50):
            procs = container.exec_run(["ps", "-eo", "comm"]).output.decode().split()
            if procs.count("python3") >= 4:
                break
            time.sleep(0.2)
        assert "cron" in procs
        assert "sshd" not in procs
        assert procs.count("python3") >= 4, procs  # supervisor + orders, archiver, api
        start = time.monotonic()
        container.stop(timeout=10)
        with_sshd = time.monotonic() - start
    finally:
        container.remove(force=True)
    assert with_sshd < 5, f"docker stop took {with_sshd:.1f}s: lab-init does not handle SIGTERM"


def test_lab_status_reports_ready(lab):
    proc = subprocess.run(
        ["bash", str(lab.repo / "lab" / "lab.sh"), "status"], capture_output=True, text=True, check=True
    )
    assert "ready: yes" in proc.stdout
    for name in ("crab-lab-cloud1", "crab-lab-edge1", "crab-lab-edge2", "crab-postgres", "crab-cloud"):
        assert name in proc.stdout


def test_postgres_image_initialises_and_stops_cleanly(lab):
    """A fresh crab-lab/postgres:15: crab is created with its password; `docker stop` is a clean, quick shutdown."""
    container = lab.docker.containers.run(
        "crab-lab/postgres:15",
        name="crab-lab-test-pg",
        detach=True,
        environment={"POSTGRES_USER": "crab", "POSTGRES_DB": "crab", "POSTGRES_PASSWORD": "test-pw"},
        labels={"crab-lab": "1"},
    )
    try:
        for _ in range(120):
            ready = container.exec_run(["pg_isready", "-q", "-h", "127.0.0.1", "-U", "crab", "-d", "crab"])
            if ready.exit_code == 0:
                break
            time.sleep(0.5)
        query = ["psql", "-h", "127.0.0.1", "-U", "crab", "-d", "crab", "-tAc", "SELECT current_user"]
        ok = container.exec_run(query, environment={"PGPASSWORD": "test-pw"})
        assert (ok.exit_code, ok.output.strip()) == (0, b"crab")
        bad = container.exec_run(query, environment={"PGPASSWORD": "wrong"})
        assert bad.exit_code != 0
        start = time.monotonic()
        container.stop(timeout=20)
        elapsed = time.monotonic() - start
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0
        assert b"database system is shut down" in container.logs()
        assert elapsed < 5, f"docker stop took {elapsed:.1f}s: postgres did not get the stop signal"
    finally:
        container.remove(force=True, v=True)
