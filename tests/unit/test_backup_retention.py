"""Retention tiers (daily/weekly/monthly on top of count) against real S3 objects and local files whose names span
five months: exactly the expected keys go, foreign keys and the last good backup never do, a failed run deletes
nothing, and the dry run (core, module, cron CLI) lists the same set without deleting anything."""

import datetime as dt
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from module_utils.crab_backup import BackupError, BackupRunner, read_state, write_state
from tests.unit.test_backup_fixtures import BUCKET, REPO, backup_cfg, pg_server, s3_server

# pytest finds fixtures by name in this module's namespace: these imports are how the tests get them.
FIXTURES = (backup_cfg, pg_server, s3_server)
UTC = dt.UTC
NOW = dt.datetime(2025, 3, 31, 2, 0, tzinfo=UTC)  # a Monday: ISO week 14
STAMPS = [
    "20250330T140000Z",  # Sunday, week 13: a second backup that day
    "20250330T020000Z",
    "20250329T020000Z",
    "20250328T020000Z",
    "20250327T020000Z",
    "20250326T020000Z",
    "20250325T020000Z",
    "20250316T020000Z",  # Sunday, week 11
    "20250309T020000Z",  # week 10
    "20250228T020000Z",
    "20250210T020000Z",
    "20250131T020000Z",
    "20250105T020000Z",
    "20241231T020000Z",
    "20241130T020000Z",
]
# What those tiers drop from STAMPS when no new backup is added (the last one, 30 Nov, unless protected).
TIERED_DROP = [
    "20250327T020000Z",
    "20250326T020000Z",
    "20250325T020000Z",
    "20250309T020000Z",
    "20250210T020000Z",
    "20250105T020000Z",
    "20241231T020000Z",
    "20241130T020000Z",
]
TIERS = {"keep_remote": 2, "keep_daily": 3, "keep_weekly": 2, "keep_monthly": 3}


def _seed(cfg, client) -> tuple[list[str], list[str]]:
    own = [f"{cfg.prefix}crab-{s}.dump.zst" for s in STAMPS]
    foreign = [
        f"{cfg.prefix}crab-20200101T000000Z.dump.zst.partial",
        f"{cfg.prefix}old/crab-20200101T000000Z.dump.zst",
        f"{cfg.prefix}other-20200101T000000Z.dump.zst",
        f"{cfg.prefix}crab-20200101T000000Z.sql",
        f"{cfg.prefix}README.txt",
        f"elsewhere/{cfg.prefix}crab-20200101T000000Z.dump.zst",
    ]
    for key in own + foreign:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    return own, foreign


def _stamps(keys) -> list[str]:
    return sorted(Path(k).name.split("-")[1].split(".")[0] for k in keys)


def test_tiers_on_s3_keep_expected_set_and_dry_run_deletes_nothing(backup_cfg, s3_server):
    cfg = replace(backup_cfg, **TIERS)
    client = s3_server.client()
    own, foreign = _seed(cfg, client)
    # The last good backup the state file records is protected even where the tiers would drop it.
    write_state(cfg.state_file, {"last_status": "ok", "key": own[-1]})
    before = s3_server.keys(cfg.prefix)
    plan = BackupRunner(cfg).retention_dry_run()
    assert s3_server.keys(cfg.prefix) == before, "the dry run deleted something"
    # newest 2 (30th x2), daily 3 (30th, 29th, 28th), weekly 2 (w13, w11: 16th), monthly 3 (Mar, Feb 28th, Jan 31st)
    assert _stamps(plan["would_delete_remote"]) == sorted(TIERED_DROP[:-1])
    assert plan["policy_remote"] == {"last": 2, "daily": 3, "weekly": 2, "monthly": 3}

    # A failed run deletes nothing, whatever the tiers say.
    with pytest.raises(BackupError):
        BackupRunner(replace(cfg, db_password="wrong"), now=lambda: NOW).run()
    assert s3_server.keys(cfg.prefix) == before

    # A good run on Monday 31 March: the new backup takes this day, week 14 and March.
    result = BackupRunner(cfg, now=lambda: NOW).run()
    assert result.key == f"{cfg.prefix}crab-20250331T020000Z.dump.zst"
    kept = {k for k in s3_server.keys(cfg.prefix) if k in own or k == result.key}
    assert _stamps(kept) == sorted(
        ["20250331T020000Z", "20250330T140000Z", "20250329T020000Z", "20250228T020000Z", "20250131T020000Z"]
    )
    assert set(foreign) <= set(s3_server.keys(cfg.prefix)) | set(s3_server.keys("elsewhere/"))
    assert sorted(result.deleted_remote) == sorted(set(own) - kept)


def test_newest_good_backup_survives_the_smallest_policy(backup_cfg, s3_server):
    cfg = replace(backup_cfg, keep_remote=1, keep_local=1, keep_daily=0, keep_weekly=0, keep_monthly=0)
    own, _ = _seed(cfg, s3_server.client())
    result = BackupRunner(cfg, now=lambda: NOW).run()
    assert {k for k in s3_server.keys(cfg.prefix) if k in own or k == result.key} == {result.key}
    # Someone drops a newer key with our name: the dry run keeps it (newest) and still keeps the last good one.
    s3_server.client().put_object(Bucket=BUCKET, Key=f"{cfg.prefix}crab-20250401T000000Z.dump.zst", Body=b"x")
    plan = BackupRunner(cfg).retention_dry_run()
    assert plan["would_delete_remote"] == []
    assert read_state(cfg.state_file)["key"] == result.key


def test_local_tiers_only_when_asked(backup_cfg, s3_server):
    local = Path(backup_cfg.local_dir)
    local.mkdir(mode=0o700)
    for stamp in STAMPS:
        (local / f"crab-{stamp}.dump.zst").write_bytes(b"x")
    (local / "crab-20200101T000000Z.dump.zst.partial").write_bytes(b"x")
    (local / "notes.txt").write_bytes(b"x")
    count_only = BackupRunner(replace(backup_cfg, keep_local=2, **TIERS)).retention_dry_run()
    assert _stamps(count_only["would_delete_local"]) == sorted(STAMPS[2:])
    tiered = BackupRunner(replace(backup_cfg, keep_local=2, keep_local_tiers=True, **TIERS)).retention_dry_run()
    assert _stamps(tiered["would_delete_local"]) == sorted(TIERED_DROP)
    assert len(list(local.iterdir())) == len(STAMPS) + 2, "the dry run deleted local files"


def test_dry_run_from_the_cli_and_the_module(backup_cfg, s3_server, tmp_path, capsys):
    cfg = replace(backup_cfg, **TIERS)
    _seed(cfg, s3_server.client())
    before = s3_server.keys(cfg.prefix)
    conf = tmp_path / "backup.json"
    conf.write_text(json.dumps(asdict(cfg)))
    conf.chmod(0o600)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "crab_backup.py").write_bytes((REPO / "module_utils" / "crab_backup.py").read_bytes())
    cli = [sys.executable, str(REPO / "roles/backup/files/crab-backup"), "--config", str(conf), "--retention-dry-run"]
    run = subprocess.run(cli, env={"PATH": "/usr/bin:/bin", "CRAB_OPS_LIB": str(lib)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "would delete 0 local and 8 S3 backup(s); nothing was deleted." in run.stdout
    assert f"would delete s3://{BUCKET}/{cfg.prefix}crab-20241130T020000Z.dump.zst" in run.stdout
    assert s3_server.keys(cfg.prefix) == before
    assert not Path(cfg.state_file).exists(), "the dry run took a backup"

    from tests.unit.test_backup_module import backup_module
    from tests.unit.test_backup_module import run as run_module

    out = run_module(backup_module, dict(asdict(cfg), retention_dry_run=True), capsys)
    assert out["changed"] is False and len(out["would_delete_remote"]) == 8 and out["would_delete_local"] == []
    assert s3_server.keys(cfg.prefix) == before


def test_tier_validation():
    from module_utils.crab_backup import BackupConfig

    with pytest.raises(BackupError, match=r"^Invalid keep_weekly -1: use 0 \(tier off\) or a positive count\.$"):
        BackupConfig(keep_weekly=-1).validate()
