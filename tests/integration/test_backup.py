"""The backup role on the lab after site.yml (issue 2, done-when 2): today's object is in S3 with the sha256 the
host recorded, backup-now and the restore drill pass, restore.yml refuses a non-empty target, a stopped database
fails loudly without touching good backups, and the nightly job runs under cron itself."""

import datetime as dt
import hashlib
import json
import time

STATE = "/var/lib/crab-ops/backup-state.json"
PREFIX = "pg/"


def state(lab) -> dict:
    return json.loads(lab.ssh("cloud1", f"cat {STATE}", check=True).stdout)


def remote_keys(lab) -> dict[str, str]:
    out = {}
    for page in lab.s3().get_paginator("list_objects_v2").paginate(Bucket=lab.s3_bucket, Prefix=PREFIX):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def local_backups(lab) -> str:
    return lab.ssh("cloud1", "cd /var/backups/crab && sha256sum crab-*.dump.* | sort", check=True).stdout


def test_todays_backup_is_in_s3_with_the_recorded_sha256(site_applied, lab):
    assert site_applied.first_run.returncode == 0, str(site_applied.first_run)
    st = state(lab)
    assert st["last_status"] == "ok", st
    today = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    assert st["key"].startswith(f"{PREFIX}crab-{today}T"), st["key"]
    obj = lab.s3().get_object(Bucket=lab.s3_bucket, Key=st["key"])
    body = obj["Body"].read()
    assert len(body) == st["size"]
    assert hashlib.sha256(body).hexdigest() == st["sha256"] == obj["Metadata"]["sha256"]
    assert obj.get("ServerSideEncryption") == "AES256"
    modes = lab.ssh("cloud1", f"stat -c '%a %n' /var/backups/crab /etc/crab-ops/backup.json {STATE}", check=True)
    assert modes.stdout.split("\n")[:3] == [
        "700 /var/backups/crab",
        "600 /etc/crab-ops/backup.json",
        f"600 {STATE}",
    ]


def test_backup_now_then_restore_drill(site_applied, lab):
    before = state(lab)
    time.sleep(1)
    run = lab.playbook("playbooks/backup-now.yml")
    assert run.returncode == 0, str(run)
    assert run.recap["cloud1"]["changed"] == 1 and run.recap["cloud1"]["failed"] == 0
    after = state(lab)
    assert after["key"] != before["key"]
    assert after["key"] in remote_keys(lab)
    drill = lab.playbook("playbooks/restore-drill.yml")
    assert drill.returncode == 0, str(drill)
    assert f"drill ok: {after['key']}" in drill.stdout
    assert "all counts equal the source" in drill.stdout
    leftovers = lab.psql("SELECT count(*) FROM pg_database WHERE datname LIKE 'crab_drill_%';")
    assert leftovers == "0"


def test_drill_fails_when_the_source_has_diverged(site_applied, lab):
    lab.psql("INSERT INTO tenants (id, name) SELECT max(id) + 1000000, 'crab-bk drill divergence' FROM tenants;")
    try:
        drill = lab.playbook("playbooks/restore-drill.yml")
    finally:
        lab.psql("DELETE FROM tenants WHERE name = 'crab-bk drill divergence';")
    assert drill.returncode != 0
    assert "Restore drill of pg/crab-" in drill.stdout and "public.tenants source=" in drill.stdout


def test_restore_playbook_refuses_non_empty_target_unless_forced(site_applied, lab):
    target = "crab_it_restore"
    lab.ssh("cloud1", f"docker exec -u postgres crab-postgres dropdb --if-exists {target}", check=True)
    try:
        first = lab.playbook("playbooks/restore.yml", "-e", f"restore_target_db={target}")
        assert first.returncode == 0, str(first)
        assert lab.psql("SELECT count(*) FROM tenants;", db=target) == lab.psql("SELECT count(*) FROM tenants;")
        refused = lab.playbook("playbooks/restore.yml", "-e", f"restore_target_db={target}")
        assert refused.returncode != 0
        assert f"Database {target} is not empty; refusing" in refused.stdout
        forced = lab.playbook("playbooks/restore.yml", "-e", f"restore_target_db={target}", "-e", "restore_force=true")
        assert forced.returncode == 0, str(forced)
        missing = lab.playbook("playbooks/restore.yml")
        assert missing.returncode != 0 and "restore_target_db" in missing.stdout
    finally:
        lab.ssh("cloud1", f"docker exec -u postgres crab-postgres dropdb --if-exists {target}")


def test_stopped_database_fails_loudly_and_keeps_good_backups(site_applied, lab):
    good = state(lab)
    keys, local = remote_keys(lab), local_backups(lab)
    container = lab.docker.containers.get("crab-postgres")
    container.stop()
    try:
        time.sleep(1)
        run = lab.playbook("playbooks/backup-now.yml")
    finally:
        container.start()
        deadline = time.monotonic() + 60
        while lab.psql("SELECT 1;", check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(1)
    assert run.returncode != 0
    assert "pg_dump of database crab on container crab-postgres" in run.stdout
    assert remote_keys(lab) == keys
    assert local_backups(lab) == local
    after = state(lab)
    assert after["last_status"] == "failed" and after["key"] == good["key"]
    assert "pg_dump of database crab" in after["error"]


def test_nightly_job_runs_under_cron(site_applied, lab):
    cron = lab.ssh("cloud1", "cat /etc/cron.d/crab-ops-backup", check=True).stdout
    assert "root /usr/local/sbin/crab-backup --config /etc/crab-ops/backup.json" in cron
    before = state(lab)
    # the same command line, run by cron itself (bare environment) on the next minute
    lab.ssh(
        "cloud1",
        "echo '* * * * * root /usr/local/sbin/crab-backup --config /etc/crab-ops/backup.json"
        " > /var/log/crab-bk-itest.log 2>&1' > /etc/cron.d/crab-bk-itest && chmod 0644 /etc/cron.d/crab-bk-itest",
        check=True,
    )
    try:
        deadline = time.monotonic() + 150
        after = before
        while time.monotonic() < deadline:
            time.sleep(5)
            after = state(lab)
            if after.get("last_run") != before.get("last_run") and after["last_status"] == "ok":
                break
    finally:
        lab.ssh("cloud1", "rm -f /etc/cron.d/crab-bk-itest")
    log = lab.ssh("cloud1", "cat /var/log/crab-bk-itest.log").stdout
    assert after["last_status"] == "ok" and after["key"] != before["key"], log
    assert "crab-backup: ok s3://crab-backups/pg/crab-" in log
    assert after["key"] in remote_keys(lab)
