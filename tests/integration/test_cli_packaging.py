"""For the git repository that holds the files, and for packagers: the pre-commit hook, the
example CI workflow, the editor modelines and the schema's ``$id``, and the licence in the repo
and the wheel. Hook and workflow steps are run for real, with the real ``infernet``."""

from __future__ import annotations

import email
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.integration.conftest import INFERNET, Node

REPO = Path(__file__).resolve().parents[2]
HOOKS = REPO / ".pre-commit-hooks.yaml"
GITOPS = REPO / "examples" / "gitops"
WORKFLOW = GITOPS / "infernet-ci.yml"
BIN = str(Path(INFERNET).parent)
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c"]  # GitHub's run: shell
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(?P<path>\S+)$")

pytestmark = pytest.mark.integration

VALID = "served_models: [qwen2.5:0.5b]\n"
INVALID = "served_models:\n  - name: qwen2.5:0.5b\n    keep_alive: sometimes\n"


def sh(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "INFERNET_NO_NVML": "1"}
    return subprocess.run(
        argv,
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def hooks() -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = yaml.safe_load(HOOKS.read_text())
    return doc


def step(job: str, name: str) -> dict[str, Any]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    found: dict[str, Any] = next(s for s in workflow["jobs"][job]["steps"] if s.get("name") == name)
    return found


# --------------------------------------------------------------------------- pre-commit


def test_the_hook_definitions_are_what_pre_commit_reads() -> None:
    ids = [h["id"] for h in hooks()]
    assert ids == ["infernet-validate", "infernet-validate-system"]
    for hook in hooks():
        assert {"id", "name", "entry", "language"} <= set(hook), hook
        assert hook["language"] in ("python", "system")
        for name in ("infernet.yaml", "infernet.yml", "nodes/infernet.yaml"):
            assert re.search(hook["files"], name), (hook["id"], name)
        assert not re.search(hook["files"], "other.yaml")
    # The example configuration uses these hooks, for the fleet layout nodes/<host>.yaml.
    config = yaml.safe_load((GITOPS / "pre-commit-config.yaml").read_text())
    (repo,) = config["repos"]
    assert repo["repo"] == "https://github.com/infernet/infernet"
    for hook in repo["hooks"]:
        assert hook["id"] in ids
        assert re.search(hook["files"], "nodes/gpu-node-01.yaml")


@pytest.mark.parametrize("hook_id", ["infernet-validate", "infernet-validate-system"])
def test_the_hook_runs_infernet_validate_on_every_file_it_is_given(
    tmp_path: Path, hook_id: str
) -> None:
    hook = next(h for h in hooks() if h["id"] == hook_id)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "infernet.yaml").write_text(VALID)
    (tmp_path / "b.yaml").write_text(INVALID)
    (tmp_path / "c.yaml").write_text(VALID)
    entry = shlex.split(hook["entry"])  # what pre-commit runs: entry, then the file names

    good = sh([*entry, "a/infernet.yaml", "c.yaml"], tmp_path)
    assert good.returncode == 0, good.stderr
    assert "a/infernet.yaml: valid" in good.stdout and "c.yaml: valid" in good.stdout

    bad = sh([*entry, "a/infernet.yaml", "b.yaml", "c.yaml"], tmp_path)
    assert bad.returncode == 1
    assert re.search(r"^b\.yaml:3:\d+: .*keep_alive", bad.stderr, re.MULTILINE), bad.stderr
    assert "c.yaml: valid" in bad.stdout  # every file is checked, not only up to the first


# --------------------------------------------------------------------------- CI workflow


def test_the_workflow_validates_every_node_file(tmp_path: Path) -> None:
    script = step("validate", "Validate every node file")["run"]
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "gpu-node-01.yaml").write_text(VALID)
    (nodes / "gpu node 02.yml").write_text(VALID)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    ok = sh([*BASH, script], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": valid") == 2

    (nodes / "gpu-node-03.yaml").write_text(INVALID)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    bad = sh([*BASH, script], tmp_path)
    assert bad.returncode == 1
    assert "nodes/gpu-node-03.yaml:3:" in bad.stderr
    assert bad.stdout.count(": valid") == 2


def test_the_workflow_posts_the_plan_as_plan_json_says_it(node: Node) -> None:
    checkout = node.tmp / "checkout"
    (checkout / "nodes").mkdir(parents=True)
    node.config = checkout / "nodes" / "gpu-node-01.yaml"
    node.write_config(["qwen2.5:0.5b"])
    script = step("plan", "Plan the node's new file")["run"]
    env = {"NODE": "gpu-node-01", "INFERNET_STATE_DIR": str(node.state)}
    out = sh([*BASH, script], checkout, {**node.env, **env, "PATH": f"{BIN}:/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr

    doc = json.loads((checkout / "plan" / "gpu-node-01.json").read_text())
    schema = json.loads((REPO / "schemas" / "plan.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert [(a["op"], a["model"]) for a in doc["actions"]] == [("pull", "qwen2.5:0.5b")]
    comment = (checkout / "plan" / "gpu-node-01.md").read_text()
    assert "### infernet plan for `gpu-node-01`" in comment
    assert "| pull | qwen2.5:0.5b | ollama |" in comment
    assert (checkout / "plan" / "gpu-node-01.json").read_text() in comment  # plan --json as is
    assert node.installed() == set()  # a plan changes nothing

    # A node already converged: "No changes.", and the step still succeeds.
    assert node.run("apply", "--yes").returncode == 0
    again = sh([*BASH, script], checkout, {**node.env, **env, "PATH": f"{BIN}:/usr/bin:/bin"})
    assert again.returncode == 0, again.stderr
    assert "No changes." in (checkout / "plan" / "gpu-node-01.md").read_text()


def test_every_infernet_command_in_the_workflow_and_hooks_parses() -> None:
    from reconciler.cli.parser import build_parser

    texts = [h["entry"] for h in hooks()]
    workflow = yaml.safe_load(WORKFLOW.read_text())
    texts += [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if "run" in s]
    command = re.compile(r"(?:^\s*|\bdo )(infernet [a-z]+[^\n;|>]*)", re.MULTILINE)
    commands = [shlex.split(m.group(1)) for text in texts for m in command.finditer(text)]
    assert len(commands) >= 3
    for argv in commands:
        build_parser().parse_args(argv[1:])  # exits on an unknown flag


# --------------------------------------------------------------------------- editors


@pytest.mark.parametrize(
    "path",
    [REPO / "infernet.yaml", *sorted((REPO / "examples").glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_examples_name_the_schema_for_editors(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    match = MODELINE.match(first)
    assert match, f"{path} does not start with the yaml-language-server modeline"
    target = (path.parent / match["path"]).resolve()
    assert target == REPO / "schemas" / "infernet.schema.json"


def test_the_schema_id_is_stable_and_printed_by_infernet_schema() -> None:
    shipped = json.loads((REPO / "schemas" / "infernet.schema.json").read_text())
    printed = subprocess.run(
        [INFERNET, "schema"], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(printed.stdout)["$id"] == shipped["$id"]
    # Stable: no version, branch or commit in it (it names format 1 for every release).
    assert shipped["$id"] == "https://infernet.dev/schemas/infernet.schema.json"
    plan = json.loads((REPO / "schemas" / "plan.schema.json").read_text())
    assert plan["$id"] == "https://infernet.dev/schemas/plan.schema.json"


# --------------------------------------------------------------------------- licence


def test_the_licence_is_apache_2_in_the_repo_and_the_collection() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.split("\n")[:2] == [
        " " * 33 + "Apache License",
        " " * 27 + "Version 2.0, January 2004",
    ]
    assert "END OF TERMS AND CONDITIONS" in text
    collection = REPO / "ansible_collections" / "infernet" / "node"
    assert (collection / "LICENSE").read_text() == text
    assert yaml.safe_load((collection / "galaxy.yml").read_text())["license"] == ["Apache-2.0"]
    headers = [*collection.rglob("*.py")]
    assert headers and all("Apache License 2.0" in p.read_text()[:300] for p in headers)


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_licence(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("infernet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert archive.read(licence).decode() == (REPO / "LICENSE").read_text()
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    assert "reconciler/_schemas/infernet.schema.json" in names
