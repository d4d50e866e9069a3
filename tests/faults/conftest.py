"""Fault campaigns: loops of trials against the real CLI/daemon and the test servers.

Counts are bounded for CI; raise them with environment variables:

* ``INFERNET_FAULT_TRIALS=N``: trials per campaign (each campaign's default is its own);
* ``INFERNET_FAULT_OUTAGE=SECONDS``: how long the control plane stays down (default 10);
* ``INFERNET_FAULT_FUZZ=N``: generated files (default 2000; payload examples a third of that);
* ``INFERNET_FAULT_FULL=1``: the issue's sizes: 200 trials, a 120 s outage, 4000 examples.

Every campaign records what it injected and every invariant violation it saw, and asserts
that the list of violations is empty at the end (with each violation named).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import INFERNET, Node, start_server

FULL = os.environ.get("INFERNET_FAULT_FULL") == "1"


def trials(default: int) -> int:
    """How many trials a campaign runs: ``INFERNET_FAULT_TRIALS``, else 200 when FULL."""
    value = os.environ.get("INFERNET_FAULT_TRIALS")
    if value:
        return max(1, int(value))
    return 200 if FULL else default


def outage_seconds() -> float:
    value = os.environ.get("INFERNET_FAULT_OUTAGE")
    if value:
        return float(value)
    return 120.0 if FULL else 10.0


def fuzz_examples(default: int) -> int:
    value = os.environ.get("INFERNET_FAULT_FUZZ")
    if value:
        return max(1, int(value))
    return 4000 if FULL else default


def budget(base: float, per_trial: float, count: int) -> float:
    """A pytest-timeout for a loop of ``count`` trials."""
    return base + per_trial * count


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def node_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "INFERNET_"))}
    env.update(
        {
            "HOME": str(tmp / "home"),
            "INFERNET_RETRY_BACKOFF": "0.05",
            "INFERNET_LOCK_TIMEOUT": "2",
            "INFERNET_NO_NVML": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


@pytest.fixture
def fnode(tmp_path: Path) -> Iterator[Node]:
    """A node on the Ollama-compatible test server (fault campaigns need its test routes)."""
    server = start_server(tmp_path / "ollama")
    node = Node(
        tmp_path,
        server,
        server.url,
        server.registry_url,
        server.models_dir,
        tmp_path / "infernet.yaml",
        tmp_path / "state",
        node_env(tmp_path),
    )
    try:
        yield node
    finally:
        if node.server is not None:
            node.server.close()


def write_config(node: Node, served: list[Any], **extra: Any) -> None:
    """infernet.yaml for ``node`` with room for many removals; written atomically."""
    doc: dict[str, Any] = {
        "served_models": served,
        "backends": {
            "ollama": {
                "url": node.url,
                "registry": node.registry,
                "models_dir": str(node.models_dir),
            }
        },
        "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
        "policy": {"max_removals": 10, "allow_empty": True},
    }
    doc.update(extra)
    tmp = node.config.with_name(".infernet.yaml.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, node.config)


def installed(node: Node) -> set[str]:
    """What the Ollama test server lists now (empty while it is down)."""
    try:
        resp = httpx.get(f"{node.url}/api/tags", timeout=5, trust_env=False)
        return {m["name"] for m in resp.json()["models"]}
    except httpx.HTTPError:
        return set()


def status(node: Node) -> dict[str, Any]:
    out = node.run("status", "--json")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def plan_json(node: Node) -> dict[str, Any]:
    out = node.run("plan", "--json")
    assert "Traceback" not in out.stderr, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


class Ledger:
    """What a campaign injected and every invariant violation it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.trials = 0
        self.faults: dict[str, int] = {}
        self.violations: list[str] = []
        self.started = time.monotonic()

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.violations.append(f"trial {self.trials}: {message}")

    def converged_invariants(
        self, node: Node, desired: set[str], *, advertised: list[str] | None = None
    ) -> None:
        """Installed == desired (every model here is infernet's), advertised ⊆ installed."""
        have = installed(node)
        self.check(desired <= have, f"lost or missing desired models {sorted(desired - have)}")
        self.check(have <= desired, f"managed models left after drop {sorted(have - desired)}")
        listed = status(node)["advertised"] if advertised is None else advertised
        extra = set(listed) - have
        self.check(not extra, f"advertised but not installed: {sorted(extra)}")

    def report(self) -> str:
        took = time.monotonic() - self.started
        line = (
            f"[faults] {self.name}: {self.trials} trials in {took:.1f}s, faults {self.faults}, "
            f"violations {len(self.violations)}"
        )
        print(line)
        return line

    def assert_clean(self) -> None:
        self.report()
        assert self.violations == [], "\n".join(self.violations)


def run_cli(node: Node, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``node.run`` plus the campaign-wide rule: never a traceback."""
    out = node.run(*args, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    return out


__all__ = ["INFERNET", "Ledger", "Node"]
