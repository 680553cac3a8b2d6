"""module_utils.crab_sqlite on real SQLite files in tmp dirs: real locks, real permissions, real owners."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from module_utils.crab_sqlite import (
    ConnectionStatus,
    SqliteError,
    SqlitePragmas,
    normalize_setting,
    parse_header,
    read_header,
)

NOBODY = 65534


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _side_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "-"))


@pytest.fixture
def fresh_db(tmp_path: Path) -> Path:
    db = tmp_path / "fresh.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL)")
    conn.executemany("INSERT INTO orders (total) VALUES (?)", [(i,) for i in range(100)])
    conn.commit()
    conn.close()
    return db


@pytest.fixture
def open_tmp():
    """A temp dir other users can traverse (pytest's tmp_path base is 0700), for the tests that switch uid."""
    path = Path(tempfile.mkdtemp(prefix="crab-sq-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def chinook(tmp_path: Path, corpus_dir: Path) -> Path:
    db = tmp_path / "chinook.sqlite"
    shutil.copyfile(corpus_dir / "sqlite" / "chinook.sqlite", db)
    db.chmod(0o640)
    return db


def _run_as(uid: int, func) -> dict:
    """Run func() in a child process with uid/gid switched; return its result or its SqliteError message."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = {"result": func()}
            except SqliteError as exc:
                out = {"error": str(exc)}
            payload = json.dumps(out).encode()
        except BaseException as exc:  # report anything to the parent instead of dying silently
            payload = json.dumps({"crash": repr(exc)}).encode()
        os.write(write_fd, payload)
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks))
    assert "crash" not in out, out
    return out


# ---- header ---------------------------------------------------------------------------------------------------
def test_header_of_chinook_as_shipped(chinook: Path):
    header = read_header(str(chinook))
    assert header.journal_mode == "delete"
    assert header.page_size == 4096
    assert header.page_count * header.page_size == chinook.stat().st_size
    assert header.encoding == "UTF-8"
    assert header.auto_vacuum == "none"


def test_header_page_size_one_means_65536(fresh_db: Path):
    data = bytearray(fresh_db.read_bytes()[:100])
    data[16:18] = (1).to_bytes(2, "big")
    assert parse_header(bytes(data)).page_size == 65536


@pytest.mark.parametrize(
    ("offset", "value", "words"),
    [
        (16, b"\x03\x00", "page size 768"),
        (18, b"\x07", "file format versions 7/1"),
        (21, b"\x41", "payload fractions"),
        (56, b"\x00\x00\x00\x09", "text encoding 9"),
    ],
)
def test_corrupt_header_fields_are_named(fresh_db: Path, offset: int, value: bytes, words: str):
    data = bytearray(fresh_db.read_bytes()[:100])
    data[offset : offset + len(value)] = value
    with pytest.raises(SqliteError, match="header is corrupt") as err:
        parse_header(bytes(data), "x.db")
    assert words in str(err.value)


def test_truncated_header(fresh_db: Path):
    with pytest.raises(SqliteError, match="shorter than the 100-byte header"):
        parse_header(fresh_db.read_bytes()[:40], "x.db")


# ---- the switch on real files ------------------------------------------------------------------------------
def test_fresh_db_switches_to_wal_and_second_run_changes_nothing(fresh_db: Path):
    first = SqlitePragmas(str(fresh_db)).run("wal")
    assert first["changed"] is True
    assert first["before"]["journal_mode"] == "delete"
    assert first["after"]["journal_mode"] == "wal"
    raw = fresh_db.read_bytes()[:20]
    assert (raw[18], raw[19]) == (2, 2)
    assert first["health"]["journal_mode_header"] == "wal"
    assert first["health"]["checkpoint"]["wal_frames"] >= 0
    second = SqlitePragmas(str(fresh_db)).run("wal")
    assert second["changed"] is False
    assert second["before"] == second["after"] == first["after"]
    conn = sqlite3.connect(fresh_db)
    assert conn.execute("SELECT count(*), sum(total) FROM orders").fetchone() == (100, 4950)
    conn.close()


def test_chinook_copy_switches_keeps_data_owner_and_mode(chinook: Path):
    conn = sqlite3.connect(chinook)
    counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in ("Track", "Invoice", "Album")}
    conn.close()
    st = chinook.stat()
    result = SqlitePragmas(str(chinook), quick_check=True).run("wal")
    assert result["changed"] is True
    assert result["before"]["journal_mode"] == "delete" and result["after"]["journal_mode"] == "wal"
    assert read_header(str(chinook)).journal_mode == "wal"
    assert result["health"]["quick_check"] == {
        "ran": True,
        "ok": True,
        "timed_out": False,
        "seconds": result["health"]["quick_check"]["seconds"],
        "result": ["ok"],
    }
    assert result["health"]["page_count"] == 246
    assert result["health"]["freelist_ratio"] == 0.0
    now = chinook.stat()
    assert (now.st_uid, now.st_gid, now.st_mode) == (st.st_uid, st.st_gid, st.st_mode)
    conn = sqlite3.connect(chinook)
    assert {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in counts} == counts
    assert counts == {"Track": 3503, "Invoice": 412, "Album": 347}
    conn.close()


def test_switch_back_to_delete(fresh_db: Path):
    SqlitePragmas(str(fresh_db)).run("wal")
    result = SqlitePragmas(str(fresh_db)).run("delete")
    assert result["changed"] is True
    assert read_header(str(fresh_db)).journal_mode == "delete"
    assert _side_files(fresh_db) == []


def test_symlink_is_resolved_and_side_files_land_next_to_the_real_file(fresh_db: Path, tmp_path: Path):
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "edge.db").symlink_to(fresh_db)
    holder = sqlite3.connect(fresh_db)  # keeps -wal/-shm alive after the module's connection closes
    result = SqlitePragmas(str(link_dir / "edge.db")).run("wal")
    holder.execute("SELECT 1").fetchone()
    assert result["path"] == str(fresh_db)
    assert (link_dir / "edge.db").is_symlink()
    assert list(link_dir.iterdir()) == [link_dir / "edge.db"]
    holder.close()


def test_check_mode_reports_without_touching_the_file(chinook: Path):
    before = _digest(chinook)
    mtime = chinook.stat().st_mtime_ns
    result = SqlitePragmas(str(chinook), quick_check=True).run("wal", check_mode=True)
    assert result["changed"] is True
    assert result["after"]["journal_mode"] == "wal"
    assert result["health"]["journal_mode_header"] == "delete"
    assert result["health"]["quick_check"]["ok"] is True  # DELETE mode: a read-only open creates no file
    assert _digest(chinook) == before
    assert chinook.stat().st_mtime_ns == mtime
    assert _side_files(chinook) == []


def test_check_mode_on_wal_db_without_side_files_creates_none(fresh_db: Path):
    SqlitePragmas(str(fresh_db)).run("wal")
    assert _side_files(fresh_db) == []
    core = SqlitePragmas(str(fresh_db), quick_check=True)
    result = core.run("wal", check_mode=True)
    assert result["changed"] is False
    assert result["health"]["quick_check"]["ran"] is False
    assert any("quick_check skipped" in w for w in result["warnings"])
    assert _side_files(fresh_db) == []


def test_checkpoint_starvation_is_reported(fresh_db: Path):
    SqlitePragmas(str(fresh_db)).run("wal")
    reader = sqlite3.connect(fresh_db, isolation_level=None)
    writer = sqlite3.connect(fresh_db, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM orders").fetchone()  # snapshot pins the WAL from here
    for i in range(50):
        writer.execute("INSERT INTO orders (total) VALUES (?)", (i,))
    result = SqlitePragmas(str(fresh_db)).run("wal")
    cp = result["health"]["checkpoint"]
    assert cp["wal_frames"] >= 50
    assert cp["frames_behind"] == cp["wal_frames"] - cp["checkpointed_frames"] > 0
    assert result["health"]["wal_size_bytes"] > 0
    reader.execute("COMMIT")
    reader.close()
    writer.close()


def test_quick_check_time_limit(chinook: Path):
    result = SqlitePragmas(str(chinook), quick_check=True, quick_check_timeout_s=1e-9).run("wal")
    qc = result["health"]["quick_check"]
    assert qc["ran"] is True and qc["timed_out"] is True and qc["ok"] is None
    assert read_header(str(chinook)).journal_mode == "wal"


# ---- bad input: clear error, nothing changed ---------------------------------------------------------------
def test_not_a_sqlite_file(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_text("user=crab\npassword=not-in-the-error\n" * 10)
    before = _digest(path)
    with pytest.raises(SqliteError, match="not a SQLite 3 database") as err:
        SqlitePragmas(str(path)).run("wal")
    assert "not-in-the-error" not in str(err.value)
    assert _digest(path) == before
    assert _side_files(path) == []


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(SqliteError, match="empty"):
        SqlitePragmas(str(path)).run("wal")
    assert path.stat().st_size == 0
    assert _side_files(path) == []


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(SqliteError, match="does not exist"):
        SqlitePragmas(str(tmp_path / "nope.db")).run("wal")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SqliteError, match="not a regular file"):
        SqlitePragmas(str(tmp_path)).run("wal")


def test_corrupt_header_changes_nothing(fresh_db: Path):
    data = bytearray(fresh_db.read_bytes())
    data[21] = 0x41
    fresh_db.write_bytes(bytes(data))
    before = _digest(fresh_db)
    with pytest.raises(SqliteError, match="header is corrupt"):
        SqlitePragmas(str(fresh_db)).run("wal")
    assert _digest(fresh_db) == before
    assert _side_files(fresh_db) == []


def test_corrupt_body_changes_nothing(fresh_db: Path):
    data = bytearray(fresh_db.read_bytes())
    data[100:4096] = os.urandom(3996)  # page 1's b-tree (the schema) is garbage, the header is fine
    fresh_db.write_bytes(bytes(data))
    before = _digest(fresh_db)
    with pytest.raises(SqliteError, match=r"corrupt.*Restore it from a backup"):
        SqlitePragmas(str(fresh_db)).run("wal")
    assert _digest(fresh_db) == before
    assert read_header(str(fresh_db)).journal_mode == "delete"


def test_locked_file_waits_busy_timeout_then_fails_unchanged(fresh_db: Path):
    holder = sqlite3.connect(fresh_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    before = _digest(fresh_db)
    started = time.monotonic()
    with pytest.raises(SqliteError, match="busy timeout of 300 ms") as err:
        SqlitePragmas(str(fresh_db), busy_timeout_ms=300).run("wal")
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 5
    assert "Retry when the application is idle" in str(err.value)
    holder.execute("ROLLBACK")
    holder.close()
    assert _digest(fresh_db) == before
    assert read_header(str(fresh_db)).journal_mode == "delete"


def test_switch_succeeds_when_lock_is_released_within_busy_timeout(fresh_db: Path):
    holder = sqlite3.connect(fresh_db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    timer.start()
    result = SqlitePragmas(str(fresh_db), busy_timeout_ms=5000).run("wal")
    timer.join()
    holder.close()
    assert result["changed"] is True
    assert read_header(str(fresh_db)).journal_mode == "wal"


def test_read_only_directory_fails_before_anything_changes(open_tmp: Path, fresh_db: Path):
    ro_dir = open_tmp / "ro"
    ro_dir.mkdir()
    db = ro_dir / "edge.db"
    shutil.copyfile(fresh_db, db)
    os.chown(db, NOBODY, NOBODY)
    ro_dir.chmod(0o555)
    before = _digest(db)
    out = _run_as(NOBODY, lambda: SqlitePragmas(str(db)).run("wal"))
    assert "directory" in out["error"] and "not writable" in out["error"]
    assert _digest(db) == before
    assert _side_files(db) == []
    # check mode on the same file is fine: it needs no write access
    out = _run_as(NOBODY, lambda: SqlitePragmas(str(db)).run("wal", check_mode=True))
    assert out["result"]["changed"] is True
    assert _digest(db) == before


def test_runs_as_the_owner_and_leaves_side_files_owned_by_the_owner(open_tmp: Path, fresh_db: Path):
    data_dir = open_tmp / "crab"
    data_dir.mkdir()
    db = data_dir / "edge.db"
    shutil.copyfile(fresh_db, db)
    os.chown(data_dir, NOBODY, NOBODY)
    os.chown(db, NOBODY, NOBODY)
    db.chmod(0o640)
    holder = sqlite3.connect(db)  # a running app keeps -wal/-shm around
    out = _run_as(NOBODY, lambda: SqlitePragmas(str(db)).run("wal"))
    holder.execute("SELECT count(*) FROM orders").fetchone()
    assert out["result"]["changed"] is True
    for name in _side_files(db):
        assert (data_dir / name).stat().st_uid == NOBODY, name
    st = db.stat()
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (NOBODY, NOBODY, "0o640")
    holder.close()


def test_wrong_user_is_refused_with_become_user_hint(fresh_db: Path):
    os.chown(fresh_db, NOBODY, NOBODY)
    before = _digest(fresh_db)
    with pytest.raises(SqliteError, match="become_user: nobody"):
        SqlitePragmas(str(fresh_db)).run("wal")
    with pytest.raises(SqliteError, match="become_user: nobody"):
        SqlitePragmas(str(fresh_db)).run("wal", check_mode=True)
    assert _digest(fresh_db) == before
    assert _side_files(fresh_db) == []


def test_foreign_owned_side_file_is_refused(fresh_db: Path):
    shm = fresh_db.parent / (fresh_db.name + "-shm")
    shm.write_bytes(b"")
    os.chown(shm, NOBODY, NOBODY)
    with pytest.raises(SqliteError, match="-shm is owned by nobody"):
        SqlitePragmas(str(fresh_db)).run("wal")
    assert read_header(str(fresh_db)).journal_mode == "delete"


def test_read_only_file_in_writable_dir(open_tmp: Path, fresh_db: Path):
    db = open_tmp / "edge.db"
    shutil.copyfile(fresh_db, db)
    os.chown(open_tmp, NOBODY, NOBODY)
    os.chown(db, NOBODY, NOBODY)
    db.chmod(0o444)
    out = _run_as(NOBODY, lambda: SqlitePragmas(str(db)).run("wal"))
    assert "the file is not writable" in out["error"]
    assert read_header(str(db)).journal_mode == "delete"
    assert _side_files(db) == []


@pytest.mark.parametrize(
    ("kwargs", "mode", "words"),
    [
        ({"busy_timeout_ms": -1}, "wal", "Invalid busy_timeout_ms -1"),
        ({"quick_check_timeout_s": 0}, "wal", "Invalid quick_check_timeout_s 0"),
        ({}, "truncate", "Invalid journal_mode 'truncate'"),
    ],
)
def test_invalid_arguments(fresh_db: Path, kwargs: dict, mode: str, words: str):
    with pytest.raises(SqliteError, match=words):
        SqlitePragmas(str(fresh_db), **kwargs).run(mode)


def test_the_sqlite3_cli_agrees_with_the_header(chinook: Path):
    SqlitePragmas(str(chinook)).run("wal")
    cli = shutil.which("sqlite3")
    assert cli, "sqlite3 CLI missing: apt-get install sqlite3 (make bootstrap installs it)"
    out = subprocess.run([cli, str(chinook), "PRAGMA journal_mode;"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "wal"


# ---- connection status files ----------------------------------------------------------------------------------
def _status(directory: Path, name: str, **settings) -> Path:
    path = directory / name
    path.write_text(json.dumps(settings))
    return path


def test_normalize_setting():
    assert normalize_setting("synchronous", "NORMAL") == normalize_setting("synchronous", 1) == "1"
    assert normalize_setting("foreign_keys", True) == normalize_setting("foreign_keys", "on") == "1"
    assert normalize_setting("foreign_keys", 0) == normalize_setting("foreign_keys", "off") == "0"
    assert normalize_setting("busy_timeout", 5000) == normalize_setting("busy_timeout", "5000") == "5000"


def test_connection_status_all_live_connections_match(tmp_path: Path):
    me = os.getpid()
    _status(tmp_path, f"orders-{me}.json", busy_timeout=5000, synchronous=1, foreign_keys=1)
    _status(tmp_path, f"api-{os.getppid()}.json", busy_timeout=5000, synchronous=1, foreign_keys=1)
    _status(tmp_path, "archiver-999999999.json", busy_timeout=0)  # dead pid: stale, ignored
    (tmp_path / "README").write_text("not a status file")
    report = ConnectionStatus(
        str(tmp_path), {"busy_timeout": 5000, "synchronous": "NORMAL", "foreign_keys": True}, wait_s=0
    ).wait()
    assert report["ok"] is True
    assert sorted(c["role"] for c in report["connections"]) == ["api", "orders"]
    assert report["stale"] == ["archiver-999999999.json"]


def test_connection_status_mismatch_fails_naming_the_file(tmp_path: Path):
    _status(tmp_path, f"orders-{os.getpid()}.json", busy_timeout=0)
    with pytest.raises(SqliteError, match=r"orders-\d+\.json: busy_timeout=0 \(want '5000'\)"):
        ConnectionStatus(str(tmp_path), {"busy_timeout": 5000}, wait_s=0.2, interval_s=0.05).wait()


def test_connection_status_waits_for_files_newer_than_the_config(tmp_path: Path):
    path = _status(tmp_path, f"orders-{os.getpid()}.json", busy_timeout=0)
    config_mtime = time.time() + 0.3

    def rewrite():
        time.sleep(0.5)
        path.write_text(json.dumps({"busy_timeout": 5000}))

    writer = threading.Thread(target=rewrite)
    writer.start()
    report = ConnectionStatus(
        str(tmp_path), {"busy_timeout": 5000}, newer_than=config_mtime, wait_s=5, interval_s=0.05
    ).wait()
    writer.join()
    assert report["ok"] is True
    assert report["waited_s"] >= 0.4


def test_connection_status_mismatch_in_a_section_names_the_reported_value(tmp_path: Path):
    # The lab's stand-in nests its pragmas under "pragmas": the message must show what the connection uses there.
    _status(tmp_path, f"orders-{os.getpid()}.json", pragmas={"busy_timeout": 0, "synchronous": 2})
    with pytest.raises(SqliteError, match=r"busy_timeout=0 \(want '5000'\), synchronous=2 \(want '1'\)"):
        ConnectionStatus(
            str(tmp_path), {"busy_timeout": 5000, "synchronous": "NORMAL"}, wait_s=0, section="pragmas"
        ).wait()


def test_connection_status_no_connections(tmp_path: Path):
    with pytest.raises(SqliteError, match="0 live connection"):
        ConnectionStatus(str(tmp_path / "absent"), {"busy_timeout": 5000}, wait_s=0).wait()


def test_connection_status_dir_that_is_a_file_fails_with_a_message(tmp_path: Path):
    not_a_dir = tmp_path / "edge.db"
    not_a_dir.write_text("")
    with pytest.raises(
        SqliteError, match=r"Cannot read the application's status directory .*edge\.db: Not a directory"
    ):
        ConnectionStatus(str(not_a_dir), {"busy_timeout": 5000}, wait_s=0).wait()


def test_connection_status_stale_only_waits_then_fails(tmp_path: Path):
    _status(tmp_path, f"orders-{os.getpid()}.json", busy_timeout=5000)
    with pytest.raises(SqliteError, match="not rewritten since the config changed"):
        ConnectionStatus(
            str(tmp_path), {"busy_timeout": 5000}, newer_than=time.time() + 60, wait_s=0.1, interval_s=0.05
        ).wait()


def test_connection_status_unreadable_file(tmp_path: Path):
    (tmp_path / f"orders-{os.getpid()}.json").write_text("{half a json")
    with pytest.raises(SqliteError, match="not rewritten"):
        ConnectionStatus(str(tmp_path), {"busy_timeout": 5000}, wait_s=0).wait()


def test_python_is_the_one_running_the_tests():
    # The fork-based tests above switch uid; they need root, as on the project's machines.
    assert os.geteuid() == 0, f"{sys.executable}: run the unit tests as root (they switch to uid {NOBODY})"


def test_connection_status_section_and_missing_section(tmp_path: Path):
    _status(tmp_path, f"orders-{os.getpid()}.json", pragmas={"busy_timeout": 5000}, busy_timeout=0)
    report = ConnectionStatus(str(tmp_path), {"busy_timeout": 5000}, wait_s=0, section="pragmas").wait()
    assert report["connections"][0]["settings"] == {"busy_timeout": 5000}
    with pytest.raises(SqliteError, match="not rewritten"):
        ConnectionStatus(str(tmp_path), {"busy_timeout": 5000}, wait_s=0, section="nope").wait()
