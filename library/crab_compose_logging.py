#!/usr/bin/python
"""Ansible module: json-file log rotation for every service of a compose project, byte-preserving."""

from __future__ import annotations

import sys

from ansible.module_utils.basic import AnsibleModule

try:
    from ansible.module_utils.crab_compose import (
        ComposeError,
        ComposeProject,
        LoggingPolicy,
        describe,
        finish_plan,
        resolve_files,
    )
except ImportError as exc:  # crab_compose needs ruamel.yaml, which the managed host may lack
    COMPOSE_IMPORT_ERROR = exc
else:
    COMPOSE_IMPORT_ERROR = None

DOCUMENTATION = r"""
---
module: crab_compose_logging
short_description: Give every compose service json-file logging with size and count limits
description:
  - Edits the compose file(s) of a project in place so that every service logs with C(json-file) (or C(local))
    and has C(max-size) and C(max-file) options, written as quoted strings.
  - The file is not re-dumped. Positions come from the YAML parser, the text is edited, the result is parsed
    again and compared with the original; only C(logging) may differ. Comments, blank lines, indentation,
    quoting, key order, CRLF line endings and anchors stay byte-for-byte.
  - Decisions use the effective model (merge keys resolved, several files combined in order). Logging that
    comes from a shared anchor is changed once where it is defined.
  - Services with a remote or journald driver (syslog, gelf, fluentd, awslogs, journald, none, ...) are left
    alone and reported in C(skipped), unless O(mode=enforce).
  - Invalid options (for example C(compress) not "true"/"false", C(max-file) without C(max-size)) are rejected
    before anything is written. Bad input (invalid YAML, tabs, duplicate keys, C(services) not a map, a
    fragment file that is not a project) fails naming the file and line, and the file is untouched.
  - Writes atomically (temporary file in the same directory, then rename), follows symlinks to edit the
    target, keeps owner and mode.
version_added: "0.1.0"
author: crab-ops
requirements:
  - ruamel.yaml (Debian package python3-ruamel.yaml) on the managed host
options:
  project_dir:
    description: Directory of the compose project; relative O(files) and its C(.env) are read from here.
    type: path
    default: /opt/crab
  files:
    description:
      - Compose files in C(-f) order. Empty means C(COMPOSE_FILE) from C(<project_dir>/.env), else the first of
        C(compose.yaml), C(compose.yml), C(docker-compose.yaml), C(docker-compose.yml) that exists.
    type: list
    elements: path
    default: []
  max_size:
    description: Value for C(max-size) (docker size string such as C(10m)).
    type: str
    default: 10m
  max_file:
    description: Value for C(max-file) (whole number as a string).
    type: str
    default: "3"
  driver:
    description: Driver written where none is set (and forced in enforce mode).
    type: str
    choices: [json-file, local]
    default: json-file
  mode:
    description:
      - V(add) fills in only what is missing; existing values and remote drivers are kept.
      - V(enforce) writes the exact driver and values everywhere.
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
- name: Rotate the logs of every service in /opt/crab
  crab_compose_logging:
    project_dir: /opt/crab
    max_size: 10m
    max_file: "3"
  register: compose_logging_result

- name: Enforce exact values on an override pair
  crab_compose_logging:
    project_dir: /srv/app
    files: [docker-compose.yml, docker-compose.override.yml]
    mode: enforce
"""

RETURN = r"""
changed_services:
  description: Services whose effective logging changed (recreate these).
  returned: always
  type: list
  elements: str
  sample: [api, postgres]
skipped:
  description: Services left alone, with their driver and why.
  returned: always
  type: list
  elements: dict
  sample: [{"service": "audit", "driver": "journald", "reason": "remote or journald driver kept"}]
unchanged_services:
  description: Services that already complied.
  returned: always
  type: list
  elements: str
changes:
  description: Per service, the file edited and the effective logging before and after.
  returned: always
  type: list
  elements: dict
files:
  description: Every compose file considered, in order.
  returned: always
  type: list
  elements: str
backups:
  description: Backup copies written (O(backup=true) only).
  returned: changed
  type: list
  elements: str
"""


def run_module():
    module = AnsibleModule(
        argument_spec={
            "project_dir": {"type": "path", "default": "/opt/crab"},
            "files": {"type": "list", "elements": "path", "default": []},
            "max_size": {"type": "str", "default": "10m"},
            "max_file": {"type": "str", "default": "3"},
            "driver": {"type": "str", "default": "json-file", "choices": ["json-file", "local"]},
            "mode": {"type": "str", "default": "add", "choices": ["add", "enforce"]},
            "backup": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    if COMPOSE_IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"Cannot set compose logging: ruamel.yaml is missing on the managed host "
            f"({sys.executable}: {COMPOSE_IMPORT_ERROR}). Install the Debian package python3-ruamel.yaml there, or "
            "point ansible_python_interpreter at a Python that has it."
        )
    p = module.params
    try:
        policy = LoggingPolicy(max_size=p["max_size"], max_file=p["max_file"], mode=p["mode"], driver=p["driver"])
    except ValueError as exc:
        module.fail_json(
            msg=f"Cannot apply logging limits max_size={p['max_size']!r} max_file={p['max_file']!r}: {exc}."
        )
    try:
        files = resolve_files(p["project_dir"], p["files"])
        plan = ComposeProject(files).plan_logging(policy)
    except ComposeError as exc:
        module.fail_json(msg=f"Cannot set compose logging: {exc}.", path=exc.path, line=exc.line)
    result = describe(plan)
    backups = finish_plan(module, plan, files, p["backup"], result)
    if plan.changed and not module.check_mode:
        result["backups"] = backups
    module.exit_json(**result)


def main():
    run_module()


if __name__ == "__main__":
    main()
