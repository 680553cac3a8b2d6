"""Lab: after site.yml every running container of project `crab` logs json-file 10m x 3, the compose file on
cloud1 keeps its comments, and the limits hold on a container that writes logs fast."""

import json
import time

import pytest

PROJECT = "crab"
WANT = {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}


def test_every_running_container_has_the_limits(site_applied):
    assert site_applied.first_run.returncode == 0, str(site_applied.first_run)
    containers = site_applied.lab.docker.containers.list(filters={"label": f"com.docker.compose.project={PROJECT}"})
    names = sorted(c.name for c in containers)
    assert {"crab-postgres", "crab-cloud"} <= set(names), names
    for c in containers:
        c.reload()
        assert c.attrs["HostConfig"]["LogConfig"] == WANT, (c.name, c.attrs["HostConfig"]["LogConfig"])


def test_compose_file_kept_its_comments(site_applied):
    text = site_applied.lab.ssh("cloud1", "cat /opt/crab/docker-compose.yml", check=True).stdout
    assert "# crab cloud services as deployed in production today" in text.split("services:")[0]
    assert "    # lab images are built locally; there is no registry to pull from\n" in text
    assert text.count('max-size: "10m"') == 2 and text.count('max-file: "3"') == 2


def test_verify_module_reports_no_drift(site_applied):
    lab = site_applied.lab
    out = lab.ssh(
        "cloud1",
        "python3 -c \"import docker, json; c = docker.from_env(); print(json.dumps([x.attrs['HostConfig']['LogConfig']"
        " for x in c.containers.list(filters={'label': 'com.docker.compose.project=crab'})]))\"",
        check=True,
    )
    assert all(cfg == WANT for cfg in json.loads(out.stdout))


@pytest.fixture
def chatty(lab):
    """A container with the role's limits scaled down (1k x 3) that writes logs as fast as it can for 5 s."""
    name = "crab-cl-it-chatty"
    for old in lab.docker.containers.list(all=True, filters={"name": name}):
        old.remove(force=True)
    container = lab.docker.containers.run(
        "crab-lab/base:bookworm",
        ["sh", "-c", "end=$(($(date +%s)+5)); while [ $(date +%s) -lt $end ]; do seq 1 2000; done; sleep 600"],
        name=name,
        detach=True,
        network_mode="none",
        log_config={"type": "json-file", "config": {"max-size": "1k", "max-file": "3"}},
    )
    yield container
    container.remove(force=True)


def test_limits_hold_under_fast_logging(chatty, lab):
    time.sleep(7)
    chatty.reload()
    log_path = chatty.attrs["LogPath"]
    out = lab.docker.containers.run(
        "crab-lab/base:bookworm",
        ["sh", "-c", f"ls -l {log_path}* | awk '{{print $5}}'"],
        volumes={"/var/lib/docker/containers": {"bind": "/var/lib/docker/containers", "mode": "ro"}},
        network_mode="none",
        remove=True,
    )
    sizes = [int(s) for s in out.decode().split()]
    assert 1 <= len(sizes) <= 3, sizes
    # json-file rotates after the write that crosses max-size: one line of slack per file
    assert all(s <= 1024 + 200 for s in sizes), sizes
    assert sum(sizes) <= 3 * (1024 + 200)
