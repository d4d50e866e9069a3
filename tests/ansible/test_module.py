"""The infernet.node.models module on its own, through ad-hoc ``ansible localhost -m``: the
check → apply → check pattern of Ansible's own integration tests, and bad input (each failure is
one clear line in ``msg``, never a traceback, and writes nothing)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ansible.conftest import BIN, INFERNET, ansible_env
from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server

pytestmark = pytest.mark.integration


@dataclass
class Target:
    """localhost as a node: a config path, a state dir, a backend."""

    tmp: Path
    server: OllamaServer
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.tmp / "etc" / "infernet.yaml"

    def args(self, **overrides: Any) -> dict[str, Any]:
        backend = {
            "url": self.server.url,
            "registry": self.server.registry_url,
            "models_dir": str(self.server.models_dir),
        }
        args: dict[str, Any] = {
            "served_models": ["smollm2:135m"],
            "backends": {"ollama": backend},
            "budget": {"vram": "24GiB", "disk_reserve": "1GiB"},
            "config": str(self.config),
            "state_dir": str(self.tmp / "state"),
            "executable": INFERNET,
        }
        args.update(overrides)
        return args

    def module(self, args: dict[str, Any], *flags: str) -> tuple[int, dict[str, Any]]:
        """Run the module once; its exit code and its result (``shown``: what was printed
        before it, such as the diff)."""
        proc = subprocess.run(
            [
                str(BIN / "ansible"),
                "localhost",
                "-m",
                "infernet.node.models",
                "-a",
                json.dumps(args),
                *flags,
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.tmp,
        )
        shown, sep, tail = proc.stdout.partition(" => ")
        assert sep, proc.stdout + proc.stderr
        result: dict[str, Any] = json.loads(tail)
        result["shown"] = shown
        result["failed"] = shown.rstrip().endswith("| FAILED!")  # the callback drops the key
        assert "Traceback" not in proc.stdout + proc.stderr
        return proc.returncode, result

    def tags(self) -> set[str]:
        import httpx

        tags = httpx.get(f"{self.server.url}/api/tags", timeout=5).json()
        return {m["name"] for m in tags["models"]}


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    server = start_ollama_server(tmp_path / "ollama", DEFAULT_CATALOGUE)
    (tmp_path / "etc").mkdir()
    env = ansible_env(tmp_path)
    env["ANSIBLE_CALLBACK_RESULT_FORMAT"] = "json"
    try:
        yield Target(tmp_path, server, env)
    finally:
        server.close()


@pytest.mark.timeout(180)
def test_check_apply_check(target: Target) -> None:
    # Check mode on a bare node: the change and its actions are reported, nothing is written.
    rc, result = target.module(target.args(), "--check", "--diff")
    assert rc == 0 and result["changed"] is True, result
    assert [(a["op"], a["model"]) for a in result["actions"]] == [("pull", "smollm2:135m")]
    assert result["advertised"] == ["smollm2:135m"] and result["budget"]["fits"] is True
    shown = result["shown"]
    assert f"+++ after: {target.config}" in shown and "+  - smollm2:135m\n" in shown
    assert "+ pull smollm2:135m (ollama): in served_models, not installed" in shown
    assert not target.config.exists() and target.tags() == set()
    assert not (target.tmp / "state").exists()

    # For real: the file, then the pull.
    rc, result = target.module(target.args())
    assert rc == 0 and result["changed"] is True, result
    assert result["config_path"] == str(target.config)
    assert [o["result"] for o in result["outcomes"]] == ["ok"] and result["converged"] is True
    assert target.tags() == {"smollm2:135m"}
    assert "\n+".join(target.config.read_text().splitlines()) in shown

    # Again, in check mode and for real: nothing to do.
    for flags in (("--check",), ()):
        rc, result = target.module(target.args(), *flags)
        assert rc == 0 and result["changed"] is False and result["actions"] == [], result

    # Only the mode differs: a change, and nothing applied.
    rc, result = target.module(target.args(mode="0600"))
    assert rc == 0 and result["changed"] is True and "outcomes" not in result, result
    assert target.config.stat().st_mode & 0o777 == 0o600

    # apply: false writes the file and reports the pending actions; the node is left alone.
    rc, result = target.module(target.args(served_models=["all-minilm:latest"], apply=False))
    assert rc == 0 and result["changed"] is True, result
    ops = {(a["op"], a["model"]) for a in result["actions"]}
    assert ops == {("pull", "all-minilm:latest"), ("remove", "smollm2:135m")}
    assert "all-minilm" in target.config.read_text() and target.tags() == {"smollm2:135m"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            {"served_models": None},
            "missing required arguments: served_models",
            id="missing-served_models",
        ),
        pytest.param(
            {"servd_models": ["x"]},
            "Unsupported parameters for (infernet.node.models) module: servd_models",
            id="unknown-option",
        ),
        pytest.param(
            {"apply": "maybe"},
            "argument 'apply' is of type str and we were unable to convert to bool",
            id="not-a-bool",
        ),
        pytest.param(
            {"backends": "ollama"},
            "argument 'backends' is of type str and we were unable to convert to dict",
            id="not-a-dict",
        ),
        pytest.param(
            {"settings": {"budget": {"vram": "8GiB"}}},
            "budget given both as an option and in settings; use one",
            id="option-twice",
        ),
        pytest.param(
            {"served_models": [{"nam": "smollm2:135m"}]},
            "served_models[0]: missing required key 'name'",
            id="invalid-entry",
        ),
    ],
)
def test_invalid_arguments_fail_and_write_nothing(
    target: Target, args: dict[str, Any], message: str
) -> None:
    given = {k: v for k, v in target.args(**args).items() if v is not None}
    rc, result = target.module(given)
    assert rc != 0 and result.get("failed") is True, result
    assert message in result["msg"]
    assert "\n" not in result["msg"]
    assert not target.config.exists()
    if "served_models[0]" in message:
        # infernet's own FILE:LINE:COL message, naming the real file, not the staged copy.
        assert result["msg"].startswith(f"{target.config}:"), result["msg"]
        assert "did you mean 'name'?" in result["msg"]


@pytest.mark.parametrize(
    ("executable", "message"),
    [
        (
            "/nonexistent/bin/infernet",
            "infernet executable /nonexistent/bin/infernet not found "
            "or not executable on this host: install infernet there",
        ),
        (
            "infernet-not-installed",
            "infernet executable 'infernet-not-installed' not found on PATH",
        ),
    ],
    ids=["path", "name-on-PATH"],
)
def test_missing_cli(target: Target, executable: str, message: str) -> None:
    for flags in ((), ("--check",)):
        rc, result = target.module(target.args(executable=executable), *flags)
        assert rc != 0 and result.get("failed") is True, result
        assert result["msg"].startswith(message), result["msg"]
        assert "infernet_bin" in result["msg"]
    assert not target.config.exists()


def test_failed_pull_fails_the_task(target: Target) -> None:
    """The plan is fine, so the file is put in place; the pull breaks during apply: the task
    fails with infernet's line for the action, and says what apply did."""
    target.server.fault("smollm2:135m", "error_mid", after_bytes=1000)
    rc, result = target.module(target.args())
    assert rc != 0 and result["failed"] is True, result
    assert result["msg"].startswith("pull smollm2:135m: "), result["msg"]
    assert [(o["op"], o["result"]) for o in result["outcomes"]] == [("pull", "failed")]
    assert result["converged"] is False and result["changed"] is True  # the file was written
    assert target.config.exists() and target.tags() == set()

    target.server.clear_faults()  # the next run finishes the job
    rc, result = target.module(target.args())
    assert rc == 0 and result["changed"] is True and target.tags() == {"smollm2:135m"}


# Both paths in one playbook: each host (localhost twice, each with its own backend and files)
# runs the same steps with a different executable, and writes what it registered.
PATHS_PLAYBOOK = """\
- name: The module through both ways of running infernet
  hosts: all
  gather_facts: false
  vars:
    m: &args
      served_models: [smollm2:135m]
      backends: {ollama: "{{ backend }}"}
      budget: {vram: 24GiB, disk_reserve: 1GiB}
      config: "{{ config }}"
      state_dir: "{{ state_dir }}"
      executable: "{{ infernet_bin }}"
  tasks:
    - name: Check mode on a bare node
      infernet.node.models: *args
      check_mode: true
      diff: true
      register: r_check
    - name: Apply while the pull breaks
      infernet.node.models: *args
      register: r_broken
      ignore_errors: true
    - name: Mend the backend
      ansible.builtin.uri:
        url: "{{ backend.url }}/_test/faults"
        method: DELETE
        use_proxy: false
    - name: Apply
      infernet.node.models: *args
      register: r_apply
    - name: Nothing to do
      infernet.node.models: *args
      register: r_noop
    - name: An invalid entry
      infernet.node.models:
        <<: *args
        served_models: [{nam: smollm2:135m}]
      register: r_invalid
      ignore_errors: true
    - name: A budget that does not fit
      infernet.node.models:
        <<: *args
        served_models: [smollm2:135m, all-minilm:latest]
        budget: {vram: 1GiB, reserve: 512MiB, disk_reserve: 1GiB}
      register: r_budget
      ignore_errors: true
    - name: Keep what the module returned
      ansible.builtin.copy:
        content: "{{ [r_check, r_broken, r_apply, r_noop, r_invalid, r_budget] | to_json }}"
        dest: "{{ out }}"
        mode: "0644"
"""


def _normalised(text: str, replacements: dict[str, str]) -> Any:
    """A host's results with its own paths and URLs named alike, and what differs between any
    two runs (free disk, the module's arguments) left out."""
    for old, new in replacements.items():
        text = text.replace(old, new)

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            drop = {"invocation", "disk_free_bytes", "free_bytes"}
            return {k: strip(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(text))


@pytest.mark.timeout(180)
def test_in_process_and_subprocess_give_the_same_results(tmp_path: Path) -> None:
    """infernet's own console script for the module's Python runs in the module's process; a
    wrapper runs as a subprocess. Check mode, diff, a failed pull, apply, a no-op, an invalid
    entry and a budget error: both give the same result (and each path is the one taken)."""
    script = Path(INFERNET).read_text()
    shebang, rest = script.split("\n", 1)
    hosts: dict[str, dict[str, Any]] = {}
    servers: list[OllamaServer] = []
    try:
        for name in ("inproc", "subproc"):
            root = tmp_path / name
            (root / "etc").mkdir(parents=True)
            marker = root / "ran-infernet"
            executable = root / "infernet"
            if name == "inproc":  # the console script, which also leaves a mark when run
                executable.write_text(
                    f"{shebang}\nimport pathlib; pathlib.Path({str(marker)!r}).touch()\n{rest}"
                )
            else:
                executable.write_text(f'#!/bin/sh\necho >> "{marker}"\nexec "{INFERNET}" "$@"\n')
            executable.chmod(0o755)
            server = start_ollama_server(root / "ollama", DEFAULT_CATALOGUE)
            servers.append(server)
            server.fault("smollm2:135m", "error_mid", after_bytes=1000)
            hosts[name] = {
                "ansible_connection": "local",
                "infernet_bin": str(executable),
                "config": str(root / "etc" / "infernet.yaml"),
                "state_dir": str(root / "state"),
                "out": str(root / "results.json"),
                "backend": {
                    "url": server.url,
                    "registry": server.registry_url,
                    "models_dir": str(server.models_dir),
                },
            }
        (tmp_path / "ansible-remote").mkdir(mode=0o700)  # else the first host warns of it
        (tmp_path / "hosts.json").write_text(json.dumps({"all": {"hosts": hosts}}))
        (tmp_path / "paths.yml").write_text(PATHS_PLAYBOOK)
        proc = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", "hosts.json", "paths.yml"],
            capture_output=True,
            text=True,
            env=ansible_env(tmp_path),
            timeout=150,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        for server in servers:
            server.close()

    results = {}
    for (name, host), server in zip(hosts.items(), servers, strict=True):
        replacements = {str(tmp_path / name): "ROOT", server.url: "URL"}
        replacements[server.registry_url] = "REGISTRY"
        results[name] = _normalised(Path(host["out"]).read_text(), replacements)
    assert results["inproc"] == results["subproc"]
    check, broken, applied, noop, invalid, budget = results["inproc"]
    assert check["changed"] is True and len(check["diff"]) == 2
    assert broken["failed"] is True and broken["msg"].startswith("pull smollm2:135m: ")
    assert applied["changed"] is True and applied["converged"] is True
    assert noop["changed"] is False and noop["actions"] == []
    assert invalid["msg"].startswith("ROOT/etc/infernet.yaml:"), invalid["msg"]
    assert "> VRAM budget 1.0 GiB" in budget["msg"]
    # In-process: the script itself never ran. Subprocess: it ran once per plan and apply.
    assert not (tmp_path / "inproc" / "ran-infernet").exists()
    runs = (tmp_path / "subproc" / "ran-infernet").read_text().count("\n")
    assert runs == 1 + 2 + 2 + 1 + 1 + 1, runs
