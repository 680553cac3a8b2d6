#!/usr/bin/python
"""Ansible module: take a verified PostgreSQL backup and store it in S3 (logic in module_utils/crab_backup.py)."""

from __future__ import annotations

from dataclasses import asdict

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crab_backup import (
    BackupError,
    BackupRunner,
    backup_argument_spec,
    config_from_params,
    fresh_backup,
    read_state,
    state_summary,
)

DOCUMENTATION = r"""
---
module: crab_backup
short_description: Dump a containerised PostgreSQL database, verify the archive, upload it to S3, verify the object
description:
  - Runs C(pg_dump -Fc -Z0) inside the database container with C(docker exec -i) (never a TTY), over TCP to
    127.0.0.1 so password authentication is exercised; the password reaches the container through the
    environment (C(-e PGPASSWORD)), never through a command line.
  - Streams the dump through C(zstd -3) (or C(gzip) when zstd is missing) into a C(.partial) file (0600) in
    O(local_dir) (0700), computing SHA-256 and size while streaming. Every stage is judged by its exit code.
  - Reads the whole archive back through C(pg_restore -f /dev/null) (a truncated dump fails here; C(--list) would
    not notice), and only then gives it its final name and uploads it with boto3 to the final key (an S3 PUT or
    multipart completion is atomic, so a failed upload leaves no object). Server-side encryption, sha256 in the
    object metadata, part size chosen from the file size.
  - Verifies the stored object (size, sha256 metadata, and the MD5/multipart ETag when S3 computes it from the
    content); on a mismatch the object is removed and the task fails.
  - Records the run in the JSON state file O(state_file) (C(last_success), C(last_failure), C(key), C(size),
    C(sha256), C(duration_s), C(error)), then applies count retention to local files and S3 keys, only to names it
    made itself under its own prefix, never the backup just made nor the last good one the state file records, and
    only after a fully successful run. Count retention (O(keep_remote), O(keep_local)) can be combined with daily,
    weekly and monthly tiers (O(keep_daily), O(keep_weekly), O(keep_monthly)); O(retention_dry_run) lists what
    would be deleted without taking a backup or deleting anything.
  - When O(alert_url) or O(alert_webhook_url) is set, tells the alert hook about the start, the success and the
    failure of the run. A hook that fails (HTTP error, refused, no answer within O(alert_timeout_s)) never fails or
    hides the backup's result; it is reported in RV(alerts) and the state file's C(alert_errors), naming only
    C(scheme://host:port/***) of the URL.
  - An flock in O(local_dir) keeps two runs (this module, the cron job, a restore) from writing at once.
  - The nightly cron job C(/usr/local/sbin/crab-backup) runs the same code.
version_added: "0.1.0"
author: crab-ops
options:
  container:
    description: Container running PostgreSQL; empty runs C(pg_dump) on the host itself.
    type: str
    default: crab-postgres
  docker:
    description: The docker CLI (name or absolute path).
    type: str
    default: docker
  db_name:
    description: Database to back up.
    type: str
    default: crab
  db_user:
    description: PostgreSQL user that dumps (must read every table).
    type: str
    default: crab
  db_password:
    description: Password of O(db_user).
    type: str
  db_host:
    description: Host C(pg_dump) connects to, seen from inside the container.
    type: str
    default: 127.0.0.1
  db_port:
    description: PostgreSQL port.
    type: int
    default: 5432
  admin_user:
    description: Superuser reached by local socket (C(docker exec -u postgres)) for CREATE/DROP DATABASE.
    type: str
    default: postgres
  admin_host:
    description: Socket directory or host for O(admin_user) when O(container) is empty.
    type: str
  bucket:
    description: S3 bucket.
    type: str
    default: crab-backups
  prefix:
    description: Key prefix, ending in C(/).
    type: str
    default: pg/
  endpoint_url:
    description: S3 endpoint for S3-compatible stores; empty means AWS.
    type: str
  region:
    description: S3 region.
    type: str
    default: us-east-1
  access_key:
    description: S3 access key; empty uses the default credential chain (instance role on EC2).
    type: str
  secret_key:
    description: S3 secret key, set together with O(access_key).
    type: str
  sse:
    description: Server-side encryption requested on upload.
    type: str
    choices: [AES256, aws:kms, none]
    default: AES256
  sse_kms_key_id:
    description: KMS key id when O(sse=aws:kms).
    type: str
  local_dir:
    description: Directory (0700) for the local copies (0600) and the run lock.
    type: path
    default: /var/backups/crab
  state_file:
    description: JSON state file recording the last success and failure.
    type: path
    default: /var/lib/crab-ops/backup-state.json
  name:
    description: Base name of backups, C(<name>-<UTC timestamp>.dump.zst); retention only touches such names.
    type: str
    default: crab
  lock_wait_s:
    description: Seconds to wait for a running backup/restore to finish before failing.
    type: float
    default: 0
  s3_connect_timeout_s:
    description: S3 connect timeout in seconds.
    type: int
    default: 5
  s3_max_attempts:
    description: Attempts per S3 request (botocore standard retries).
    type: int
    default: 3
  alert_url:
    description:
      - Healthchecks.io-style ping URL (a secret) - POST C(<url>/start) when the run starts, C(<url>) with a summary
        on success, C(<url>/fail) with the error on failure.
    type: str
  alert_webhook_url:
    description:
      - Generic webhook (a secret) - POST of JSON C({event, status, job, host, time, key, size, sha256, duration_s,
        error}) at start (C(status=started)), success (C(ok)) and failure (C(failed)).
    type: str
  alert_timeout_s:
    description: Wall-clock bound of each alert request in seconds; a slow hook is abandoned, the backup goes on.
    type: float
    default: 10
  compressor:
    description: Compressor; C(auto) uses zstd when installed, else gzip.
    type: str
    choices: [auto, zstd, gzip]
    default: auto
  compress_level:
    description: Compression level.
    type: int
    default: 3
  dump_lock_timeout_s:
    description:
      - Seconds C(pg_dump) waits for a table lock held by another session before the run fails (C(0) waits forever).
    type: int
    default: 600
  keep_local:
    description: Newest local backups to keep (at least 1).
    type: int
    default: 3
  keep_remote:
    description: Newest S3 backups to keep (at least 1).
    type: int
    default: 14
  keep_daily:
    description:
      - Also keep the newest backup of each of the last N days that have backups (C(0) turns the tier off).
      - Applies to S3, and to the local copies when O(keep_local_tiers=true).
    type: int
    default: 0
  keep_weekly:
    description: Also keep the newest backup of each of the last N ISO weeks that have backups (C(0) off).
    type: int
    default: 0
  keep_monthly:
    description: Also keep the newest backup of each of the last N months that have backups (C(0) off).
    type: int
    default: 0
  keep_local_tiers:
    description:
      - Apply the daily/weekly/monthly tiers to the local copies too; by default only the newest O(keep_local) stay
        locally (local disk is small, S3 keeps the history).
    type: bool
    default: false
  retention_dry_run:
    description:
      - Take no backup and delete nothing; return in RV(would_delete_local) and RV(would_delete_remote) what
        retention would delete now (C(changed=false)).
    type: bool
    default: false
  max_age_hours:
    description:
      - When the state file shows a successful backup younger than this, do nothing (C(changed=false)).
      - C(0) always takes a backup.
    type: float
    default: 0
attributes:
  check_mode:
    support: full
    details: Reads the state file and reports what it would dump and upload; runs nothing.
  diff_mode:
    support: full
    details: Shows the state file summary before and after.
notes:
  - Needs on the host - docker CLI, zstd or gzip, pg_restore (postgresql-client) and python3-boto3.
  - Restore by hand with stock tools - C(zstd -dc crab-<ts>.dump.zst | pg_restore -d crab --exit-on-error).
"""

EXAMPLES = r"""
- name: Ensure a backup younger than 20 hours exists
  crab_backup:
    db_password: "{{ backup_db_password }}"
    endpoint_url: http://127.0.0.1:8333
    access_key: "{{ backup_s3_access_key }}"
    secret_key: "{{ backup_s3_secret_key }}"
    max_age_hours: 20
  no_log: true

- name: Keep 14 newest plus 7 daily, 4 weekly and 6 monthly backups in S3; list what would go, delete nothing
  crab_backup:
    endpoint_url: http://127.0.0.1:8333
    access_key: "{{ backup_s3_access_key }}"
    secret_key: "{{ backup_s3_secret_key }}"
    keep_daily: 7
    keep_weekly: 4
    keep_monthly: 6
    retention_dry_run: true
  no_log: true

- name: Back up now and ping healthchecks.io (start, success or fail)
  crab_backup:
    db_password: "{{ backup_db_password }}"
    alert_url: "https://hc-ping.com/{{ vault_hc_uuid }}"
    alert_timeout_s: 10
  no_log: true

- name: Back up now on EC2 with the instance role and KMS
  crab_backup:
    db_password: "{{ vault_pg_password }}"
    bucket: acme-crab-backups
    region: eu-central-1
    sse: aws:kms
    sse_kms_key_id: alias/crab-backups
  no_log: true
"""

RETURN = r"""
error:
  description: The failure message (also in C(msg)), so a task with C(no_log) can register it and show it.
  returned: failure
  type: str
  sample: "pg_dump of database crab on container crab-postgres exited 1: ... Check that PostgreSQL runs ..."
key:
  description: S3 key of the backup written (or of the fresh one found when skipped).
  returned: success
  type: str
  sample: pg/crab-20260501T020000Z.dump.zst
local_path:
  description: Local copy of the backup.
  returned: changed and not check mode
  type: str
  sample: /var/backups/crab/crab-20260501T020000Z.dump.zst
size:
  description: Compressed size in bytes.
  returned: changed and not check mode
  type: int
  sample: 31457280
raw_size:
  description: Uncompressed dump size in bytes.
  returned: changed and not check mode
  type: int
  sample: 104857600
sha256:
  description: SHA-256 of the compressed archive, also in the object's metadata.
  returned: changed and not check mode
  type: str
  sample: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
compressor:
  description: zstd or gzip.
  returned: changed and not check mode
  type: str
  sample: zstd
duration_s:
  description: Wall time of the run.
  returned: changed and not check mode
  type: float
  sample: 12.4
part_size:
  description: Multipart part size used for the upload, in bytes.
  returned: changed and not check mode
  type: int
  sample: 8388608
etag_verified:
  description: Whether the object's ETag was compared with the local content's MD5 (multipart) digest.
  returned: changed and not check mode
  type: bool
  sample: true
deleted_local:
  description: Local backups removed by retention.
  returned: changed and not check mode
  type: list
  elements: str
  sample: []
deleted_remote:
  description: S3 keys removed by retention.
  returned: changed and not check mode
  type: list
  elements: str
  sample: []
alerts:
  description:
    - One record per alert request sent - event (start, success, fail), target (healthchecks, webhook), url
      (C(scheme://host:port/***), never the secret path), ok, error, duration_s. Empty when no hook is set.
  returned: when a backup ran (success or failure)
  type: list
  elements: dict
  sample: [{event: success, target: webhook, url: "https://hooks.example.com/***", ok: false, error: HTTP 500}]
would_delete_local:
  description: Local backups retention would delete now (O(retention_dry_run)).
  returned: retention_dry_run
  type: list
  elements: str
  sample: [/var/backups/crab/crab-20260101T021500Z.dump.zst]
would_delete_remote:
  description: S3 keys retention would delete now (O(retention_dry_run)).
  returned: retention_dry_run
  type: list
  elements: str
  sample: [pg/crab-20251201T021500Z.dump.zst]
policy_local:
  description: The local retention policy (last, daily, weekly, monthly) the dry run applied.
  returned: retention_dry_run
  type: dict
  sample: {last: 3, daily: 0, weekly: 0, monthly: 0}
policy_remote:
  description: The S3 retention policy (last, daily, weekly, monthly) the dry run applied.
  returned: retention_dry_run
  type: dict
  sample: {last: 14, daily: 7, weekly: 4, monthly: 6}
skipped_fresh:
  description: True when a backup younger than O(max_age_hours) made the run unnecessary.
  returned: always
  type: bool
  sample: false
plan:
  description: What the run would do (check mode).
  returned: check mode and changed
  type: dict
  sample: {would_upload: s3://crab-backups/pg/crab-20260501T020000Z.dump.zst}
state:
  description: The state file after the run (no secrets in it).
  returned: always
  type: dict
  sample: {last_status: ok, last_success: "2026-05-01T02:00:00Z", key: pg/crab-20260501T020000Z.dump.zst}
"""


def main() -> None:
    module = AnsibleModule(argument_spec=backup_argument_spec(), supports_check_mode=True)
    try:
        cfg = config_from_params(module.params)
        before = read_state(cfg.state_file)
    except BackupError as exc:
        module.fail_json(msg=str(exc), error=str(exc))
    if module.params["retention_dry_run"]:
        try:
            plan = BackupRunner(cfg).retention_dry_run()
        except BackupError as exc:
            module.fail_json(msg=str(exc), error=str(exc))
        module.exit_json(changed=False, skipped_fresh=False, state=before, **plan)
    if fresh_backup(before, module.params["max_age_hours"]):
        module.exit_json(changed=False, skipped_fresh=True, key=before.get("key"), state=before)
    runner = BackupRunner(cfg)
    result: dict = {"changed": True, "skipped_fresh": False}
    if module.check_mode:
        result["plan"] = runner.plan()
        result["key"] = result["plan"]["would_upload"]
        after_text = state_summary({**before, "last_status": "ok", "key": result["key"]})
        result["state"] = before
    else:
        try:
            done = runner.run()
        except BackupError as exc:
            module.fail_json(
                msg=str(exc), error=str(exc), state=_safe_state(cfg.state_file), alerts=runner.alerter.sent
            )
        result.update(asdict(done))
        result["state"] = read_state(cfg.state_file)
        after_text = state_summary(result["state"])
    if module._diff:
        result["diff"] = {
            "before_header": cfg.state_file,
            "after_header": cfg.state_file,
            "before": state_summary(before),
            "after": after_text,
        }
    module.exit_json(**result)


def _safe_state(path: str) -> dict:
    try:
        return read_state(path)
    except BackupError:
        return {}


if __name__ == "__main__":
    main()
