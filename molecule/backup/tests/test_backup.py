"""Real state after converge on the scenario's cloud container: files and modes, the cron entry, the state file,
the object in S3 with the recorded sha256, the cron job under cron's bare environment, and a restore drill."""

import json

testinfra_hosts = ["ansible://cloud"]

LIB = "/usr/local/lib/crab-ops"
PY = (
    f"import json, sys; sys.path.insert(0, '{LIB}'); import crab_backup as cb;"
    " cfg = cb.load_config_file('/etc/crab-ops/backup.json');"
)


def _py(host, code: str):
    out = host.run(f'python3 -c "{PY} {code}"')
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)


def test_files_and_modes(host):
    assert host.file("/var/backups/crab").mode == 0o700
    assert host.file("/etc/crab-ops").mode == 0o700
    conf = host.file("/etc/crab-ops/backup.json")
    assert conf.mode == 0o600 and conf.user == "root"
    assert json.loads(conf.content_string)["container"] == "mol-backup-postgres"
    assert host.file(f"{LIB}/crab_backup.py").mode == 0o644
    assert host.file("/usr/local/sbin/crab-backup").mode == 0o755
    backups = host.run("ls /var/backups/crab").stdout.split()
    assert backups and all(name.startswith("crab-") and name.endswith(".dump.zst") for name in backups)
    for name in backups:
        assert host.file(f"/var/backups/crab/{name}").mode == 0o600


def test_cron_entry(host):
    cron = host.file("/etc/cron.d/crab-ops-backup").content_string
    assert "15 2 * * * root /usr/local/sbin/crab-backup --config /etc/crab-ops/backup.json" in cron


def test_state_and_object_agree(host):
    state = json.loads(host.file("/var/lib/crab-ops/backup-state.json").content_string)
    assert state["last_status"] == "ok" and state["error"] is None
    head = _py(
        host,
        "h = cb.S3Store(cfg).head(json.load(open(cfg.state_file))['key']);"
        " print(json.dumps({'size': h['ContentLength'], 'meta': h['Metadata']}))",
    )
    assert head["size"] == state["size"]
    assert head["meta"]["sha256"] == state["sha256"]


def test_cron_job_under_bare_environment_then_drill(host):
    before = json.loads(host.file("/var/lib/crab-ops/backup-state.json").content_string)
    run = host.run("cd / && env -i PATH=/usr/bin:/bin /usr/local/sbin/crab-backup --config /etc/crab-ops/backup.json")
    assert run.rc == 0, run.stderr
    after = json.loads(host.file("/var/lib/crab-ops/backup-state.json").content_string)
    assert after["key"] != before["key"] and after["last_status"] == "ok"
    assert after["key"] in run.stdout
    drill = _py(host, "print(json.dumps(cb.Restorer(cfg).drill()))")
    assert drill["ok"], drill
    assert drill["counts"]["public.orders"] == 20000
    assert drill["key"] == after["key"]
