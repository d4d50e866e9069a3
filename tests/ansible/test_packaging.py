"""The collection as it is shipped, and the role installing infernet the ways it can be had:
infernet is not on PyPI, so from a wheel built on the controller or from a git URL.

The role runs for real (``ansible-playbook``, pip, a new virtual environment, plan and apply
against an Ollama-compatible test server). The new environment sees infernet's dependencies
through a ``.pth`` file pointing at a folder of links to this environment's packages, so pip
installs infernet alone and needs no network for them; infernet itself is the one the role
installed, never this checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ansible import sanity
from tests.ansible.conftest import BIN, REPO, ansible_env
from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server

COLLECTION = REPO / "ansible_collections" / "infernet" / "node"
MODEL = "qwen2.5:0.5b"
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "reconciler", "state", "schemas")

pytestmark = pytest.mark.integration


def test_the_built_collection_carries_the_licence_and_galaxy_metadata(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path)],
        capture_output=True,
        text=True,
        env=ansible_env(tmp_path),
        cwd=COLLECTION,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    with tarfile.open(tmp_path / "infernet-node-0.1.0.tar.gz") as tar:
        licence = tar.extractfile("LICENSE")
        assert licence is not None
        assert licence.read().decode() == (REPO / "LICENSE").read_text()
        manifest_file = tar.extractfile("MANIFEST.json")
        assert manifest_file is not None
        info = json.load(manifest_file)["collection_info"]
    assert info["license"] == ["Apache-2.0"]
    for key in ("repository", "documentation", "issues", "description", "readme", "tags"):
        assert info[key], key
    runtime = yaml.safe_load((COLLECTION / "meta" / "runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")


# --------------------------------------------------------------------------- the role


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built as an operator would on the controller."""
    where = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(where), str(REPO)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (found,) = where.glob("infernet-*.whl")
    return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OllamaServer]:
    backend = start_ollama_server(tmp_path / "ollama", DEFAULT_CATALOGUE)
    try:
        yield backend
    finally:
        backend.close()


def venv_with_dependencies(tmp: Path) -> Path:
    """A virtual environment without infernet, its dependencies importable from this one."""
    site = Path(sysconfig.get_paths()["purelib"])
    links = tmp / "dependencies"
    links.mkdir()
    own = ("infernet", "_infernet", "__editable__", "pip", "setuptools", "_distutils_hack")
    for entry in site.iterdir():
        if not entry.name.startswith(own) and not entry.name.endswith(".pth"):
            (links / entry.name).symlink_to(entry)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "zz_dependencies.pth").write_text(f"{links}\n")
    return venv


def run_role(tmp: Path, server: OllamaServer, venv: Path, **install: str) -> dict[str, Any]:
    """The role on localhost, installing infernet into ``venv``; the play's recap."""
    variables = {
        "infernet_install": True,
        "infernet_venv": str(venv),
        "infernet_python": sys.executable,
        "infernet_config": str(tmp / "etc" / "infernet.yaml"),
        "infernet_state_dir": str(tmp / "state"),
        "infernet_unit_dir": str(tmp),
        "infernet_served_models": [MODEL],
        "infernet_budget": {"vram": "24GiB", "disk_reserve": "1GiB"},
        "infernet_backends": {
            "ollama": {
                "url": server.url,
                "registry": server.registry_url,
                "models_dir": str(server.models_dir),
            }
        },
        **install,
    }
    (tmp / "vars.json").write_text(json.dumps(variables))
    (tmp / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n"
        "  roles: [infernet.node.node]\n"
    )
    env = ansible_env(tmp)
    env.pop("ANSIBLE_CONFIG")
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "play.yml", "-e", "@vars.json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recap = proc.stdout[proc.stdout.index("PLAY RECAP") :]
    changed = int(recap.split("changed=")[1].split()[0])
    return {"changed": changed, "out": proc.stdout}


def installed(server: OllamaServer) -> set[str]:
    tags = httpx.get(f"{server.url}/api/tags", timeout=5).json()
    return {m["name"] for m in tags["models"]}


def installed_from(venv: Path) -> tuple[str, dict[str, Any]]:
    """Where the venv's infernet imports from, and how pip recorded its origin."""
    probe = (
        "import json, importlib.metadata as m, reconciler; "
        "print(json.dumps([reconciler.__file__, "
        "json.loads(m.distribution('infernet').read_text('direct_url.json'))]))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=venv,  # not this checkout, which -c would put first on sys.path
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    where, origin = json.loads(out.stdout)
    return where, origin


@pytest.mark.timeout(600)
def test_the_role_installs_infernet_from_a_wheel_on_the_controller(
    tmp_path: Path, server: OllamaServer, wheel: Path
) -> None:
    venv = venv_with_dependencies(tmp_path)
    first = run_role(tmp_path, server, venv, infernet_wheel=str(wheel))
    assert first["changed"] > 0
    where, origin = installed_from(venv)
    assert where.startswith(str(venv)), where  # the wheel's copy, not this checkout
    assert origin["url"] == (venv / "wheels" / wheel.name).as_uri()
    assert (venv / "bin" / "infernet").exists()
    assert MODEL in installed(server)

    again = run_role(tmp_path, server, venv, infernet_wheel=str(wheel))
    assert again["changed"] == 0, again["out"]


@pytest.mark.timeout(600)
def test_the_role_installs_infernet_from_a_git_url(tmp_path: Path, server: OllamaServer) -> None:
    source = tmp_path / "infernet-src"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    git = ["git", "-C", str(source), "-c", "user.name=t", "-c", "user.email=t@example.net"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "infernet"], check=True)
    url = f"git+{source.as_uri()}@main"

    venv = venv_with_dependencies(tmp_path)
    first = run_role(tmp_path, server, venv, infernet_package=url)
    assert first["changed"] > 0
    where, origin = installed_from(venv)
    assert where.startswith(str(venv)), where
    assert origin["url"] == source.as_uri() and origin["vcs_info"]["vcs"] == "git"
    assert MODEL in installed(server)

    again = run_role(tmp_path, server, venv, infernet_package=url)
    assert again["changed"] == 0, again["out"]


@pytest.mark.timeout(1500)
def test_ansible_test_sanity_is_clean() -> None:
    """Every sanity test of the ansible-core the suite uses passes (the first run makes the
    tools' environments, from PyPI, under .cache/ansible-venv; later runs take seconds)."""
    done = sanity.run()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert 'Running sanity test "validate-modules"' in done.stdout
    assert 'Running sanity test "use-argspec-type-path"' in done.stdout
