"""library/crab_backup.py and library/crab_restore.py main() with patched args, against the real PostgreSQL and S3
of test_backup_fixtures: every exit_json and fail_json path."""

import importlib.util
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

import module_utils.crab_backup as crab_backup
from module_utils.crab_backup import read_state
from tests.unit.test_backup_fixtures import DEAD_PORT, backup_cfg, pg_server, s3_server

REPO = Path(__file__).resolve().parents[2]
basic._ANSIBLE_PROFILE = "legacy"
# The modules import their core as Ansible ships it to the host: ansible.module_utils.crab_backup.
sys.modules.setdefault("ansible.module_utils.crab_backup", crab_backup)
# pytest finds fixtures by name in this module's namespace: these imports are how the tests get them.
FIXTURES = (backup_cfg, pg_server, s3_server)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "library" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


backup_module = _load("crab_backup")
restore_module = _load("crab_restore")


def run(mod, args: dict, capsys, check_mode: bool = False, diff: bool = False) -> dict:
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args), pytest.raises(SystemExit):
        mod.main()
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def args(backup_cfg) -> dict:
    return asdict(backup_cfg)


def test_check_mode_touches_nothing_and_says_what_it_would_do(args, backup_cfg, s3_server, capsys):
    out = run(backup_module, args, capsys, check_mode=True, diff=True)
    assert out["changed"] is True
    assert out["plan"]["would_upload"].startswith(f"s3://crab-backups/{backup_cfg.prefix}crab-")
    assert "key: " in out["diff"]["after"]
    assert not Path(backup_cfg.local_dir).exists()
    assert not Path(backup_cfg.state_file).exists()
    assert s3_server.keys(backup_cfg.prefix) == {}


def test_backup_then_fresh_skip_is_unchanged(args, backup_cfg, s3_server, capsys):
    out = run(backup_module, dict(args, max_age_hours=20), capsys, diff=True)
    assert out["changed"] is True, out
    assert out["key"] in s3_server.keys(backup_cfg.prefix)
    assert out["state"]["sha256"] == out["sha256"]
    assert "last_status: ok" in out["diff"]["after"]
    assert crab_backup.BackupConfig.SECRET_FIELDS[0] not in json.dumps(out["state"])
    again = run(backup_module, dict(args, max_age_hours=20), capsys)
    assert again["changed"] is False and again["skipped_fresh"] is True
    assert again["key"] == out["key"]
    # check mode with a fresh backup: also nothing to do
    assert run(backup_module, dict(args, max_age_hours=20), capsys, check_mode=True)["changed"] is False
    # max_age_hours 0 (backup-now) always runs
    time.sleep(1.05)
    now = run(backup_module, dict(args, max_age_hours=0), capsys)
    assert now["changed"] is True and now["key"] != out["key"]


def test_backup_failure_is_fail_json_with_state(args, backup_cfg, capsys):
    out = run(backup_module, dict(args, db_port=DEAD_PORT), capsys)
    assert out["failed"] is True
    assert out["msg"].startswith("pg_dump of database crab")
    assert out["state"]["last_status"] == "failed"
    assert read_state(backup_cfg.state_file)["error"] == out["msg"]


def test_backup_alert_hook_results_and_no_secret_in_output(args, capsys):
    secret = "9d3b6c2a-hook-secret"
    dead = f"http://127.0.0.1:{DEAD_PORT}/{secret}"
    out = run(backup_module, dict(args, alert_url=dead, alert_webhook_url=dead, alert_timeout_s=1), capsys)
    assert out["changed"] is True and out["state"]["last_status"] == "ok", out
    assert [a["event"] for a in out["alerts"]] == ["start", "start", "success", "success"]
    assert not any(a["ok"] for a in out["alerts"])
    assert secret not in json.dumps(out)
    time.sleep(1.05)  # backups are named by the second: the next run must not collide with this one
    failed = run(backup_module, dict(args, db_port=DEAD_PORT, alert_url=dead, alert_timeout_s=1), capsys)
    assert failed["failed"] is True and failed["msg"].startswith("pg_dump of database crab")
    assert [a["event"] for a in failed["alerts"]] == ["start", "fail"]
    assert secret not in json.dumps(failed)


def test_backup_bad_config_is_fail_json(args, capsys):
    out = run(backup_module, dict(args, prefix="pg"), capsys)
    assert out["failed"] is True
    assert "must end with '/'" in out["msg"]


def test_backup_unreadable_state_is_fail_json(args, backup_cfg, capsys):
    Path(backup_cfg.state_file).parent.mkdir(parents=True)
    Path(backup_cfg.state_file).write_text("{not json")
    out = run(backup_module, args, capsys)
    assert out["failed"] is True
    assert out["msg"].startswith(f"Cannot read the backup state file {backup_cfg.state_file}")


def _restore_args(args: dict, **extra) -> dict:
    base = {k: v for k, v in args.items() if k in crab_backup.common_argument_spec()}
    return dict(base, **extra)


def test_restore_and_drill(args, backup_cfg, pg_server, capsys):
    made = run(backup_module, args, capsys)
    assert made["changed"] is True, made
    pg_server.admin("DROP DATABASE IF EXISTS crab_mod_restore;")
    check = run(restore_module, _restore_args(args, action="restore", target_db="crab_mod_restore"), capsys, True, True)
    assert check["changed"] is True and "would restore" in check["msg"]
    assert pg_server.admin("SELECT count(*) FROM pg_database WHERE datname = 'crab_mod_restore';") == "0"
    out = run(restore_module, _restore_args(args, action="restore", target_db="crab_mod_restore"), capsys, diff=True)
    assert out["changed"] is True, out
    assert out["key"] == made["key"]
    assert "crab_mod_restore <- " in out["diff"]["after"]
    refused = run(restore_module, _restore_args(args, action="restore", target_db="crab_mod_restore"), capsys)
    assert refused["failed"] is True and "is not empty; refusing" in refused["msg"]
    pg_server.admin("DROP DATABASE crab_mod_restore;")
    drill = run(restore_module, _restore_args(args, action="drill"), capsys)
    assert drill["changed"] is False and drill.get("failed") is not True, drill
    assert drill["counts"]["public.orders"] == 60000
    assert drill["mismatches"] == {}
    pg_server.sql("crab", "INSERT INTO tenants (name) VALUES ('late-module');")
    try:
        bad = run(restore_module, _restore_args(args, action="drill"), capsys)
    finally:
        pg_server.sql("crab", "DELETE FROM tenants WHERE name = 'late-module';")
    assert bad["failed"] is True
    assert "Restore drill of" in bad["msg"] and "public.tenants source=21 restored=20" in bad["msg"]


def test_restore_without_backup_is_fail_json(args, capsys):
    out = run(restore_module, _restore_args(args, action="drill"), capsys)
    assert out["failed"] is True and out["msg"].startswith("No backup found under")


def test_restore_requires_target_db(args, capsys):
    out = run(restore_module, _restore_args(args, action="restore"), capsys)
    assert out["failed"] is True and "target_db" in out["msg"]


def test_restore_bad_config_is_fail_json(args, capsys):
    out = run(restore_module, _restore_args(args, access_key="only-one", secret_key=None), capsys)
    assert out["failed"] is True and "set both access_key and secret_key" in out["msg"]


def test_drill_check_mode_runs_nothing(args, capsys):
    out = run(restore_module, _restore_args(args, action="drill"), capsys, check_mode=True)
    assert out["changed"] is False and "scratch database" in out["msg"]
