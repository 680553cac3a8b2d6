"""The main job end to end: site.yml over SSH against the lab's real hosts.

The session fixture `site_applied` (tests/integration/site.py) does the order-sensitive part once: a dry run on a
fresh lab (which must change nothing and list what it would change), then the first real run.
"""

HOSTS = ("cloud1", "edge1", "edge2")


def test_check_diff_on_fresh_lab_changes_nothing_and_lists_changes(site_applied):
    run = site_applied.check_run
    assert run.returncode == 0, run.stdout[-4000:]
    for host in HOSTS:
        assert run.recap[host]["failed"] == 0, host
        assert run.recap[host]["unreachable"] == 0, host
        assert run.recap[host]["changed"] > 0, f"{host}: the dry run on a fresh lab reported nothing to change"
    # The diff names what would change: the logging block in the compose file and the app's busy_timeout.
    assert "max-size" in run.stdout
    assert "SQLITE_BUSY_TIMEOUT_MS=5000" in run.stdout
    assert site_applied.before_check == site_applied.after_check, "the --check run changed a host"


def test_first_run_succeeds_on_every_host(site_applied):
    first = site_applied.first_run
    assert first.returncode == 0, first.stdout[-4000:]
    for host in HOSTS:
        assert first.recap[host]["failed"] == 0, host
        assert first.recap[host]["unreachable"] == 0, host


def test_second_run_changes_nothing(site_applied):
    second = site_applied.lab.playbook("site.yml")
    assert second.returncode == 0, second.stdout[-4000:]
    for host in HOSTS:
        assert second.recap[host]["changed"] == 0, f"{host} changed on the second run:\n{second.stdout[-4000:]}"
        assert second.recap[host]["failed"] == 0, host


def test_unreachable_store_does_not_stop_the_others(site_applied):
    lab = site_applied.lab
    container = lab.docker.containers.get("crab-lab-edge2")
    container.pause()
    try:
        run = lab.playbook("playbooks/edge.yml", "-e", "ansible_ssh_timeout=5", "-T", "5")
    finally:
        container.unpause()
    assert run.recap["edge2"]["unreachable"] == 1 or run.recap["edge2"]["failed"] >= 1, run.stdout[-3000:]
    assert run.recap["edge1"]["failed"] == 0
    assert run.recap["edge1"]["unreachable"] == 0
    assert run.recap["edge1"]["ok"] > 0
