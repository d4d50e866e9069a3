"""A fleet of local "nodes" driven by the real ``ansible-playbook``.

Each node is an inventory host with ``ansible_connection: local``, its own infernet.yaml, state
directory and systemd unit folder under the test's tmp, and its own Ollama-compatible test
server. The playbook is the example's own ``examples/ansible/fleet.yml``; the inventory (and its
``group_vars``, which tests edit) is written to tmp. Ansible finds the collection through
``ANSIBLE_COLLECTIONS_PATH=<repo>`` and keeps everything it writes (``ANSIBLE_HOME``, local and
remote temp folders) in tmp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INFERNET = str(BIN / "infernet")
EXAMPLE = REPO / "examples" / "ansible"
FLEET = EXAMPLE / "fleet.yml"

# The group_vars the fleet tests start from: two GPU classes.
GROUP_VARS: dict[str, dict[str, Any]] = {
    "gpu_24g": {
        "fleet_gpu": "1x 24 GB",
        "infernet_budget": {"vram": "24GiB", "disk_reserve": "1GiB"},
        "infernet_served_models": ["smollm2:135m", "all-minilm:latest"],
    },
    "gpu_80g": {
        "fleet_gpu": "1x 80 GB",
        "infernet_budget": {"vram": "80GiB", "disk_reserve": "1GiB"},
        "infernet_served_models": ["qwen2.5:0.5b"],
    },
}
# node-c is a 24 GB class node whose card keeps almost everything for something else: 0.5 GiB
# left, too small for either model of its class.
SMALL_BUDGET = {"vram": "1GiB", "reserve": "512MiB", "disk_reserve": "1GiB"}

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)",
    re.MULTILINE,
)


def ansible_env(tmp: Path) -> dict[str, str]:
    """The environment of every ansible command: collections from the repo, state in tmp."""
    ours = ("ANSIBLE_", "OLLAMA_", "INFERNET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "ANSIBLE_CONFIG": str(EXAMPLE / "ansible.cfg"),
            "ANSIBLE_COLLECTIONS_PATH": str(REPO),
            "ANSIBLE_HOME": str(tmp / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
            "ANSIBLE_REMOTE_TEMP": str(tmp / "ansible-remote"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            "INFERNET_NO_NVML": "1",
            "INFERNET_LOCK_TIMEOUT": "5",
            "INFERNET_RETRY_BACKOFF": "0.05",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class Run:
    """One ``ansible-playbook`` run: its output, its recap per host, the fleet report."""

    proc: subprocess.CompletedProcess[str]
    report: list[dict[str, Any]]

    @property
    def out(self) -> str:
        return self.proc.stdout + self.proc.stderr

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        return {
            m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"}
            for m in _RECAP.finditer(self.proc.stdout)
        }

    def row(self, host: str) -> dict[str, Any]:
        return next(r for r in self.report if r["host"] == host)


@dataclass
class Node:
    """One inventory host: its files and its backend."""

    name: str
    group: str
    root: Path
    server: OllamaServer
    host_vars: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "etc" / "infernet.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def unit(self) -> Path:
        return self.root / "systemd" / "infernet-watch.service"

    def installed(self) -> set[str]:
        """What the node's backend has, by /api/tags."""
        tags = httpx.get(f"{self.server.url}/api/tags", timeout=5).json()
        return {m["name"] for m in tags["models"]}

    def inventory_vars(self) -> dict[str, Any]:
        return {
            "ansible_connection": "local",
            "infernet_config": str(self.config),
            "infernet_state_dir": str(self.state),
            "infernet_unit_dir": str(self.unit.parent),
            "infernet_backends": {
                "ollama": {
                    "url": self.server.url,
                    "registry": self.server.registry_url,
                    "models_dir": str(self.server.models_dir),
                }
            },
            **self.host_vars,
        }


@dataclass
class Fleet:
    """Nodes, the inventory that describes them, and a way to run playbooks against them."""

    tmp: Path
    nodes: dict[str, Node]
    env: dict[str, str]
    runs: int = 0

    @property
    def inventory(self) -> Path:
        return self.tmp / "inventory" / "hosts.yml"

    def write_inventory(self) -> None:
        groups: dict[str, Any] = {}
        for node in self.nodes.values():
            hosts = groups.setdefault(node.group, {"hosts": {}})["hosts"]
            hosts[node.name] = node.inventory_vars()
        doc = {
            "infernet_nodes": {
                "children": groups,
                "vars": {
                    "infernet_install": False,
                    "infernet_bin": INFERNET,
                    "infernet_systemd": False,
                },
            }
        }
        self.inventory.parent.mkdir(parents=True, exist_ok=True)
        self.inventory.write_text(yaml.safe_dump(doc, sort_keys=False))
        for group, variables in GROUP_VARS.items():
            self.group_vars(group, variables)

    def group_vars(self, group: str, variables: dict[str, Any]) -> None:
        """Write ``inventory/group_vars/<group>.yml`` (what a fleet's operator edits)."""
        path = self.inventory.parent / "group_vars" / f"{group}.yml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(variables, sort_keys=False))

    def serve(self, group: str, models: list[Any]) -> None:
        """Edit ``group``'s served models, the way an operator changes a GPU class."""
        self.group_vars(group, {**GROUP_VARS[group], "infernet_served_models": models})

    def playbook(self, *args: str, batches: str = "one", timeout: float = 120) -> Run:
        """``ansible-playbook`` of the fleet example: all nodes in one batch, where half may fail
        (``batches="one"``), or the example's own rolling batches (``"example"``)."""
        self.runs += 1
        report = self.tmp / f"report-{self.runs}.json"
        extra: dict[str, Any] = {"fleet_report_file": str(report)}
        if batches == "one":
            extra.update(fleet_serial=len(self.nodes), fleet_max_fail_percentage=50)
        proc = subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "-i",
                str(self.inventory),
                str(FLEET),
                "-e",
                json.dumps(extra),
                *args,
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd=self.tmp,
        )
        rows = json.loads(report.read_text()) if report.exists() else []
        return Run(proc, rows)


def start_node(tmp: Path, name: str, group: str, **host_vars: Any) -> Node:
    root = tmp / name
    (root / "systemd").mkdir(parents=True)  # /etc/systemd/system always exists
    server = start_ollama_server(root / "ollama", DEFAULT_CATALOGUE)
    return Node(name, group, root, server, dict(host_vars))


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Three nodes: node-a and node-c in gpu_24g (node-c's budget too small), node-b in gpu_80g."""
    nodes: dict[str, Node] = {}
    try:
        for name, group, host_vars in (
            ("node-a", "gpu_24g", {}),
            ("node-b", "gpu_80g", {}),
            ("node-c", "gpu_24g", {"infernet_budget": SMALL_BUDGET}),
        ):
            nodes[name] = start_node(tmp_path, name, group, **host_vars)
        the_fleet = Fleet(tmp_path, nodes, ansible_env(tmp_path))
        the_fleet.write_inventory()
        yield the_fleet
    finally:
        for node in nodes.values():
            node.server.close()
