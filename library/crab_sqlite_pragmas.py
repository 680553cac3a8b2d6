#!/usr/bin/python
"""Ansible module: set a SQLite database's journal mode (verified from the file header) and report its health."""

from __future__ import annotations

import os
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crab_sqlite import ConnectionStatus, SqliteError, SqlitePragmas

DOCUMENTATION = r"""
---
module: crab_sqlite_pragmas
short_description: Set a SQLite database's journal mode, verify it from the file header, report health
description:
  - Checks that O(path) is a SQLite 3 file from its 16-byte header and a sane 100-byte header before SQLite
    opens it, so a wrong path never becomes a new empty database.
  - Refuses to run unless the effective user owns the file, so no C(-wal)/C(-shm) file owned by another user
    (root) locks the application out. Run it with C(become_user) set to the database owner.
  - Switches the journal mode with a busy timeout (the switch needs an exclusive lock for a moment) and verifies
    the result from the file header (bytes 18/19 are 2 in WAL mode).
  - Returns the file-level settings before and after, and health facts - journal mode from the header,
    WAL size, C(wal_checkpoint(PASSIVE)) frames, freelist ratio, and an optional C(quick_check) with a time limit.
  - Optionally waits until every live connection of the application reports the expected per-connection
    settings in its status file (C(<role>-<pid>.json) in O(status_dir)), written after O(status_newer_than).
  - Per-connection settings (busy_timeout, synchronous, foreign_keys, ...) are not stored in the file; the role
    C(sqlite_pragmas) writes them to the application's configuration.
version_added: "0.1.0"
author: crab-ops
options:
  path:
    description: Path of the SQLite database file. Symlinks are resolved; side files live next to the real file.
    type: path
    required: true
  journal_mode:
    description:
      - Journal mode to store in the file. Only these two are persistent in the file header
        (C(truncate) and C(persist) are per-connection variants of C(delete)).
    type: str
    choices: [wal, delete]
    default: wal
  busy_timeout_ms:
    description: How long to wait for other connections' locks while switching, in milliseconds.
    type: int
    default: 5000
  quick_check:
    description:
      - Run C(PRAGMA quick_check) and return its result. In check mode it runs only when a read-only open
        creates no file.
    type: bool
    default: false
  quick_check_timeout_s:
    description: Stop C(quick_check) after this many seconds and report C(timed_out) instead of a verdict.
    type: float
    default: 30
  status_dir:
    description:
      - Directory where the application writes one JSON status file per connection, named C(<role>-<pid>.json).
      - When set (and not in check mode), the module waits until every live connection reports O(status_expect).
      - After a journal mode switch, only reports written after the switch count.
    type: path
  status_expect:
    description:
      - Settings every connection must report, as status-file key to value. C(synchronous) accepts names or
        numbers (C(NORMAL) = C(1)); flags accept C(true)/C(on)/C(1).
    type: dict
    default: {}
  status_section:
    description:
      - Key of the status files' JSON object that holds the settings (the lab's stand-in uses C(pragmas)).
        Empty means the top level.
    type: str
    default: ""
  status_newer_than:
    description:
      - A file (the application's config) whose modification time status files must be newer than, so that
        reports written before the last restart are not trusted.
    type: path
  status_wait_s:
    description: How long to wait for the connections to report the expected settings, in seconds.
    type: float
    default: 30
  status_min_connections:
    description: Fewest live connections that must report; fewer fails the task.
    type: int
    default: 1
attributes:
  check_mode:
    support: full
    details: Reads the header only; never opens the file for writing; skips the connection check.
  diff_mode:
    support: full
    details: Shows the file-level settings before and after.
notes:
  - Runs on the target host with Python's C(sqlite3) module; needs no sqlite3 CLI.
seealso:
  - name: SQLite database file format
    link: https://sqlite.org/fileformat.html
  - name: Write-Ahead Logging
    link: https://sqlite.org/wal.html
"""

EXAMPLES = r"""
- name: Put the edge database in WAL mode, as its owner
  crab_sqlite_pragmas:
    path: /var/lib/crab/edge.db
    journal_mode: wal
    busy_timeout_ms: 5000
  become: true
  become_user: crab

- name: Check the database and that every connection uses busy_timeout 5000
  crab_sqlite_pragmas:
    path: /var/lib/crab/edge.db
    quick_check: true
    quick_check_timeout_s: 10
    status_dir: /run/crab/edge-server
    status_section: pragmas
    status_expect:
      busy_timeout: 5000
      synchronous: NORMAL
    status_newer_than: /etc/crab/edge-server.conf
  become: true
  become_user: crab
"""

RETURN = r"""
path:
  description: The real path of the database (symlinks resolved).
  returned: always
  type: str
  sample: /var/lib/crab/edge.db
before:
  description: File-level settings read from the header before the run.
  returned: always
  type: dict
  sample: {journal_mode: delete, page_size: 4096, auto_vacuum: none, encoding: UTF-8, user_version: 0,
           application_id: 0}
after:
  description: File-level settings read from the header after the run (what they would be, in check mode).
  returned: always
  type: dict
  sample: {journal_mode: wal, page_size: 4096, auto_vacuum: none, encoding: UTF-8, user_version: 0,
           application_id: 0}
owner:
  description: Owner of the database file.
  returned: always
  type: str
  sample: crab
mode:
  description: Permission bits of the database file (unchanged by the module).
  returned: always
  type: str
  sample: "0640"
health:
  description:
    - Health facts. C(checkpoint) holds the result of C(wal_checkpoint(PASSIVE)) in WAL mode (not in check mode);
      C(frames_behind) > 0 means readers keep the checkpoint from finishing (checkpoint starvation).
  returned: always
  type: dict
  sample:
    journal_mode_header: wal
    wal_size_bytes: 4152
    wal_frames_estimate: 1
    checkpoint: {mode: PASSIVE, busy: false, wal_frames: 1, checkpointed_frames: 1, frames_behind: 0}
    page_size: 4096
    page_count: 246
    freelist_count: 0
    freelist_ratio: 0.0
    file_size_bytes: 1007616
    sqlite_version_last_written: 3.40.1
    quick_check: {ran: true, ok: true, timed_out: false, seconds: 0.007, result: [ok]}
side_files:
  description: Side files next to the database after the run (C(-wal), C(-shm), C(-journal)).
  returned: when not in check mode
  type: list
  elements: str
  sample: ["-shm", "-wal"]
connections:
  description: What the application's live connections report; C(checked) is false when O(status_dir) is unset
    or in check mode.
  returned: always
  type: dict
  sample:
    checked: true
    ok: true
    count: 3
    waited_s: 2.5
    stale: []
    connections:
      - {file: orders-101.json, role: orders, pid: 101, settings: {busy_timeout: 5000}}
"""


def _diff_text(settings: dict) -> str:
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "journal_mode": {"type": "str", "choices": ["wal", "delete"], "default": "wal"},
            "busy_timeout_ms": {"type": "int", "default": 5000},
            "quick_check": {"type": "bool", "default": False},
            "quick_check_timeout_s": {"type": "float", "default": 30.0},
            "status_dir": {"type": "path"},
            "status_expect": {"type": "dict", "default": {}},
            "status_section": {"type": "str", "default": ""},
            "status_newer_than": {"type": "path"},
            "status_wait_s": {"type": "float", "default": 30.0},
            "status_min_connections": {"type": "int", "default": 1},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        core = SqlitePragmas(
            p["path"],
            busy_timeout_ms=p["busy_timeout_ms"],
            quick_check=p["quick_check"],
            quick_check_timeout_s=p["quick_check_timeout_s"],
        )
        result = core.run(journal_mode=p["journal_mode"], check_mode=module.check_mode)
        finished = time.time()
    except SqliteError as exc:
        module.fail_json(msg=str(exc))

    for warning in result.pop("warnings", []):
        module.warn(warning)
    result["connections"] = {"checked": False}
    if p["status_dir"] and not module.check_mode:
        # After a switch, only reports written after it count: they show whether the connections moved to WAL.
        newer_than = finished if result["changed"] else 0.0
        if p["status_newer_than"]:
            try:
                newer_than = max(newer_than, os.stat(p["status_newer_than"]).st_mtime)
            except OSError as exc:
                module.fail_json(
                    msg=f"Cannot read status_newer_than {p['status_newer_than']}: {exc.strerror}. "
                    "Point it at the application's config file.",
                    **result,
                )
        try:
            report = ConnectionStatus(
                p["status_dir"],
                p["status_expect"],
                newer_than=newer_than,
                wait_s=p["status_wait_s"],
                min_connections=p["status_min_connections"],
                section=p["status_section"],
            ).wait()
        except SqliteError as exc:
            module.fail_json(msg=str(exc), **result)
        result["connections"] = {
            "checked": True,
            "ok": report["ok"],
            "count": len(report["connections"]),
            "waited_s": report["waited_s"],
            "stale": report["stale"],
            "connections": report["connections"],
        }

    if module._diff:
        result["diff"] = {
            "before_header": f"{result['path']} (file header)",
            "after_header": f"{result['path']} (file header)",
            "before": _diff_text(result["before"]),
            "after": _diff_text(result["after"]),
        }
    module.exit_json(**result)


if __name__ == "__main__":
    main()
