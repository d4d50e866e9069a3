"""The collection as Ansible's tools see it: ansible-doc, ansible-galaxy build, ansible-lint, and
the role's files against what they document and copy."""

from __future__ import annotations

import configparser
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from ansible.module_utils.basic import FILE_COMMON_ARGUMENTS

from ansible_collections.infernet.node.plugins.modules import models
from tests.ansible.conftest import BIN, EXAMPLE, REPO, ansible_env

COLLECTION = REPO / "ansible_collections" / "infernet" / "node"
ROLE = COLLECTION / "roles" / "node"

pytestmark = pytest.mark.integration


def run(tmp: Path, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=ansible_env(tmp),
        timeout=110,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd or tmp,
    )


def test_ansible_doc_documents_every_option(tmp_path: Path) -> None:
    shown = run(tmp_path, str(BIN / "ansible-doc"), "infernet.node.models")
    assert shown.returncode == 0 and "served_models" in shown.stdout, shown.stderr
    assert "[WARNING]" not in shown.stderr, shown.stderr

    out = run(tmp_path, str(BIN / "ansible-doc"), "--json", "infernet.node.models")
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)["infernet.node.models"]
    options: dict[str, Any] = entry["doc"]["options"]
    assert set(options) == set(models.ARGUMENT_SPEC) | set(FILE_COMMON_ARGUMENTS)
    for name, spec in models.ARGUMENT_SPEC.items():
        doc = options[name]
        assert doc["type"] == spec["type"], name
        assert doc.get("default") == spec.get("default"), name
        assert doc.get("aliases", []) == spec.get("aliases", []), name
        assert doc.get("required", False) == spec.get("required", False), name
        assert doc.get("elements") == spec.get("elements"), name
    assert entry["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert {"actions", "advertised", "budget", "config_path"} <= set(entry["return"])

    # Every example uses documented options only.
    names = set(options) | {a for o in options.values() for a in o.get("aliases", [])}
    tasks = [t for t in yaml.safe_load(models.EXAMPLES) if "infernet.node.models" in t]
    assert tasks and all(set(t["infernet.node.models"]) <= names for t in tasks)

    role = run(tmp_path, str(BIN / "ansible-doc"), "-t", "role", "infernet.node.node")
    assert role.returncode == 0 and "infernet_served_models" in role.stdout, role.stderr


def test_role_defaults_are_the_documented_ones() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) | {"infernet_served_models"} == set(options)
    for name, value in defaults.items():
        if "default" in options[name]:
            assert options[name]["default"] == value, name
        else:  # computed from other variables
            assert "{{" in value, name


def test_galaxy_build(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        str(BIN / "ansible-galaxy"),
        "collection",
        "build",
        "--output-path",
        str(tmp_path),
        cwd=COLLECTION,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    built = tmp_path / "infernet-node-0.1.0.tar.gz"
    with tarfile.open(built) as tar:
        names = set(tar.getnames())
    assert {
        "plugins/modules/models.py",
        "plugins/module_utils/config_text.py",
        "roles/node/tasks/main.yml",
        "meta/runtime.yml",
        "README.md",
    } <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


@pytest.mark.timeout(180)
def test_ansible_lint(tmp_path: Path) -> None:
    lint = BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed in this environment")
    out = run(
        tmp_path,
        str(lint),
        "--nocolor",
        "-c",
        str(COLLECTION / ".ansible-lint"),
        str(COLLECTION),
        str(EXAMPLE),
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Profile 'production' was required, and it passed" in out.stderr + out.stdout


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit's settings, in order, comments left out."""
    section, found = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        found.append((section, key, value))
    return found


def test_unit_template_is_the_example_unit() -> None:
    """Rendered with the example's paths, the role's unit has exactly the example's settings."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        trim_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["dirname"] = lambda p: str(Path(p).parent)
    rendered = env.get_template("infernet-watch.service.j2").render(
        infernet_bin="/usr/local/bin/infernet",
        infernet_config="/etc/infernet/infernet.yaml",
        infernet_state_dir="/var/lib/infernet",
        infernet_watch_args="--log-format json",
    )
    example = (REPO / "examples" / "systemd" / "infernet-watch.service").read_text()
    assert _directives(rendered) == _directives(example)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(rendered)  # systemd's INI shape

    elsewhere = env.get_template("infernet-watch.service.j2").render(
        infernet_bin="/opt/infernet/bin/infernet",
        infernet_config="/srv/infernet/node.yaml",
        infernet_state_dir="/srv/infernet/state",
        infernet_watch_args="",
    )
    settings = {k: v for _, k, v in _directives(elsewhere)}
    assert settings["ExecStart"] == "/opt/infernet/bin/infernet watch -c /srv/infernet/node.yaml"
    assert settings["ReadWritePaths"] == "/srv/infernet /srv/infernet/state"
    assert settings["Environment"] == "INFERNET_STATE_DIR=/srv/infernet/state"
    assert "StateDirectory" not in settings  # systemd only creates folders under /var/lib


def test_example_inventory_parses(tmp_path: Path) -> None:
    """The example's inventory, as ansible-inventory sees it: GPU classes under infernet_nodes,
    each node with served models."""
    out = run(tmp_path, str(BIN / "ansible-inventory"), "-i", str(EXAMPLE / "inventory"), "--list")
    assert out.returncode == 0, out.stderr
    inventory = json.loads(out.stdout)
    assert set(inventory["infernet_nodes"]["children"]) == {"gpu_24g", "gpu_80g"}
    hostvars = inventory["_meta"]["hostvars"]
    assert len(hostvars) == 5
    assert all(v["infernet_served_models"] for v in hostvars.values())
    assert hostvars["gpu-node-03.example.net"]["infernet_budget"]["reserve"] == "5GiB"


def test_example_fleet_syntax(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        str(BIN / "ansible-playbook"),
        "--syntax-check",
        "-i",
        str(EXAMPLE / "inventory"),
        str(EXAMPLE / "fleet.yml"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
