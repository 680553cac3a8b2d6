"""Lab: the health checks pass after site.yml; with crab-postgres stopped the health playbook fails within
10 s naming postgres; afterwards crab-postgres is started again and waited for until healthy."""

import time

import pytest


def container_health(lab, name: str) -> str:
    c = lab.docker.containers.get(name)
    return (c.attrs["State"].get("Health") or {}).get("Status", c.status)


def wait_healthy(lab, names, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(container_health(lab, n) == "healthy" for n in names):
            return
        time.sleep(1)
    raise AssertionError({n: container_health(lab, n) for n in names})


def test_compose_healthchecks_are_live(site_applied):
    lab = site_applied.lab
    wait_healthy(lab, ["crab-postgres", "crab-cloud"])
    cfg = lab.docker.containers.get("crab-postgres").attrs["Config"]["Healthcheck"]["Test"]
    assert "pg_isready -q -h 127.0.0.1" in cfg[1] and "SELECT 1" in cfg[1]
    deps = lab.docker.containers.get("crab-cloud").attrs["Config"]["Labels"]["com.docker.compose.depends_on"]
    assert deps.startswith("postgres:service_healthy")


def test_health_playbook_passes(site_applied):
    run = site_applied.lab.playbook("playbooks/health.yml")
    assert run.returncode == 0, str(run)
    for name in ("postgres", "api", "containers", "disk:/"):
        assert f"OK   {name} (" in run.stdout


def test_cron_probe_installed(site_applied):
    lab = site_applied.lab
    out = lab.ssh("cloud1", "stat -c %a /etc/crab-ops/health.json; cat /etc/cron.d/crab-health", check=True).stdout
    assert out.startswith("600\n") and "/usr/local/sbin/crab-health" in out
    probe = lab.ssh("cloud1", "env -i /usr/local/sbin/crab-health; cat /var/lib/crab-ops/textfile/crab_health.prom")
    assert 'crab_health_check_ok{check="postgres",type="postgres"} 1' in probe.stdout


@pytest.fixture
def postgres_stopped(site_applied):
    lab = site_applied.lab
    lab.docker.containers.get("crab-postgres").stop(timeout=20)
    yield lab
    lab.docker.containers.get("crab-postgres").start()
    # crab-cloud may have been left waiting on its service_healthy dependency: start it too
    cloud = lab.docker.containers.get("crab-cloud")
    if cloud.status != "running":
        cloud.start()
    wait_healthy(lab, ["crab-postgres", "crab-cloud"])


def test_stopped_postgres_fails_within_10s_naming_it(postgres_stopped):
    start = time.monotonic()
    run = postgres_stopped.playbook("playbooks/health.yml")
    took = time.monotonic() - start
    assert run.returncode != 0 and run.recap["cloud1"]["failed"] == 1, str(run)
    assert "FAIL postgres (" in run.stdout and "failing: postgres (" in run.stdout
    assert took < 10, f"the health playbook took {took:.1f}s"
