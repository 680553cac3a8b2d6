"""The compose editing core on the real-world corpus and on hand-written fixtures (no Ansible)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from module_utils.crab_compose import (
    ComposeError,
    ComposeProject,
    LoggingPolicy,
    apply,
    describe,
    load_data,
    resolve_files,
    validate_options,
    write_atomic,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "compose"
COMPOSE_BIN = Path(sys.executable).parent / "docker-compose"
WANT = {"max-size": "10m", "max-file": "3"}

# Corpus projects: the main file first, then the files compose combines with it.
CORPUS_PROJECTS = {
    "airflow": ["apache__airflow__docker-compose.yml"],
    "appwrite": ["appwrite__appwrite__docker-compose.yml"],
    "frappe+mariadb": ["frappe__frappe_docker__compose.yml", "frappe__frappe_docker__overrides-compose.mariadb.yml"],
    "sentry": ["getsentry__self-hosted__docker-compose.yml"],
    "authentik": ["goauthentik__authentik__docker-compose.yml"],
    "immich": ["immich-app__immich__docker-compose.yml"],
    "jitsi": ["jitsi__docker-jitsi-meet__docker-compose.yml"],
    "mattermost": ["mattermost__docker__docker-compose.yml"],
    "netbox+override": [
        "netbox-community__netbox-docker__docker-compose.yml",
        "netbox-community__netbox-docker__docker-compose.override.example.yml",
    ],
    "paperless": ["paperless-ngx__paperless-ngx__docker-compose.postgres-tika.yml"],
    "plausible+caddy": [
        "plausible__community-edition__docker-compose.yml",
        "plausible__community-edition__reverse-proxy-docker-compose.caddy-gen.yml",
    ],
    "frappe-mariadb-alone": ["frappe__frappe_docker__overrides-compose.mariadb.yml"],
    "caddy-alone": ["plausible__community-edition__reverse-proxy-docker-compose.caddy-gen.yml"],
}


def copy_project(corpus_dir: Path, names: list[str], tmp_path: Path) -> list[str]:
    out = []
    for name in names:
        shutil.copy(corpus_dir / "compose" / name, tmp_path / name)
        out.append(str(tmp_path / name))
    return out


def compose_config(files: list[str]) -> dict:
    """The effective model as docker compose itself computes it (no interpolation, no consistency checks)."""
    argv = [str(COMPOSE_BIN)]
    for f in files:
        argv += ["-f", f]
    argv += ["config", "--no-interpolate", "--no-consistency", "--format", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=os.path.dirname(files[0]), timeout=60, check=False)
    assert proc.returncode == 0, f"docker compose config failed: {proc.stderr}"
    return json.loads(proc.stdout)


def without_logging(model: dict) -> dict:
    """The model minus service logging and logging inside `x-` extensions (where shared anchors live)."""
    model = json.loads(json.dumps(model))
    for svc in model.get("services", {}).values():
        svc.pop("logging", None)
    for key, value in model.items():
        if key.startswith("x-") and isinstance(value, dict):
            value.pop("logging", None)
    return model


def remove_insertions(after: str, edits) -> str:
    for e in sorted(edits, key=lambda e: e.start, reverse=True):
        assert e.start == e.end, "add mode on the corpus must only insert"
    # edits were applied one pass at a time; undo by removing each inserted block from the final text
    text = after
    for e in edits:
        idx = text.find(e.text)
        assert idx >= 0
        text = text[:idx] + text[idx + len(e.text) :]
    return text


@pytest.mark.parametrize("project", sorted(CORPUS_PROJECTS), ids=str)
def test_corpus_add_mode(project, corpus_dir, tmp_path):
    files = copy_project(corpus_dir, CORPUS_PROJECTS[project], tmp_path)
    originals = {f: Path(f).read_bytes() for f in files}
    model_before = compose_config(files)
    plan = ComposeProject(files).plan_logging(LoggingPolicy())
    assert plan.changed, "every corpus project lacks limits on at least one service"
    for r in plan.files:
        # bytes outside the inserted blocks are identical
        assert remove_insertions(r.after, r.edits).encode() == originals[r.path]
        load_data(r.after, r.path)  # re-parses
    apply(plan)
    model_after = compose_config(files)
    assert without_logging(model_before) == without_logging(model_after), "only logging may change"
    skipped = {s["service"] for s in plan.skipped}
    for name, svc in model_after["services"].items():
        if name in skipped:
            continue
        logging = svc.get("logging") or {}
        assert logging.get("driver") in ("json-file", "local"), f"{name}: {logging}"
        opts = logging.get("options") or {}
        assert set(WANT) <= set(opts), f"{name} lacks limits: {opts}"
        if name in set(describe(plan)["changed_services"]) and "max-file" not in (
            (model_before["services"][name].get("logging") or {}).get("options") or {}
        ):
            assert opts["max-file"] == "3"
    second = ComposeProject(files).plan_logging(LoggingPolicy())
    assert not second.changed and describe(second)["changed_services"] == []


@pytest.mark.parametrize("project", ["appwrite", "netbox+override", "sentry"], ids=str)
def test_corpus_enforce_mode(project, corpus_dir, tmp_path):
    files = copy_project(corpus_dir, CORPUS_PROJECTS[project], tmp_path)
    before = compose_config(files)
    plan = ComposeProject(files).plan_logging(LoggingPolicy(mode="enforce"))
    apply(plan)
    after = compose_config(files)
    assert without_logging(before) == without_logging(after)
    for name, svc in after["services"].items():
        assert svc["logging"]["driver"] == "json-file", name
        assert {k: svc["logging"]["options"][k] for k in WANT} == WANT, name
    assert not ComposeProject(files).plan_logging(LoggingPolicy(mode="enforce")).changed


def test_appwrite_shared_anchor_changed_once(corpus_dir, tmp_path):
    files = copy_project(corpus_dir, CORPUS_PROJECTS["appwrite"], tmp_path)
    plan = ComposeProject(files).plan_logging(LoggingPolicy(mode="enforce"))
    after = plan.files[0].after
    assert after.count('max-file: "5"') == 0
    assert "x-logging: &x-logging" in after and after.count("<<: *x-logging") == plan.files[0].before.count(
        "<<: *x-logging"
    )


def test_fragment_file_is_not_a_project(corpus_dir, tmp_path):
    files = copy_project(corpus_dir, ["immich-app__immich__hwaccel.transcoding.yml"], tmp_path)
    before = Path(files[0]).read_bytes()
    with pytest.raises(ComposeError, match="not a project"):
        ComposeProject(files)
    assert Path(files[0]).read_bytes() == before


# --- hand-written fixtures -----------------------------------------------------------------------


def fixture(name: str, tmp_path: Path) -> str:
    dst = tmp_path / name
    shutil.copy(FIXTURES / name, dst)
    return str(dst)


def test_crlf_kept(tmp_path):
    path = fixture("crlf.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    apply(plan)
    raw = Path(path).read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b'    logging:\r\n      driver: "json-file"\r\n' in raw
    assert b"    image: nginx  # front\r\n\r\n    ports:" in raw
    assert sorted(describe(plan)["changed_services"]) == ["db", "web"]


@pytest.mark.parametrize(
    ("name", "line", "text"),
    [
        ("tabs.yml", 3, "tab character"),
        ("duplicate-keys.yml", 6, "duplicate key 'image'"),
        ("services-list.yml", 1, "not a map"),
        ("fragment.yml", None, "not a project"),
        ("invalid-compress.yml", 4, "compress 'yes'"),
        ("local-one-file.yml", 4, "max-file of at least 2"),
    ],
)
def test_bad_input_names_file_and_line_and_leaves_it(name, line, text, tmp_path):
    path = fixture(name, tmp_path)
    before = Path(path).read_bytes()
    with pytest.raises(ComposeError) as err:
        ComposeProject([path]).plan_logging(LoggingPolicy())
    assert text in str(err.value)
    assert path in str(err.value)
    assert err.value.line == line
    assert Path(path).read_bytes() == before


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("services:\n  web:\n    image: [unclosed\n")
    with pytest.raises(ComposeError, match="invalid YAML") as err:
        ComposeProject([str(path)])
    assert err.value.line is not None


def test_maxfile_without_size_gets_size_in_add_mode(tmp_path):
    path = fixture("maxfile-no-size.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    data = load_data(plan.files[0].after)
    assert data["services"]["app"]["logging"] == {
        "options": {"max-file": "5", "max-size": "10m"},
        "driver": "json-file",
    }


def test_journald_kept_and_reported_unless_enforce(tmp_path):
    path = fixture("journald.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    assert plan.skipped == [{"service": "audit", "driver": "journald", "reason": "remote or journald driver kept"}]
    assert describe(plan)["changed_services"] == ["app"]
    enforced = ComposeProject([path]).plan_logging(LoggingPolicy(mode="enforce"))
    data = load_data(enforced.files[0].after)
    assert data["services"]["audit"]["logging"] == {"driver": "json-file", "options": WANT}


def test_shared_anchor_edited_where_defined(tmp_path):
    path = fixture("shared-anchor.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    after = plan.files[0].after
    assert after.count("logging: *short-logs") == 2
    assert after.count('max-file: "3"') == 2  # once in the anchor, once for cron
    data = load_data(after)
    assert data["services"]["api"]["logging"]["options"] == {"max-size": "1m", "max-file": "3"}
    assert data["services"]["cron"]["logging"]["options"] == WANT
    assert sorted(describe(plan)["changed_services"]) == ["api", "cron", "worker"]


def test_override_file_edits_the_defining_file(tmp_path):
    base, over = fixture("base.yml", tmp_path), fixture("override.yml", tmp_path)
    plan = ComposeProject([base, over]).plan_logging(LoggingPolicy())
    by_path = {r.path: r for r in plan.files}
    assert load_data(by_path[base].after)["services"]["app"]["logging"]["options"] == WANT
    assert "logging" not in load_data(by_path[over].after)["services"]["app"]
    assert load_data(by_path[over].after)["services"]["extra"]["logging"]["options"] == WANT


def test_four_space_flow_and_plain_ints(tmp_path):
    path = fixture("four-space.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    after = plan.files[0].after
    assert '        logging:\n            driver: "json-file"\n            options:\n' in after
    assert (
        'flow: {image: "busybox", logging: {driver: "json-file", options: {max-size: "10m", max-file: "3"}}}' in after
    )
    assert 'max-size: "10m"\n                max-file: "3"' in after  # plain 10m and 3 quoted
    assert after.startswith("---\n# header comment kept\n")
    assert "            # a comment inside a list\n" in after


def test_file_without_final_newline_and_depends_on_list(tmp_path):
    path = fixture("no-newline.yml", tmp_path)
    plan = ComposeProject([path]).plan_logging(LoggingPolicy())
    data = load_data(plan.files[0].after)
    assert data["services"]["db"]["command"] == "postgres"
    assert data["services"]["db"]["logging"]["options"] == WANT


def test_symlink_edits_target_and_keeps_link(tmp_path):
    real = Path(fixture("base.yml", tmp_path))
    link = tmp_path / "docker-compose.yml"
    link.symlink_to(real.name)
    plan = ComposeProject([str(link)]).plan_logging(LoggingPolicy())
    apply(plan)
    assert link.is_symlink()
    assert "max-size" in real.read_text()


def test_owner_and_mode_kept(tmp_path):
    path = Path(fixture("base.yml", tmp_path))
    os.chmod(path, 0o640)
    os.chown(path, 65534, 65534)
    apply(ComposeProject([str(path)]).plan_logging(LoggingPolicy()))
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crab-compose-")]


def test_backup_copy_of_a_private_file_is_never_readable_by_others(tmp_path, monkeypatch):
    # A compose file may hold secrets: its backup must not exist world-readable, not even before the final chmod.
    path = tmp_path / "docker-compose.yml"
    path.write_text("services:\n  db:\n    image: x\n    environment:\n      POSTGRES_PASSWORD: s3cret\n")
    path.chmod(0o600)
    monkeypatch.setattr(os, "chmod", lambda *_a, **_kw: None)  # keep each file's mode as it was created
    old_umask = os.umask(0)
    try:
        backups = apply(ComposeProject([str(path)]).plan_logging(LoggingPolicy()), backup=True)
    finally:
        os.umask(old_umask)
    assert os.stat(backups[0]).st_mode & 0o077 == 0


def test_backup_copy(tmp_path):
    path = fixture("base.yml", tmp_path)
    before = Path(path).read_text()
    backups = apply(ComposeProject([path]).plan_logging(LoggingPolicy()), backup=True)
    assert len(backups) == 1 and Path(backups[0]).read_text() == before


def test_write_atomic_failure_leaves_file(tmp_path, monkeypatch):
    path = fixture("base.yml", tmp_path)
    before = Path(path).read_text()

    def boom(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, "services: {}\n")
    assert Path(path).read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crab-compose-")]


def test_resolve_files_finds_the_override_when_the_directory_name_has_a_dot_y(tmp_path):
    project = tmp_path / "crab.yellow"
    project.mkdir()
    (project / "compose.yaml").write_text("services:\n  db:\n    image: x\n")
    (project / "compose.override.yaml").write_text("services:\n  db:\n    environment: {A: b}\n")
    assert resolve_files(str(project), []) == [str(project / "compose.yaml"), str(project / "compose.override.yaml")]


def test_resolve_files_from_dotenv_and_defaults(tmp_path):
    (tmp_path / "docker-compose.yml").write_text("services: {}\n")
    assert resolve_files(str(tmp_path), []) == [str(tmp_path / "docker-compose.yml")]
    (tmp_path / "docker-compose.override.yml").write_text("services: {}\n")
    assert len(resolve_files(str(tmp_path), [])) == 2
    (tmp_path / ".env").write_text("COMPOSE_FILE=a.yml:b.yml\n")
    assert resolve_files(str(tmp_path), []) == [str(tmp_path / "a.yml"), str(tmp_path / "b.yml")]
    with pytest.raises(ComposeError, match="no compose file"):
        resolve_files(str(tmp_path / "empty"), [])


@pytest.mark.parametrize(
    ("driver", "opts", "problem"),
    [
        ("json-file", {"max-size": "10x"}, "not a size"),
        ("json-file", {"max-size": "10m", "max-file": "three"}, "whole number"),
        ("json-file", {"max-size": "10m", "max-file": "0"}, "at least 1"),
        ("json-file", {"max-file": "3"}, "without max-size"),
        ("json-file", {"compress": "yes"}, "compress"),
        ("local", {"max-file": "1"}, "at least 2"),
    ],
)
def test_validate_options(driver, opts, problem):
    assert any(problem in p for p in validate_options(driver, opts))


def test_validate_options_accepts_good_values():
    assert validate_options("json-file", {"max-size": "10m", "max-file": "3", "compress": "true"}) == []
    assert validate_options("local", {"max-size": "1g", "max-file": "5"}) == []


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [({"mode": "replace"}, "mode"), ({"driver": "syslog"}, "does not rotate"), ({"max_size": "big"}, "not a size")],
)
def test_policy_rejects_bad_input(kwargs, text):
    with pytest.raises(ValueError, match=text):
        LoggingPolicy(**kwargs)


# --- generic keys (healthcheck role) -------------------------------------------------------------

HEALTH = {
    "postgres": {"healthcheck": {"test": ["CMD-SHELL", "pg_isready -h 127.0.0.1 -U crab"], "interval": "10s"}},
    "app": {"depends_on": {"db": {"condition": "service_healthy"}}},
}


def test_service_keys_healthcheck_and_depends_on(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "services:\n  app:\n    image: a\n    depends_on:\n      - db\n      - cache\n"
        "  postgres:\n    image: p  # db\n  db:\n    image: d\n  cache:\n    image: c\n"
    )
    plan = ComposeProject([str(path)]).plan_service_keys(HEALTH)
    data = load_data(plan.files[0].after)
    assert data["services"]["app"]["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "cache": {"condition": "service_started"},
    }
    assert data["services"]["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "    image: p  # db\n" in plan.files[0].after
    apply(plan)
    assert not ComposeProject([str(path)]).plan_service_keys(HEALTH).changed


def test_service_keys_unknown_service(tmp_path):
    path = fixture("base.yml", tmp_path)
    with pytest.raises(ComposeError, match="no service named postgres"):
        ComposeProject([path]).plan_service_keys({"postgres": {"healthcheck": {"test": ["NONE"]}}})


def test_service_keys_enforce_replaces_and_add_keeps(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        'services:\n  postgres:\n    image: p\n    healthcheck:\n      test: ["CMD", "true"]  # old\n'
        "    # trailing comment\n  app:\n    image: a\n"
    )
    wanted = {"postgres": {"healthcheck": {"test": ["CMD-SHELL", "pg_isready"], "interval": "10s"}}}
    assert not ComposeProject([str(path)]).plan_service_keys(wanted, "add").changed
    plan = ComposeProject([str(path)]).plan_service_keys(wanted, "enforce")
    after = plan.files[0].after
    assert load_data(after)["services"]["postgres"]["healthcheck"] == {"test": ["CMD-SHELL", "pg_isready"],
                                                                       "interval": "10s"}  # fmt: skip
    assert "    # trailing comment\n  app:\n    image: a\n" in after
    with pytest.raises(ValueError, match="mode"):
        ComposeProject([str(path)]).plan_service_keys(wanted, "replace")


@pytest.mark.parametrize(
    "text",
    [
        "services:\n  a:\n    image: x\n    logging:\n  b:\n    image: y\n    logging: ~\n",
        "services:\n  a:\n    image: x\n    command: |+\n      echo hi\n\n  b:\n    image: y\n",
        "services:\n  a:\n    image: x\n    command: |\n      echo hi\n\n\n  b:\n    image: y\n",
        "x-base: &base\n  restart: always\nservices:\n  a:\n    image: x\n    <<: *base\n  b:\n    image: y\n",
        "\ufeffservices:\n  a:\n    image: x\n...\n",
        "services:\n  a:\n    image: x\n    logging: &lg\n      driver: json-file\n"
        "  b:\n    image: y\n    logging: *lg\n",
    ],
    ids=["null-logging", "keep-scalar", "clip-scalar", "alias-last", "bom-doc-end", "service-anchor"],
)
def test_edge_shapes(text):
    plan = ComposeProject(["mem.yml"], {"mem.yml": text}).plan_logging(LoggingPolicy())
    data = load_data(plan.files[0].after)
    before = load_data(text)
    for name, svc in data["services"].items():
        assert svc["logging"]["options"] == WANT, name
        assert {k: v for k, v in svc.items() if k != "logging"} == {
            k: v for k, v in before["services"][name].items() if k != "logging"
        }
    assert not ComposeProject(["mem.yml"], {"mem.yml": plan.files[0].after}).plan_logging(LoggingPolicy()).changed


def test_empty_services_is_nothing_to_do():
    plan = ComposeProject(["mem.yml"], {"mem.yml": "services: {}\n"}).plan_logging(LoggingPolicy())
    assert not plan.changed


@pytest.mark.parametrize(
    ("mode", "changed", "want"),
    [
        (
            "add",
            ["a", "c", "d"],
            {
                "a": {"driver": "json-file", "options": {"max-size": "5m", "max-file": "3"}},
                "b": {"driver": "syslog"},
                "c": {"driver": "json-file", "options": WANT},
                "d": {"driver": "json-file", "options": WANT},
            },
        ),
        ("enforce", ["a", "b", "c", "d"], {s: {"driver": "json-file", "options": WANT} for s in "abcd"}),
    ],
)
def test_extends_inherited_logging(tmp_path, mode, changed, want):
    """Logging inherited through `extends` counts; the shared extends file is never edited."""
    common, main = fixture("extends-common.yml", tmp_path), fixture("extends-main.yml", tmp_path)
    before_common = Path(common).read_bytes()
    plan = ComposeProject([main]).plan_logging(LoggingPolicy(mode=mode))
    assert sorted(describe(plan)["changed_services"]) == changed
    apply(plan)
    assert Path(common).read_bytes() == before_common
    model = compose_config([main])
    assert {name: svc.get("logging") for name, svc in model["services"].items()} == want
    assert not ComposeProject([main]).plan_logging(LoggingPolicy(mode=mode)).changed


def test_extends_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("services:\n  a:\n    image: x\n    extends:\n      file: nope.yml\n      service: z\n")
    with pytest.raises(ComposeError, match=r"extends nope\.yml") as err:
        ComposeProject([str(path)]).plan_logging(LoggingPolicy())
    assert err.value.line == 4
