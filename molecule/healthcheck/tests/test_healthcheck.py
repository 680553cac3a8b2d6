"""Real state after converge: compose healthchecks in the file and healthy containers, the probe installed and
working under cron's bare environment, its JSON state and Prometheus textfile, and a stopped PostgreSQL named."""

import datetime as dt
import json
import time

testinfra_hosts = ["ansible://cloud"]


def inspect(host, name):
    out = host.run(f"docker inspect {name}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_compose_file_has_healthchecks(host):
    text = host.file("/opt/mol-hc/docker-compose.yml").content_string
    assert text.startswith("# mol-hc: healthcheck scenario\nname: mol-hc\n")
    assert "pg_isready -q -h 127.0.0.1 -U crab -d crab" in text and "SELECT 1" in text
    assert '    depends_on:\n      postgres:\n        condition: "service_healthy"\n' in text


def test_containers_are_healthy(host):
    for name in ("mol-hc-postgres", "mol-hc-api"):
        assert inspect(host, name)["State"]["Health"]["Status"] == "healthy", name


def test_probe_files(host):
    conf = host.file("/etc/crab-ops/health.json")
    assert conf.mode == 0o600 and conf.user == "root"
    checks = {c.get("name", c["type"]): c for c in json.loads(conf.content_string)["checks"]}
    assert checks["postgres"]["container"] == "mol-hc-postgres" and "backup" in checks
    assert host.file("/usr/local/lib/crab-ops/crab_health.py").mode == 0o644
    assert host.file("/usr/local/sbin/crab-health").mode == 0o755
    assert "*/5 * * * * root /usr/local/sbin/crab-health" in host.file("/etc/cron.d/crab-health").content_string


def test_probe_under_bare_environment_writes_state(host):
    fresh = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    host.run(f"""echo '{{"last_success": "{fresh}"}}' > /var/lib/crab-ops/backup-state.json""")
    out = host.run("env -i /usr/local/sbin/crab-health /etc/crab-ops/health.json")
    host.run("rm -f /var/lib/crab-ops/backup-state.json")
    assert out.rc == 0, out.stdout + out.stderr
    state = json.loads(host.file("/var/lib/crab-ops/health.json").content_string)
    assert state["ok"] is True and {c["name"] for c in state["checks"]} >= {"postgres", "api", "backup", "disk:/"}
    prom = host.file("/var/lib/crab-ops/textfile/crab_health.prom").content_string
    assert 'crab_health_check_ok{check="postgres",type="postgres"} 1' in prom


def test_stopped_postgres_is_named_quickly(host):
    assert host.run("docker stop mol-hc-postgres").rc == 0
    try:
        start = time.monotonic()
        out = host.run("/usr/local/sbin/crab-health /etc/crab-ops/health.json")
        took = time.monotonic() - start
    finally:
        host.run("docker start mol-hc-postgres")
    assert out.rc == 1 and "postgres (" in out.stdout
    assert took < 10
