"""main() of crab_compose_logging, crab_compose_healthcheck and crab_compose_verify with patched args:
every exit and fail_json path, on real files and real docker containers."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

import module_utils.crab_compose as crab_compose

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "compose"
basic._ANSIBLE_PROFILE = "legacy"
sys.modules.setdefault("ansible.module_utils.crab_compose", crab_compose)


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "library" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


logging_mod = load("crab_compose_logging")
health_edit_mod = load("crab_compose_healthcheck")
verify_mod = load("crab_compose_verify")


def run(mod, args: dict, capsys, check_mode=False, diff=False) -> dict:
    args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
    with patch_module_args(args), pytest.raises(SystemExit):
        mod.main()
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ["crab_compose_logging", "crab_compose_healthcheck", "crab_compose_verify"])
def test_missing_ruamel_on_the_host_says_what_to_install(name, project, capsys, monkeypatch):
    # A real EC2 host may lack python3-ruamel.yaml: the module must say so, not die with an ImportError.
    monkeypatch.setitem(sys.modules, "ansible.module_utils.crab_compose", None)
    mod = load(name)
    args = {"project": "crab"} if name == "crab_compose_verify" else {"project_dir": str(project)}
    if name == "crab_compose_healthcheck":
        args["services"] = {"db": {"healthcheck": {"test": ["CMD", "true"]}}}
    out = run(mod, args, capsys)
    assert out["failed"] is True and "ruamel.yaml is missing" in out["msg"] and "python3-ruamel.yaml" in out["msg"]


@pytest.fixture
def project(tmp_path):
    shutil.copy(FIXTURES / "base.yml", tmp_path / "docker-compose.yml")
    return tmp_path


# --- crab_compose_logging -------------------------------------------------------------------------


def test_logging_check_mode_diff_then_apply_then_idempotent(project, capsys):
    before = (project / "docker-compose.yml").read_text()
    out = run(logging_mod, {"project_dir": str(project)}, capsys, check_mode=True, diff=True)
    assert out["changed"] is True and out["changed_services"] == ["app", "db"]
    assert out["diff"][0]["before"] == before and 'max-file: "3"' in out["diff"][0]["after"]
    assert (project / "docker-compose.yml").read_text() == before, "check mode wrote the file"
    out = run(logging_mod, {"project_dir": str(project), "backup": True}, capsys)
    assert out["changed"] is True and len(out["backups"]) == 1
    assert (project / "docker-compose.yml").read_text() == out_after(out, project)
    again = run(logging_mod, {"project_dir": str(project)}, capsys, diff=True)
    assert again["changed"] is False and again["changed_services"] == [] and "diff" in again


def out_after(out, project):
    return (project / "docker-compose.yml").read_text() if out["changed"] else None


def test_logging_skips_journald(tmp_path, capsys):
    shutil.copy(FIXTURES / "journald.yml", tmp_path / "compose.yaml")
    out = run(logging_mod, {"project_dir": str(tmp_path)}, capsys)
    assert out["skipped"][0]["service"] == "audit" and out["changed_services"] == ["app"]


def test_logging_fails_on_bad_limits(project, capsys):
    out = run(logging_mod, {"project_dir": str(project), "max_size": "lots"}, capsys)
    assert out["failed"] is True
    assert out["msg"].startswith("Cannot apply logging limits max_size='lots'")


def test_logging_fails_on_bad_file_with_line(tmp_path, capsys):
    shutil.copy(FIXTURES / "duplicate-keys.yml", tmp_path / "docker-compose.yml")
    before = (tmp_path / "docker-compose.yml").read_bytes()
    out = run(logging_mod, {"project_dir": str(tmp_path)}, capsys)
    assert out["failed"] is True and out["line"] == 6 and "duplicate key 'image'" in out["msg"]
    assert (tmp_path / "docker-compose.yml").read_bytes() == before


def test_logging_fails_without_compose_file(tmp_path, capsys):
    out = run(logging_mod, {"project_dir": str(tmp_path)}, capsys)
    assert out["failed"] is True and "no compose file" in out["msg"]


def test_logging_fails_when_write_fails(project, capsys, monkeypatch):
    def boom(*_a):
        raise OSError(30, "Read-only file system", str(project / "docker-compose.yml"))

    monkeypatch.setattr(crab_compose.os, "replace", boom)
    out = run(logging_mod, {"project_dir": str(project)}, capsys)
    assert out["failed"] is True and out["msg"].startswith("Cannot write") and "Read-only" in out["msg"]


# --- crab_compose_healthcheck ---------------------------------------------------------------------

HC = {
    "db": {"healthcheck": {"test": ["CMD-SHELL", "pg_isready -h 127.0.0.1"], "interval": "10s"}},
    "app": {"depends_on": {"db": {"condition": "service_healthy"}}},
}


def test_healthcheck_edit_check_mode_then_apply(project, capsys):
    before = (project / "docker-compose.yml").read_text()
    out = run(health_edit_mod, {"project_dir": str(project), "services": HC}, capsys, check_mode=True, diff=True)
    assert out["changed"] is True and out["changed_services"] == ["app", "db"]
    assert (project / "docker-compose.yml").read_text() == before
    out = run(health_edit_mod, {"project_dir": str(project), "services": HC}, capsys)
    data = crab_compose.load_data((project / "docker-compose.yml").read_text())
    assert data["services"]["app"]["depends_on"] == {"db": {"condition": "service_healthy"}}
    again = run(health_edit_mod, {"project_dir": str(project), "services": HC}, capsys)
    assert again["changed"] is False


@pytest.mark.parametrize(
    ("services", "text"),
    [
        ({"db": "healthcheck"}, "each service needs a map"),
        ({"app": {"depends_on": ["db"]}}, "depends_on must be given as a map"),
        ({"nope": {"healthcheck": {"test": ["NONE"]}}}, "no service named nope"),
    ],
)
def test_healthcheck_edit_fail_paths(project, capsys, services, text):
    out = run(health_edit_mod, {"project_dir": str(project), "services": services}, capsys)
    assert out["failed"] is True and text in out["msg"]


def test_healthcheck_edit_write_failure(project, capsys, monkeypatch):
    def boom(*_a):
        raise OSError(28, "No space left on device", str(project / "docker-compose.yml"))

    monkeypatch.setattr(crab_compose.os, "replace", boom)
    out = run(health_edit_mod, {"project_dir": str(project), "services": HC}, capsys)
    assert out["failed"] is True and "No space left" in out["msg"]


# --- crab_compose_verify (real containers) --------------------------------------------------------

PROJECT = "crab-cl-unit-verify"


def docker(*args):
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=120)


@pytest.fixture(scope="module")
def containers():
    names = {"good": f"{PROJECT}-good", "bad": f"{PROJECT}-bad"}
    for svc, name in names.items():
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        opts = ["--log-opt", "max-size=10m", "--log-opt", "max-file=3"] if svc == "good" else []
        docker(
            "run", "-d", "--name", name, "--network", "none",
            "--label", f"com.docker.compose.project={PROJECT}", "--label", f"com.docker.compose.service={svc}",
            "--log-driver", "json-file", *opts, "crab-lab/base:bookworm", "sleep", "600",
        )  # fmt: skip
    yield names
    for name in names.values():
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def test_verify_reports_and_fails_naming_drift(containers, capsys):
    out = run(verify_mod, {"project": PROJECT}, capsys)
    assert out["failed"] is True
    assert out["drifted"] == [containers["bad"]]
    assert containers["bad"] in out["msg"] and "max-size is unset, expected 10m" in out["msg"]
    rows = {r["service"]: r for r in out["containers"]}
    assert rows["good"]["ok"] is True and rows["good"]["options"] == {"max-size": "10m", "max-file": "3"}


def test_verify_report_only_and_exclude(containers, capsys):
    out = run(verify_mod, {"project": PROJECT, "report_only": True}, capsys, check_mode=True)
    assert out.get("failed") is not True and out["changed"] is False and out["drifted"] == [containers["bad"]]
    out = run(verify_mod, {"project": PROJECT, "exclude_services": ["bad"]}, capsys)
    assert out.get("failed") is not True and [r["service"] for r in out["containers"]] == ["good"]


def test_verify_no_containers(capsys):
    out = run(verify_mod, {"project": "crab-cl-unit-empty"}, capsys)
    assert out["failed"] is True and "has no containers" in out["msg"]
    out = run(verify_mod, {"project": "crab-cl-unit-empty", "require_containers": False}, capsys)
    assert out.get("failed") is not True


def test_verify_engine_unreachable(capsys, tmp_path):
    out = run(verify_mod, {"project": PROJECT, "docker_host": f"unix://{tmp_path}/none.sock"}, capsys)
    assert out["failed"] is True and "Cannot list the containers" in out["msg"]


def test_verify_without_docker_sdk(capsys, monkeypatch):
    monkeypatch.setattr(verify_mod, "HAS_DOCKER", False)
    out = run(verify_mod, {"project": PROJECT}, capsys)
    assert out["failed"] is True and "docker" in out["msg"]


def test_log_drift_pure():
    assert crab_compose.log_drift({"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}, "json-file",
                                  {"max-size": "10m", "max-file": "3"}) == []  # fmt: skip
    assert crab_compose.log_drift({"Type": "journald"}, "json-file", {}) == ["driver is journald, expected json-file"]
    assert os.path.isdir(FIXTURES)
