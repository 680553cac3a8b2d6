"""module_utils/crab_backup.py against a real PostgreSQL 15 and a real S3 server (SeaweedFS): the happy path, every
fault of the matrix that can be produced without the lab, restore, drill, retention and the cron CLI."""

import datetime as dt
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from module_utils.crab_backup import (
    BackupConfig,
    BackupError,
    BackupRunner,
    Restorer,
    RetentionPolicy,
    RunLock,
    fresh_backup,
    multipart_etag,
    parse_backup_name,
    part_size_for,
    read_state,
    verify_archive,
)
from tests.unit.test_backup_fixtures import (
    BUCKET,
    DEAD_PORT,
    PG_PORT,
    REPO,
    backup_cfg,
    pg_server,
    s3_server,
)

UTC = dt.UTC
# pytest finds fixtures by name in this module's namespace: these imports are how the tests get them.
FIXTURES = (backup_cfg, pg_server, s3_server)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _local_backups(cfg: BackupConfig) -> dict[str, bytes]:
    base = Path(cfg.local_dir)
    if not base.exists():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).digest() for p in base.iterdir() if ".dump." in p.name}


@pytest.fixture
def good_backup(backup_cfg):
    """One successful backup exists (local and remote) before the fault is injected."""
    result = BackupRunner(backup_cfg).run()
    time.sleep(1.05)  # the next run gets a different second in its name
    return result


def _assert_fault_left_no_trace(cfg: BackupConfig, s3_server, before_local, before_remote, good, message):
    """The contract of every fault: loud message, no new final object, nothing good deleted, failure recorded."""
    assert s3_server.keys(cfg.prefix) == before_remote, "a failed run changed the objects in S3"
    assert _local_backups(cfg) == before_local, "a failed run changed the local backups"
    assert not [p for p in Path(cfg.local_dir).iterdir() if p.name.endswith(".partial")], "partial file left"
    state = read_state(cfg.state_file)
    assert state["last_status"] == "failed"
    assert state["error"] == message
    assert state["key"] == good.key, "the failure overwrote the record of the last good backup"
    assert state["last_success"] <= state["last_failure"]


# ---------------------------------------------------------------------------------------------- happy path
def test_backup_writes_verified_private_archive_and_object(backup_cfg, s3_server):
    result = BackupRunner(backup_cfg).run()
    path = Path(result.local_path)
    assert path.name == Path(result.key).name
    assert parse_backup_name("crab", path.name) is not None
    assert _mode(backup_cfg.local_dir) == 0o700
    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert data[:4] == b"\x28\xb5\x2f\xfd", "not a zstd frame"
    assert hashlib.sha256(data).hexdigest() == result.sha256
    assert result.raw_size > result.size > 0
    obj = s3_server.client().get_object(Bucket=BUCKET, Key=result.key)
    body = obj["Body"].read()
    assert hashlib.sha256(body).hexdigest() == result.sha256
    assert obj["Metadata"]["sha256"] == result.sha256
    assert obj["ServerSideEncryption"] == "AES256"
    assert result.etag_verified, "S3 returned an MD5 ETag: the content check must have run"
    state = read_state(backup_cfg.state_file)
    assert state["last_status"] == "ok"
    assert state["key"] == result.key
    assert state["sha256"] == result.sha256
    assert state["size"] == result.size
    assert state["error"] is None
    assert _mode(backup_cfg.state_file) == 0o600
    # the archive is stock pg_dump custom format: pg_restore lists the seeded tables
    listing = subprocess.run(
        f"zstd -dc {path} | pg_restore --list", shell=True, capture_output=True, text=True, check=True
    ).stdout
    assert "TABLE DATA public orders" in listing
    assert "TABLE DATA public event_log" in listing


def test_gzip_fallback_produces_a_restorable_archive(backup_cfg):
    cfg = replace(backup_cfg, compressor="gzip")
    result = BackupRunner(cfg).run()
    assert result.key.endswith(".dump.gz")
    assert Path(result.local_path).read_bytes()[:2] == b"\x1f\x8b"
    verify_archive(result.local_path, "gzip")


def test_password_never_in_argv(backup_cfg):
    argv = BackupRunner(replace(backup_cfg, container="crab-postgres")).pg.dump_argv()
    assert argv[1:6] == ["exec", "-i", "-e", "PGPASSWORD", "crab-postgres"]
    assert "-t" not in argv and "-it" not in argv
    assert backup_cfg.db_password not in " ".join(argv)
    assert argv[argv.index("-h") : argv.index("-h") + 2] == ["-h", "127.0.0.1"]


# ---------------------------------------------------------------------------------------------- faults
def _run_fault(cfg, s3_server, good, match):
    before_local, before_remote = _local_backups(cfg), s3_server.keys(cfg.prefix)
    with pytest.raises(BackupError, match=match) as err:
        BackupRunner(cfg).run()
    _assert_fault_left_no_trace(cfg, s3_server, before_local, before_remote, good, str(err.value))
    return str(err.value)


def test_fault_postgres_stopped(backup_cfg, s3_server, good_backup):
    msg = _run_fault(replace(backup_cfg, db_port=DEAD_PORT), s3_server, good_backup, r"^pg_dump of database crab")
    assert "exited 1" in msg and "Connection refused" in msg


def test_fault_wrong_password(backup_cfg, s3_server, good_backup):
    msg = _run_fault(replace(backup_cfg, db_password="wrong"), s3_server, good_backup, r"^pg_dump of database crab")
    assert "password authentication failed" in msg


def test_fault_permission_denied_on_one_table(backup_cfg, pg_server, s3_server):
    pg_server.admin("DROP DATABASE IF EXISTS crabperm; CREATE DATABASE crabperm OWNER crab;")
    pg_server.sql("crabperm", "CREATE TABLE ok_t AS SELECT g FROM generate_series(1, 1000) g;")
    cfg = replace(backup_cfg, db_name="crabperm", name="crabperm")
    good = BackupRunner(cfg).run()
    time.sleep(1.05)
    pg_server.admin("CREATE TABLE secret_t (x int); INSERT INTO secret_t VALUES (1);", db="crabperm")
    msg = _run_fault(cfg, s3_server, good, r"^pg_dump of database crabperm")
    assert "permission denied" in msg


def test_fault_pg_dump_killed_mid_dump(backup_cfg, pg_server, s3_server, good_backup):
    """pg_dump blocks on a lock held by another session; we SIGKILL it while it runs."""
    holder = subprocess.Popen(
        ["psql", "-h", str(pg_server.sock), "-p", str(PG_PORT), "-U", "postgres", "-d", "crab", "-X", "-q"],
        stdin=subprocess.PIPE,
        text=True,
    )
    holder.stdin.write("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(30);\n")
    holder.stdin.flush()
    time.sleep(0.5)
    errors: list = []

    def run():
        try:
            BackupRunner(backup_cfg).run()
        except BackupError as exc:
            errors.append(str(exc))

    before_local, before_remote = _local_backups(backup_cfg), s3_server.keys(backup_cfg.prefix)
    worker = threading.Thread(target=run)
    worker.start()
    pid = None
    deadline = time.monotonic() + 20
    while pid is None and time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if cmd[0].endswith(b"pg_dump") and str(PG_PORT).encode() in cmd:
                    pid = int(entry)
        time.sleep(0.1)
    assert pid, "pg_dump never started"
    time.sleep(0.3)
    os.kill(pid, 9)
    worker.join(30)
    # the server keeps the lock until the sleeping backend is gone: end it, not just the client
    pg_server.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()"
    )
    holder.kill()
    holder.wait()
    assert errors and "was killed by signal 9" in errors[0], errors
    _assert_fault_left_no_trace(backup_cfg, s3_server, before_local, before_remote, good_backup, errors[0])


def test_fault_table_locked_longer_than_the_dump_waits(backup_cfg, pg_server, s3_server, good_backup):
    holder = subprocess.Popen(
        ["psql", "-h", str(pg_server.sock), "-p", str(PG_PORT), "-U", "postgres", "-d", "crab", "-X", "-q"],
        stdin=subprocess.PIPE,
        text=True,
    )
    holder.stdin.write("BEGIN; LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(20);\n")
    holder.stdin.flush()
    time.sleep(0.5)
    try:
        started = time.monotonic()
        msg = _run_fault(replace(backup_cfg, dump_lock_timeout_s=1), s3_server, good_backup, r"^pg_dump of database")
        assert time.monotonic() - started < 15
        assert "statement timeout" in msg and "LOCK TABLE public.tenants" in msg
    finally:
        pg_server.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE '%pg_sleep(20)%' AND pid <> pg_backend_pid()"
        )
        holder.kill()
        holder.wait()


def test_fault_s3_unreachable(backup_cfg, s3_server, good_backup):
    cfg = replace(backup_cfg, endpoint_url=f"http://127.0.0.1:{DEAD_PORT}")
    started = time.monotonic()
    msg = _run_fault(cfg, s3_server, good_backup, r"S3 endpoint http://127.0.0.1:28199 is unreachable")
    assert time.monotonic() - started < 30
    assert "backup_s3_endpoint" in msg


def test_fault_wrong_s3_secret(backup_cfg, s3_server, good_backup):
    msg = _run_fault(replace(backup_cfg, secret_key="wrong"), s3_server, good_backup, r"access denied")
    assert "backup_s3_secret_key" in msg


def test_fault_wrong_s3_access_key(backup_cfg, s3_server, good_backup):
    _run_fault(replace(backup_cfg, access_key="AKNOBODY"), s3_server, good_backup, r"access denied")


def test_fault_bucket_missing(backup_cfg, s3_server, good_backup):
    cfg = replace(backup_cfg, bucket="no-such-bucket")
    before = s3_server.keys(cfg.prefix)
    with pytest.raises(BackupError, match=r"the bucket no-such-bucket does not exist") as err:
        BackupRunner(cfg).run()
    assert s3_server.keys(cfg.prefix) == before
    assert read_state(cfg.state_file)["error"] == str(err.value)


def test_fault_disk_full(backup_cfg, s3_server, good_backup, tmp_path):
    small = tmp_path / "tiny"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "crab-bk-tmpfs", str(small)], check=True)
    try:
        cfg = replace(backup_cfg, local_dir=str(small))
        before_remote = s3_server.keys(cfg.prefix)
        with pytest.raises(BackupError, match=r"the disk is full") as err:
            BackupRunner(cfg).run()
        assert s3_server.keys(cfg.prefix) == before_remote
        assert [p.name for p in small.iterdir() if not p.name.startswith(".")] == []
        assert read_state(cfg.state_file)["error"] == str(err.value)
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_fault_two_runs_at_once(backup_cfg, s3_server, good_backup):
    with RunLock(os.path.join(backup_cfg.local_dir, ".lock")):
        msg = _run_fault(backup_cfg, s3_server, good_backup, r"^Another backup or restore holds")
    assert str(os.getpid()) in msg


def test_second_run_waits_for_the_lock_when_told(backup_cfg):
    cfg = replace(backup_cfg, lock_wait_s=10)
    lock = RunLock(os.path.join(cfg.local_dir, ".lock"))
    lock.__enter__()
    threading.Timer(1.0, lock.__exit__, args=(None, None, None)).start()
    started = time.monotonic()
    result = BackupRunner(cfg).run()
    assert time.monotonic() - started >= 1.0
    assert result.sha256


def test_truncated_archive_fails_verification(backup_cfg, good_backup, tmp_path):
    data = Path(good_backup.local_path).read_bytes()
    cut = tmp_path / "cut.dump.zst"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackupError, match=r"does not decompress .*truncated or corrupt"):
        verify_archive(str(cut), "zstd")
    # a complete compressed stream of a truncated dump: zstd is happy, pg_restore is not (what --list misses)
    raw = subprocess.run(["zstd", "-dc", good_backup.local_path], capture_output=True, check=True).stdout
    half = tmp_path / "half.dump.zst"
    half.write_bytes(subprocess.run(["zstd", "-c"], input=raw[: len(raw) * 2 // 3], capture_output=True).stdout)
    listing = subprocess.run(["pg_restore", "--list"], input=raw[: len(raw) * 2 // 3], capture_output=True)
    assert listing.returncode == 0, "pg_restore --list accepted the truncated dump (which is why it is not enough)"
    with pytest.raises(BackupError, match=r"pg_restore cannot read the archive .* to the end"):
        verify_archive(str(half), "zstd")


def test_not_a_dump_fails_verification(tmp_path):
    junk = tmp_path / "junk.dump.zst"
    junk.write_bytes(subprocess.run(["zstd", "-c"], input=b"hello", capture_output=True).stdout)
    with pytest.raises(BackupError, match=r"is not a pg_dump custom-format archive"):
        verify_archive(str(junk), "zstd")


# ---------------------------------------------------------------------------------------------- retention
def test_retention_deletes_only_own_old_keys_after_success(backup_cfg, s3_server):
    client = s3_server.client()
    p = backup_cfg.prefix
    foreign = [
        f"{p}notes.txt",
        f"{p}sub/crab-20200101T000000Z.dump.zst",
        f"{p}other-20200101T000000Z.dump.zst",
        f"{p}crab-20200101T000000Z.dump.zst.partial",
        f"x{p}crab-20200101T000000Z.dump.zst",
    ]
    own_old = [f"{p}crab-2020010{d}T000000Z.dump.zst" for d in range(1, 5)]
    for key in foreign + own_old:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    local = Path(backup_cfg.local_dir)
    local.mkdir(mode=0o700)
    for d in range(1, 4):
        (local / f"crab-2020010{d}T000000Z.dump.zst").write_bytes(b"old")
    (local / "keep-me.txt").write_bytes(b"mine")
    # a failed run deletes nothing
    with pytest.raises(BackupError):
        BackupRunner(replace(backup_cfg, db_password="wrong", keep_remote=2, keep_local=1)).run()
    assert set(own_old) <= set(s3_server.keys(p))
    assert len([x for x in local.iterdir() if not x.name.startswith(".")]) == 4
    result = BackupRunner(replace(backup_cfg, keep_remote=2, keep_local=1)).run()
    remaining = set(s3_server.keys(p)) | set(s3_server.keys(f"x{p}"))
    assert remaining == set(foreign) | {own_old[-1], result.key}
    assert sorted(result.deleted_remote) == own_old[:-1]
    assert sorted(x.name for x in local.iterdir() if not x.name.startswith(".")) == sorted(
        ["keep-me.txt", Path(result.local_path).name]
    )


def test_retention_policy_tiers_and_newest_always_kept():
    t0 = dt.datetime(2026, 1, 31, 2, 0, tzinfo=UTC)
    items = [(f"b{i}", t0 - dt.timedelta(days=i)) for i in range(120)]
    keep = RetentionPolicy(last=2, daily=7, weekly=4, monthly=6).keep(items)
    assert {"b0", "b1"} <= keep
    assert {f"b{i}" for i in range(7)} <= keep
    months = {(when.year, when.month) for ident, when in items if ident in keep}
    assert len(months) == 4  # 120 days span Jan..Oct/Nov: monthly keeps the newest of each of the 6 newest months
    assert len(keep) <= 2 + 7 + 4 + 6
    assert RetentionPolicy(last=0).keep(items) == {"b0"}
    assert RetentionPolicy(last=1).plan([("only", t0)]) == []


def test_part_size_scales_with_size():
    assert part_size_for(1) == 8 * 1024 * 1024
    big = 80 * 1024**3
    assert -(-big // part_size_for(big)) <= 9000
    five_tib = 5 * 1024**4
    assert -(-five_tib // part_size_for(five_tib)) <= 10000


def test_multipart_etag_matches_s3(backup_cfg, s3_server, tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(9 * 1024 * 1024))
    from boto3.s3.transfer import TransferConfig

    s3_server.client().upload_file(
        str(blob),
        BUCKET,
        f"{backup_cfg.prefix}blob",
        Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024),
    )
    etag = s3_server.client().head_object(Bucket=BUCKET, Key=f"{backup_cfg.prefix}blob")["ETag"].strip('"')
    assert etag == multipart_etag(str(blob), 5 * 1024 * 1024)
    assert etag.endswith("-2")


def test_fresh_backup_window():
    now = dt.datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert fresh_backup({"last_success": "2026-05-01T02:00:00Z"}, 20, now)
    assert not fresh_backup({"last_success": "2026-04-30T02:00:00Z"}, 20, now)
    assert not fresh_backup({"last_success": "2026-05-01T02:00:00Z"}, 0, now)
    assert not fresh_backup({"last_failure": "2026-05-01T02:00:00Z"}, 20, now)
    assert not fresh_backup({"last_success": "garbage"}, 20, now)


def test_config_validation_messages():
    for bad, match in (
        ({"compressor": "xz"}, "Invalid compressor"),
        ({"sse": "rot13"}, "Invalid sse"),
        ({"prefix": "pg"}, "must end with '/'"),
        ({"bucket": ""}, "set backup_s3_bucket"),
        ({"dump_lock_timeout_s": -5}, "Invalid dump_lock_timeout_s -5"),
        ({"name": "a b"}, "Invalid backup name"),
        ({"keep_remote": 0}, "Invalid retention"),
        ({"access_key": "only"}, "set both access_key and secret_key"),
        ({"surprise": 1}, "unknown key"),
    ):
        with pytest.raises(BackupError, match=match):
            BackupConfig.from_dict(bad)
    assert BackupConfig(db_password="pw", secret_key="s", access_key="a").public()["db_password"] == "********"


# ---------------------------------------------------------------------------------------------- restore / drill
def test_restore_newest_into_new_db_and_refuse_non_empty(backup_cfg, pg_server, good_backup):
    pg_server.admin("DROP DATABASE IF EXISTS crab_restored;")
    restorer = Restorer(backup_cfg)
    out = restorer.restore("crab_restored")
    assert out["key"] == good_backup.key
    assert pg_server.sql("crab_restored", "SELECT count(*) FROM orders;") == "60000"
    with pytest.raises(BackupError, match=r"^Database crab_restored is not empty; refusing"):
        restorer.restore("crab_restored")
    pg_server.sql("crab_restored", "DELETE FROM orders WHERE id <= 10;")
    restorer.restore("crab_restored", key=Path(good_backup.key).name, force=True)
    assert pg_server.sql("crab_restored", "SELECT count(*) FROM orders;") == "60000"
    pg_server.admin("DROP DATABASE crab_restored;")


def test_restore_refuses_corrupt_object(backup_cfg, s3_server, good_backup):
    client = s3_server.client()
    body = client.get_object(Bucket=BUCKET, Key=good_backup.key)["Body"].read()
    client.put_object(
        Bucket=BUCKET, Key=good_backup.key, Body=body[:-10] + b"0123456789", Metadata={"sha256": good_backup.sha256}
    )
    with pytest.raises(BackupError, match=r"the object is corrupt"):
        Restorer(backup_cfg).restore("crab_corrupt_target")


def test_restore_stops_on_first_sql_error(backup_cfg, pg_server, good_backup):
    pg_server.admin("DROP DATABASE IF EXISTS crab_clash; CREATE DATABASE crab_clash OWNER crab;")
    # a type named like a table holds no relation (so the target counts as empty) but makes CREATE TABLE fail
    pg_server.sql("crab_clash", "CREATE TYPE public.tenants AS ENUM ('a');")
    with pytest.raises(BackupError, match=r"^pg_restore into database crab_clash stopped at the first error") as err:
        Restorer(backup_cfg).restore("crab_clash")
    assert "already exists" in str(err.value)
    # --exit-on-error: nothing after the failing CREATE TABLE ran (data is loaded after every table is created)
    assert pg_server.admin("SELECT count(*) FROM orders;", db="crab_clash") == "0"
    pg_server.admin("DROP DATABASE crab_clash;")


def test_drill_passes_then_detects_divergence(backup_cfg, pg_server, good_backup):
    report = Restorer(backup_cfg).drill()
    assert report["ok"], report
    assert report["key"] == good_backup.key
    assert report["counts"]["public.orders"] == 60000
    assert report["counts"]["public.event_log"] == 500
    assert report["event_log_head_match"] and report["event_log_head"]
    assert pg_server.admin(f"SELECT count(*) FROM pg_database WHERE datname = '{report['scratch_db']}';") == "0"
    pg_server.sql("crab", "INSERT INTO tenants (name) VALUES ('late');")
    try:
        report = Restorer(backup_cfg).drill()
    finally:
        pg_server.sql("crab", "DELETE FROM tenants WHERE name = 'late';")
    assert not report["ok"]
    assert report["mismatches"] == {"public.tenants": {"source": 21, "restored": 20}}


def test_drill_without_any_backup_says_what_to_do(backup_cfg):
    with pytest.raises(BackupError, match=r"^No backup found under .* run playbooks/backup-now.yml first"):
        Restorer(backup_cfg).drill()


# ---------------------------------------------------------------------------------------------- cron CLI
def test_cli_under_cron_bare_environment(backup_cfg, tmp_path, s3_server):
    conf = tmp_path / "backup.json"
    data = asdict(backup_cfg)
    conf.write_text(json.dumps(data))
    conf.chmod(0o600)
    cli = REPO / "roles" / "backup" / "files" / "crab-backup"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "crab_backup.py").write_bytes((REPO / "module_utils" / "crab_backup.py").read_bytes())
    # exactly cron's environment: PATH=/usr/bin:/bin, no HOME, no profile; CRAB_OPS_LIB points at the copy
    env = {"PATH": "/usr/bin:/bin", "CRAB_OPS_LIB": str(lib)}
    run = subprocess.run([sys.executable, str(cli), "--config", str(conf)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "crab-backup: ok s3://crab-backups/" in run.stdout
    state = read_state(backup_cfg.state_file)
    assert state["key"] in s3_server.keys(backup_cfg.prefix)
    again = subprocess.run(
        [sys.executable, str(cli), "--config", str(conf), "--max-age-hours", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout
    conf.chmod(0o644)
    loose = subprocess.run([sys.executable, str(cli), "--config", str(conf)], env=env, capture_output=True, text=True)
    assert loose.returncode == 1 and "readable by others; chmod 0600" in loose.stderr
    conf.chmod(0o600)
    data["db_password"] = "wrong"
    conf.write_text(json.dumps(data))
    bad = subprocess.run([sys.executable, str(cli), "--config", str(conf)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED: pg_dump of database crab" in bad.stderr
