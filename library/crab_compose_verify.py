#!/usr/bin/python
"""Ansible module: compare the LogConfig of every container of a compose project with the expected one."""

from __future__ import annotations

import sys

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

try:
    from ansible.module_utils.crab_compose import ProjectLogVerifier
except ImportError as exc:  # crab_compose needs ruamel.yaml, which the managed host may lack
    COMPOSE_IMPORT_ERROR = exc
else:
    COMPOSE_IMPORT_ERROR = None

try:
    import docker

    HAS_DOCKER = True
except ImportError:
    HAS_DOCKER = False

DOCUMENTATION = r"""
---
module: crab_compose_verify
short_description: Verify that every container of a compose project runs with the expected log settings
description:
  - Lists every container labelled C(com.docker.compose.project=<project>) through the docker SDK and compares
    C(HostConfig.LogConfig) with the expected driver and options.
  - Returns one entry per container with its drift; fails naming each container with drift unless
    O(report_only=true). Read-only; never reports changed.
  - Catches "the file says limits, the container does not" (a compose edit that was never applied).
version_added: "0.1.0"
author: crab-ops
requirements:
  - ruamel.yaml (Debian package python3-ruamel.yaml) on the managed host
  - docker (Python SDK) on the managed host
options:
  project:
    description: Compose project name (label C(com.docker.compose.project)).
    type: str
    required: true
  driver:
    description: Expected log driver.
    type: str
    default: json-file
  max_size:
    description: Expected C(max-size).
    type: str
    default: 10m
  max_file:
    description: Expected C(max-file).
    type: str
    default: "3"
  exclude_services:
    description: Services not to check (for example those kept on a remote driver).
    type: list
    elements: str
    default: []
  running_only:
    description: Check only running containers.
    type: bool
    default: false
  require_containers:
    description: Fail when the project has no container at all.
    type: bool
    default: true
  report_only:
    description: Report drift without failing.
    type: bool
    default: false
  docker_host:
    description: Docker engine URL.
    type: str
    default: unix:///var/run/docker.sock
attributes:
  check_mode:
    support: full
    description: Read-only; runs the same in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is no diff.
"""

EXAMPLES = r"""
- name: Every container of project crab logs json-file 10m x 3
  crab_compose_verify:
    project: crab
    max_size: 10m
    max_file: "3"
"""

RETURN = r"""
containers:
  description: One entry per container with name, service, state, driver, options, ok and drift.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "crab-postgres", "service": "postgres", "state": "running", "driver": "json-file",
            "options": {"max-size": "10m", "max-file": "3"}, "ok": true, "drift": []}]
drifted:
  description: Names of containers whose LogConfig differs.
  returned: always
  type: list
  elements: str
"""


def run_module():
    module = AnsibleModule(
        argument_spec={
            "project": {"type": "str", "required": True},
            "driver": {"type": "str", "default": "json-file"},
            "max_size": {"type": "str", "default": "10m"},
            "max_file": {"type": "str", "default": "3"},
            "exclude_services": {"type": "list", "elements": "str", "default": []},
            "running_only": {"type": "bool", "default": False},
            "require_containers": {"type": "bool", "default": True},
            "report_only": {"type": "bool", "default": False},
            "docker_host": {"type": "str", "default": "unix:///var/run/docker.sock"},
        },
        supports_check_mode=True,
    )
    if COMPOSE_IMPORT_ERROR is not None:
        module.fail_json(
            msg=f"Cannot verify container log settings: ruamel.yaml is missing on the managed host "
            f"({sys.executable}: {COMPOSE_IMPORT_ERROR}). Install the Debian package python3-ruamel.yaml there, or "
            "point ansible_python_interpreter at a Python that has it."
        )
    p = module.params
    if not HAS_DOCKER:
        module.fail_json(msg=missing_required_lib("docker"))
    try:
        client = docker.DockerClient(base_url=p["docker_host"], timeout=30)
        rows = ProjectLogVerifier(client, p["project"]).check(
            p["driver"],
            {"max-size": p["max_size"], "max-file": p["max_file"]},
            exclude_services=p["exclude_services"],
            running_only=p["running_only"],
        )
    except docker.errors.DockerException as exc:
        module.fail_json(
            msg=f"Cannot list the containers of project {p['project']} at {p['docker_host']}: {exc}; "
            "check that the docker engine runs and this user may use its socket."
        )
    drifted = [r["name"] for r in rows if not r["ok"]]
    result = {"changed": False, "containers": rows, "drifted": drifted}
    if not rows and p["require_containers"] and not p["report_only"]:
        module.fail_json(
            msg=f"Project {p['project']} has no containers, so its log settings cannot be verified; "
            "start it with docker compose up -d or check the project name.",
            **result,
        )
    if drifted and not p["report_only"]:
        detail = "; ".join(f"{r['name']}: {', '.join(r['drift'])}" for r in rows if not r["ok"])
        module.fail_json(
            msg=f"Log settings drift in project {p['project']} on {len(drifted)} container(s): {detail}; "
            "recreate them with docker compose up -d --no-deps <service>.",
            **result,
        )
    module.exit_json(**result)


def main():
    run_module()


if __name__ == "__main__":
    main()
