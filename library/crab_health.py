#!/usr/bin/python
"""Ansible module: run the crab health checks now and fail naming every failing check."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.crab_health import CheckConfigError, build_checks, run_checks, summary

DOCUMENTATION = r"""
---
module: crab_health
short_description: Check PostgreSQL, HTTP endpoints, backup freshness, disk space and compose containers
description:
  - Runs every configured check in parallel, each with its own timeout, and returns one result per check
    C({name, type, ok, latency_ms, detail}).
  - C(postgres) runs C(SELECT 1) through the container (docker exec psql with PGCONNECT_TIMEOUT and
    statement_timeout); the whole check is bounded by its timeout, which kills the subprocess, so a stopped
    container fails fast and a paused one gives a timeout result.
  - C(http) checks the status and optional JSON keys; C(backup) reads the backup state file's C(last_success)
    (a missing file fails); C(disk) checks free space; C(containers) checks the state, health and restart count
    of every container of a compose project.
  - Fails naming every failing check unless O(report_only=true). Read-only; never reports changed.
version_added: "0.1.0"
author: crab-ops
options:
  checks:
    description:
      - List of checks. Each has C(type) (postgres, http, backup, disk, containers), C(name), optional
        C(timeout) in seconds and the type's own fields, for example C(container), C(database), C(user)
        (postgres), C(url), C(expect_status), C(json_keys) (http), C(state_file), C(max_age_hours) (backup),
        C(path), C(min_free_percent), C(min_free_mb) (disk), C(project), C(max_restarts) (containers).
      - A check with C(enabled=false) is skipped.
    type: list
    elements: dict
    required: true
  report_only:
    description: Return the results without failing.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is no diff.
"""

EXAMPLES = r"""
- name: PostgreSQL and the API answer
  crab_health:
    checks:
      - {type: postgres, name: postgres, container: crab-postgres, database: crab, user: crab, timeout: 5}
      - {type: http, name: api, url: "http://127.0.0.1:18080/health", json_keys: [git], timeout: 5}
      - {type: disk, name: disk_root, path: /, min_free_percent: 10}
  register: healthcheck_result
"""

RETURN = r"""
results:
  description: One entry per check.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "postgres", "type": "postgres", "ok": true, "latency_ms": 84.2, "detail": "SELECT 1 -> 1"}]
failing:
  description: Names of the failing checks.
  returned: always
  type: list
  elements: str
summary:
  description: One sentence naming what fails, or that all pass.
  returned: always
  type: str
"""


def run_module():
    module = AnsibleModule(
        argument_spec={
            "checks": {"type": "list", "elements": "dict", "required": True},
            "report_only": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    specs = [c for c in module.params["checks"] if c.get("enabled", True)]
    for spec in specs:
        if spec.get("password"):
            module.no_log_values.add(str(spec["password"]))
    try:
        checks = build_checks(specs)
    except CheckConfigError as exc:
        module.fail_json(msg=f"Cannot run the health checks: {exc}.")
    results = run_checks(checks)
    failing = [r["name"] for r in results if not r["ok"]]
    out = {"changed": False, "results": results, "failing": failing, "summary": summary(results)}
    if failing and not module.params["report_only"]:
        module.fail_json(
            msg=f"Health checks failed: {summary(results)}. Fix the named services, then run the checks again.",
            **out,
        )
    module.exit_json(**out)


def main():
    run_module()


if __name__ == "__main__":
    main()
