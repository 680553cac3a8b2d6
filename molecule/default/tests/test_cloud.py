"""Real state of the lab's cloud host after site.yml, read over SSH by testinfra (molecule/default)."""

import json

testinfra_hosts = ["cloud1"]


def test_every_compose_container_has_bounded_json_logs(host):
    ids = host.check_output("docker ps -q --filter label=com.docker.compose.project=crab").split()
    assert len(ids) >= 2
    for config in json.loads(host.check_output("docker inspect " + " ".join(ids))):
        log = config["HostConfig"]["LogConfig"]
        assert log == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}, config["Name"]


def test_compose_containers_are_healthy(host):
    # JSON rather than a Go template: commands pass through Ansible, which would treat {{ }} as Jinja.
    for config in json.loads(host.check_output("docker inspect crab-postgres crab-cloud")):
        assert config["State"]["Health"]["Status"] == "healthy", config["Name"]


def test_backup_job_is_installed_with_private_config(host):
    config = host.file("/etc/crab-ops/backup.json")
    assert config.mode == 0o600
    assert config.user == "root"
    assert host.file("/etc/cron.d/crab-ops-backup").contains("crab-backup")
    state = json.loads(host.file("/var/lib/crab-ops/backup-state.json").content_string)
    assert state["last_success"]
