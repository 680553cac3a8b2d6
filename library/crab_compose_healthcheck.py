#!/usr/bin/python
"""Ansible module: set healthcheck / depends_on keys of compose services, byte-preserving."""

from __future__ import annotations

import sys

from ansible.module_utils.basic import AnsibleModule

try:
    from ansible.module_utils.crab_compose import ComposeError, ComposeProject, describe, finish_plan, resolve_files
except ImportError as exc:  # crab_compose needs ruamel.yaml, which the managed host may lack
    COMPOSE_IMPORT_ERROR = exc
else:
    COMPOSE_IMPORT_ERROR = None

DOCUMENTATION = r"""
---
module: crab_compose_healthcheck
short_description: Add healthchecks and depends_on conditions to compose services without rewriting the file
description:
  - Sets whole keys of compose services, typically C(healthcheck) and C(depends_on), with the same
    byte-preserving core as crab_compose_logging. Only the named keys may change; the result is parsed again and
    compared with the original before anything is written.
  - C(depends_on) entries are merged into what is there; a list form is turned into the map form, keeping each
    existing dependency with C(condition=service_started).
version_added: "0.1.0"
author: crab-ops
requirements:
  - ruamel.yaml (Debian package python3-ruamel.yaml) on the managed host
options:
  project_dir:
    description: Directory of the compose project.
    type: path
    default: /opt/crab
  files:
    description: Compose files in C(-f) order; empty means C(COMPOSE_FILE) from C(.env) or the default names.
    type: list
    elements: path
    default: []
  services:
    description: Map of service name to the keys to set (key name to its value, for example C(healthcheck)).
    type: dict
    required: true
  mode:
    description: V(add) writes a key only where the service has none; V(enforce) also replaces a differing value.
    type: str
    choices: [add, enforce]
    default: add
  backup:
    description: Keep a timestamped copy of each file before changing it.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Computes every edit and returns it without writing.
  diff_mode:
    support: full
    description: Returns the before/after text of each changed file.
"""

EXAMPLES = r"""
- name: PostgreSQL healthcheck and the API waiting for it
  crab_compose_healthcheck:
    project_dir: /opt/crab
    services:
      postgres:
        healthcheck:
          test: ["CMD-SHELL", "pg_isready -h 127.0.0.1 -U crab"]
          interval: 10s
      api:
        depends_on:
          postgres:
            condition: service_healthy
"""

RETURN = r"""
changed_services:
  description: Services whose definition changed (recreate these).
  returned: always
  type: list
  elements: str
changes:
  description: Per service and key, the file edited and the value before and after.
  returned: always
  type: list
  elements: dict
files:
  description: The compose files considered.
  returned: always
  type: list
  elements: str
"""


def run_module():
    module = AnsibleModule(
        argument_spec={
            "project_dir": {"type": "path", "default": "/opt/crab"},
            "files": {"type": "list", "elements": "path", "default": []},
            "services": {"type": "dict", "required": True},
            "mode": {"type": "str", "default": "add", "choices": ["add", "enforce"]},
            "backup": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    if COMPOSE_IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"Cannot set compose healthchecks: ruamel.yaml is missing on the managed host "
            f"({sys.executable}: {COMPOSE_IMPORT_ERROR}). Install the Debian package python3-ruamel.yaml there, or "
            "point ansible_python_interpreter at a Python that has it."
        )
    p = module.params
    bad = [name for name, keys in p["services"].items() if not isinstance(keys, dict)]
    if bad:
        module.fail_json(
            msg=f"Cannot set compose keys for {', '.join(bad)}: each service needs a map of keys; "
            "write services as {name: {healthcheck: ...}}."
        )
    try:
        files = resolve_files(p["project_dir"], p["files"])
        plan = ComposeProject(files).plan_service_keys(p["services"], p["mode"])
    except ComposeError as exc:
        module.fail_json(msg=f"Cannot set compose healthchecks: {exc}.", path=exc.path, line=exc.line)
    except ValueError as exc:
        module.fail_json(msg=f"Cannot set compose healthchecks in {p['project_dir']}: {exc}.")
    result = describe(plan)
    result.pop("skipped", None)
    finish_plan(module, plan, files, p["backup"], result)
    module.exit_json(**result)


def main():
    run_module()


if __name__ == "__main__":
    main()
