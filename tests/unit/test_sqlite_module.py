"""library/crab_sqlite_pragmas.py main() with patched args, on real SQLite files: every exit and fail_json path."""

import importlib.util
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

import module_utils.crab_sqlite as crab_sqlite
from module_utils.crab_sqlite import read_header

REPO = Path(__file__).resolve().parents[2]
basic._ANSIBLE_PROFILE = "legacy"
# The module imports its core as Ansible ships it to the host: ansible.module_utils.crab_sqlite.
sys.modules.setdefault("ansible.module_utils.crab_sqlite", crab_sqlite)
_spec = importlib.util.spec_from_file_location("crab_sqlite_pragmas", REPO / "library" / "crab_sqlite_pragmas.py")
module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(module)


def run_module(args: dict, capsys, check_mode: bool = False, diff: bool = False) -> dict:
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args), pytest.raises(SystemExit):
        module.main()
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def chinook(tmp_path: Path, corpus_dir: Path) -> Path:
    db = tmp_path / "chinook.sqlite"
    shutil.copyfile(corpus_dir / "sqlite" / "chinook.sqlite", db)
    return db


def test_switch_with_diff_then_idempotent(chinook: Path, capsys):
    out = run_module({"path": str(chinook), "quick_check": True}, capsys, diff=True)
    assert out.get("failed") is not True, out
    assert out["changed"] is True
    assert "journal_mode = delete\n" in out["diff"]["before"]
    assert "journal_mode = wal\n" in out["diff"]["after"]
    assert out["health"]["quick_check"]["ok"] is True
    assert out["connections"] == {"checked": False}
    assert read_header(str(chinook)).journal_mode == "wal"
    again = run_module({"path": str(chinook)}, capsys, diff=True)
    assert again["changed"] is False
    assert again["diff"]["before"] == again["diff"]["after"]


def test_check_mode_changes_nothing(chinook: Path, capsys):
    before = chinook.read_bytes()
    out = run_module(
        {"path": str(chinook), "status_dir": str(chinook.parent / "status"), "status_expect": {"busy_timeout": 1}},
        capsys,
        check_mode=True,
        diff=True,
    )
    assert out["changed"] is True
    assert out["after"]["journal_mode"] == "wal"
    assert out["connections"] == {"checked": False}  # no status dir exists: would fail if it were checked
    assert chinook.read_bytes() == before
    assert sorted(p.name for p in chinook.parent.iterdir()) == ["chinook.sqlite"]


def test_check_mode_warns_when_quick_check_is_skipped(chinook: Path, capsys):
    run_module({"path": str(chinook)}, capsys)  # now WAL, no side files
    out = run_module({"path": str(chinook), "quick_check": True}, capsys, check_mode=True)
    assert out["changed"] is False
    # ansible-core 2.19 wraps warnings as {"event": {"msg": ...}}; older cores return plain strings.
    texts = [w["event"]["msg"] if isinstance(w, dict) else w for w in out["warnings"]]
    assert any("quick_check skipped" in w for w in texts), out["warnings"]


def test_fail_not_sqlite(tmp_path: Path, capsys):
    path = tmp_path / "edge.db"
    path.write_text("hello")
    out = run_module({"path": str(path)}, capsys)
    assert out["failed"] is True
    assert out["msg"].startswith(f"Cannot manage SQLite database {path}: the file does not start with")
    assert path.read_text() == "hello"


def test_fail_locked(chinook: Path, capsys):
    holder = sqlite3.connect(chinook, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    out = run_module({"path": str(chinook), "busy_timeout_ms": 100}, capsys)
    holder.execute("ROLLBACK")
    holder.close()
    assert out["failed"] is True
    assert "busy timeout of 100 ms" in out["msg"]
    assert read_header(str(chinook)).journal_mode == "delete"


def test_fail_bad_choice(chinook: Path, capsys):
    out = run_module({"path": str(chinook), "journal_mode": "memory"}, capsys)
    assert out["failed"] is True
    assert "journal_mode" in out["msg"]


def test_fail_bad_busy_timeout(chinook: Path, capsys):
    out = run_module({"path": str(chinook), "busy_timeout_ms": -5}, capsys)
    assert out["failed"] is True
    assert out["msg"].startswith("Invalid busy_timeout_ms -5")


def test_connections_ok(chinook: Path, tmp_path: Path, capsys):
    run_module({"path": str(chinook)}, capsys)  # already WAL: reports written before this run count
    status = tmp_path / "status"
    status.mkdir()
    config = tmp_path / "edge-server.conf"
    config.write_text("SQLITE_BUSY_TIMEOUT_MS=5000\n")
    old = time.time() - 10
    os.utime(config, (old, old))
    (status / f"orders-{os.getpid()}.json").write_text(
        json.dumps({"role": "orders", "pragmas": {"busy_timeout": 5000, "synchronous": 1}})
    )
    out = run_module(
        {
            "path": str(chinook),
            "status_dir": str(status),
            "status_expect": {"busy_timeout": 5000, "synchronous": "NORMAL"},
            "status_section": "pragmas",
            "status_newer_than": str(config),
            "status_wait_s": 2,
        },
        capsys,
    )
    assert out.get("failed") is not True, out
    assert out["connections"]["checked"] is True
    assert out["connections"]["count"] == 1
    assert out["connections"]["connections"][0]["settings"]["busy_timeout"] == 5000


def test_fail_connections_mismatch(chinook: Path, tmp_path: Path, capsys):
    run_module({"path": str(chinook)}, capsys)
    status = tmp_path / "status"
    status.mkdir()
    (status / f"api-{os.getpid()}.json").write_text(json.dumps({"busy_timeout": 0}))
    out = run_module(
        {
            "path": str(chinook),
            "status_dir": str(status),
            "status_expect": {"busy_timeout": 5000},
            "status_wait_s": 0.3,
        },
        capsys,
    )
    assert out["failed"] is True
    assert "busy_timeout=0 (want '5000')" in out["msg"]
    assert out["changed"] is False
    assert out["connections"] == {"checked": False}


def test_fail_status_newer_than_missing(chinook: Path, tmp_path: Path, capsys):
    out = run_module(
        {
            "path": str(chinook),
            "status_dir": str(tmp_path),
            "status_newer_than": str(tmp_path / "missing.conf"),
        },
        capsys,
    )
    assert out["failed"] is True
    assert out["msg"].startswith(f"Cannot read status_newer_than {tmp_path / 'missing.conf'}: No such file")


def test_after_a_switch_only_reports_written_after_it_count(chinook: Path, tmp_path: Path, capsys):
    status = tmp_path / "status"
    status.mkdir()
    report = status / f"orders-{os.getpid()}.json"
    report.write_text(json.dumps({"pragmas": {"busy_timeout": 5000, "journal_mode": "wal"}}))
    args = {
        "path": str(chinook),
        "status_dir": str(status),
        "status_section": "pragmas",
        "status_expect": {"busy_timeout": 5000, "journal_mode": "wal"},
        "status_wait_s": 0.5,
    }
    out = run_module(args, capsys)  # switches now; the report predates the switch
    assert out["failed"] is True
    assert "not rewritten" in out["msg"]
    assert read_header(str(chinook)).journal_mode == "wal"
    out = run_module(args, capsys)  # nothing to switch: the same report is good enough
    assert out.get("failed") is not True, out
    assert out["changed"] is False
    assert out["connections"]["ok"] is True
