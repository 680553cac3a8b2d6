"""Real state after converge: the compose file edited in place, every container recreated with the limits,
the `none` service untouched (the idempotence stage proves nothing is recreated a second time)."""

import json

testinfra_hosts = ["ansible://cloud"]


def inspect(host, name):
    out = host.run(f"docker inspect {name}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_compose_file_kept_and_logging_added(host):
    text = host.file("/opt/mol-cl/docker-compose.yml").content_string
    assert text.startswith("# mol-cl: compose_logging scenario\nname: mol-cl\n\nx-base: &base\n")
    assert '      - "127.0.0.1:28220:8080"   # the stand-in API\n' in text
    assert text.count('max-size: "10m"') == 2 and text.count('max-file: "3"') == 2
    assert "    logging:\n      driver: none\n" in text


def test_containers_have_the_limits(host):
    for name in ("mol-cl-web", "mol-cl-worker"):
        data = inspect(host, name)
        assert data["State"]["Running"], name
        assert data["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}


def test_kept_driver_untouched(host):
    assert inspect(host, "mol-cl-quiet")["HostConfig"]["LogConfig"]["Type"] == "none"


def test_api_answers_after_recreate(host):
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:28220/health').read().decode())"
    out = host.run(f'python3 -c "{code}"')
    assert out.rc == 0 and "git" in out.stdout
