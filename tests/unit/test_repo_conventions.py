"""The project's own promises about roles and modules, checked on every role and module that exists."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (REPO / "roles").iterdir() if p.is_dir())
MODULES = sorted((REPO / "library").glob("*.py"))
EXPECTED_ROLES = {"backup", "compose_logging", "healthcheck", "sqlite_pragmas"}


def _load(path: Path):
    return yaml.safe_load(path.read_text()) or {}


def test_every_product_role_exists():
    assert {r.name for r in ROLES} >= EXPECTED_ROLES


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_layout(role: Path):
    for rel in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml", "README.md"):
        assert (role / rel).is_file(), f"{role.name} has no {rel}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_specs_match_defaults(role: Path):
    defaults = _load(role / "defaults/main.yml")
    specs = _load(role / "meta/argument_specs.yml")["argument_specs"]["main"]["options"]
    assert set(specs) == set(defaults), (
        f"{role.name}: only in defaults {sorted(set(defaults) - set(specs))}, "
        f"only in argument_specs {sorted(set(specs) - set(defaults))}"
    )
    for name, spec in specs.items():
        assert spec.get("description"), f"{role.name}: {name} has no description"
        assert spec.get("type"), f"{role.name}: {name} has no type"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_variables_are_prefixed(role: Path):
    defaults = _load(role / "defaults/main.yml")
    bad = [k for k in defaults if not k.startswith(f"{role.name}_")]
    assert not bad, f"{role.name}: defaults without the role prefix: {bad}"


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_readme_documents_every_default(role: Path):
    readme = (role / "README.md").read_text()
    missing = [k for k in _load(role / "defaults/main.yml") if k not in readme]
    assert not missing, f"{role.name}/README.md does not mention {missing}"
    assert "```yaml" in readme, f"{role.name}/README.md has no YAML example"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_module_documentation_renders(module: Path):
    doc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "-M", str(REPO / "library"), module.stem],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert doc.returncode == 0, doc.stderr
    assert "EXAMPLES:" in doc.stdout
    assert "RETURN VALUES:" in doc.stdout
    text = module.read_text()
    blocks = {
        node.targets[0].id: node.value.value
        for node in ast.parse(text).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    for block in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
        assert block in blocks, f"{module.name} has no {block}"
    docs = yaml.safe_load(blocks["DOCUMENTATION"])
    assert {"check_mode", "diff_mode"} <= set(docs.get("attributes", {})), f"{module.name} lacks attributes"
    assert "supports_check_mode=True" in text, f"{module.name} does not support check mode"


def test_site_imports_only_playbooks():
    site = _load(REPO / "site.yml")
    assert all(set(play) <= {"name", "ansible.builtin.import_playbook"} for play in site)
