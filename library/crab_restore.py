#!/usr/bin/python
"""Ansible module: restore a verified backup from S3 into a named database, or run a restore drill."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crab_backup import BackupError, Restorer, config_from_params, restore_argument_spec

DOCUMENTATION = r"""
---
module: crab_restore
short_description: Restore a PostgreSQL backup from S3 (sha256 verified), or prove one restores (drill)
description:
  - Chooses a backup written by M(crab_backup) - the newest one under O(prefix) by default, or O(key) - and
    downloads it into a private temporary directory under O(local_dir).
  - Refuses to use it unless its SHA-256 equals the sha256 recorded in the object's metadata.
  - O(action=restore) restores into O(target_db) with C(pg_restore --exit-on-error) run in the database container
    (no TTY, password by environment). An existing database that holds any relation is refused unless
    O(force=true), which drops and recreates it. A missing database is created, owned by O(db_user).
  - O(action=drill) restores into a scratch database, compares every table's exact row count (and the newest
    row of C(public.event_log), the head of its hash chain) with the source database O(db_name), drops the
    scratch database whatever happens, and fails unless everything matches.
  - Database creation and removal run as O(admin_user) over the container's local socket
    (C(docker exec -u postgres)); no superuser password is needed.
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
  action:
    description: C(restore) into O(target_db), or C(drill) into a scratch database.
    type: str
    choices: [restore, drill]
    default: drill
  key:
    description: Key (or file name under O(prefix)) of the backup to use; empty means the newest.
    type: str
  target_db:
    description: Database to restore into (required for O(action=restore)).
    type: str
  force:
    description: Drop and recreate O(target_db) when it is not empty.
    type: bool
    default: false
  scratch_db:
    description: Name of the drill's scratch database; default C(<db_name>_drill_<timestamp>).
    type: str
attributes:
  check_mode:
    support: full
    details: Reports what it would restore; downloads and writes nothing.
  diff_mode:
    support: full
    details: Shows the target database and the backup that would be restored into it.
notes:
  - Needs on the host - docker CLI, zstd or gzip and python3-boto3.
"""

EXAMPLES = r"""
- name: Restore the newest backup into crab_restored
  crab_restore:
    action: restore
    target_db: crab_restored
    db_password: "{{ backup_db_password }}"
    endpoint_url: http://127.0.0.1:8333
    access_key: "{{ backup_s3_access_key }}"
    secret_key: "{{ backup_s3_secret_key }}"
  no_log: true

- name: Prove the newest backup restores with every row
  crab_restore:
    action: drill
    db_password: "{{ backup_db_password }}"
  no_log: true
"""

RETURN = r"""
error:
  description: The failure message (also in C(msg)), so a task with C(no_log) can register it and show it.
  returned: failure
  type: str
  sample: "pg_dump of database crab on container crab-postgres exited 1: ... Check that PostgreSQL runs ..."
key:
  description: S3 key of the backup used.
  returned: success
  type: str
  sample: pg/crab-20260501T020000Z.dump.zst
sha256:
  description: Its verified SHA-256.
  returned: success
  type: str
  sample: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
database:
  description: Database restored into (O(action=restore)).
  returned: action is restore
  type: str
  sample: crab_restored
tables:
  description: Number of tables compared (drill).
  returned: action is drill and not check mode
  type: int
  sample: 7
rows:
  description: Total rows in the source's tables (drill).
  returned: action is drill and not check mode
  type: int
  sample: 1250000
counts:
  description: Row count per restored table (drill).
  returned: action is drill and not check mode
  type: dict
  sample: {public.orders: 100000}
mismatches:
  description: Tables whose counts differ, with both counts (drill).
  returned: action is drill and not check mode
  type: dict
  sample: {}
event_log_head_match:
  description: Whether the newest event_log row is identical in source and restore (drill).
  returned: action is drill and not check mode
  type: bool
  sample: true
duration_s:
  description: Wall time.
  returned: success and not check mode
  type: float
  sample: 42.1
"""


def main() -> None:
    module = AnsibleModule(
        argument_spec=restore_argument_spec(),
        supports_check_mode=True,
        required_if=[("action", "restore", ("target_db",))],
    )
    params = module.params
    try:
        cfg = config_from_params(params)
    except BackupError as exc:
        module.fail_json(msg=str(exc), error=str(exc))
    restorer = Restorer(cfg)
    action = params["action"]
    if module.check_mode:
        what = params["key"] or f"the newest backup under s3://{cfg.bucket}/{cfg.prefix}"
        target = params["target_db"] if action == "restore" else "a scratch database"
        result = {"changed": action == "restore", "msg": f"would restore {what} into {target}"}
        if module._diff and action == "restore":
            result["diff"] = {"before": f"database {target}\n", "after": f"database {target} <- {what}\n"}
        module.exit_json(**result)
    try:
        if action == "restore":
            out = restorer.restore(params["target_db"], key=params["key"], force=params["force"])
        else:
            out = restorer.drill(key=params["key"], scratch_db=params["scratch_db"])
    except BackupError as exc:
        module.fail_json(msg=str(exc), error=str(exc))
    if action == "drill" and not out["ok"]:
        detail = ", ".join(f"{t} source={c['source']} restored={c['restored']}" for t, c in out["mismatches"].items())
        if not out["event_log_head_match"]:
            detail = (detail + ", " if detail else "") + "event_log hash-chain head differs"
        msg = (
            f"Restore drill of {out['key']} failed: {detail}. The backup does not match the source database; "
            "take a new backup and investigate before relying on this one."
        )
        module.fail_json(msg=msg, error=msg, **out)
    result = {"changed": action == "restore", **out}
    if module._diff and action == "restore":
        result["diff"] = {
            "before": f"database {out['database']}\n",
            "after": f"database {out['database']} <- {out['key']}\n",
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
