"""Fault campaigns (issue 9): loops of trials against the real CLI/daemon and the test servers.

Counts are bounded for CI; raise them with environment variables:

* ``INFERNET_FAULT_TRIALS=N``: trials per campaign (N trials where a campaign counts trials;
  N/20 rounds of 50 applies and N/20 outages; N/10 disk-full trials);
* ``INFERNET_FAULT_OUTAGE=SECONDS``: how long the control plane stays down (default 10);
* ``INFERNET_FAULT_FUZZ=N``: generated files (default 2000; payload examples a third of that);
* ``INFERNET_FAULT_FULL=1``: the full size, each campaign's own (``full=`` below, the table in
  docs/reliability.md), chosen so that the whole run ends within 30 minutes on 2 cores.

Every campaign records what it injected and every invariant violation it saw, and asserts
that the list of violations is empty at the end (with each violation named).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import INFERNET, Node, start_server
from tests.servers.controlplane_harness import ControlPlaneServer

FULL = os.environ.get("INFERNET_FAULT_FULL") == "1"


def trials(default: int, *, full: int) -> int:
    """How many trials a campaign runs: ``INFERNET_FAULT_TRIALS``, else ``full`` when FULL."""
    value = os.environ.get("INFERNET_FAULT_TRIALS")
    if value:
        return max(1, int(value))
    return full if FULL else default


def scaled(default: int, *, full: int, per: int) -> int:
    """A count of bigger units (rounds, outages): ``INFERNET_FAULT_TRIALS // per`` (at least
    ``default``), else ``full`` when FULL, else ``default``."""
    value = os.environ.get("INFERNET_FAULT_TRIALS")
    if value:
        return max(default, int(value) // per)
    return full if FULL else default


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


def make_node(tmp: Path, **server: Any) -> Node:
    """A node in ``tmp`` on its own Ollama-compatible test server; the caller closes the server.

    ``server``: ``start_server`` options (``bandwidth=``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ollama = start_server(tmp / "ollama", **server)
    return Node(
        tmp,
        ollama,
        ollama.url,
        ollama.registry_url,
        ollama.models_dir,
        tmp / "infernet.yaml",
        tmp / "state",
        node_env(tmp),
    )


@pytest.fixture
def fnode(tmp_path: Path) -> Iterator[Node]:
    """A node on the Ollama-compatible test server (fault campaigns need its test routes)."""
    node = make_node(tmp_path)
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


def listing(node: Node) -> set[str] | None:
    """What the Ollama test server lists now; None when it gave no listing (down, restarting,
    an error answer): a sampler then skips the sample instead of seeing every model gone."""
    try:
        resp = httpx.get(f"{node.url}/api/tags", timeout=5, trust_env=False)
        return {m["name"] for m in resp.json()["models"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def installed(node: Node) -> set[str]:
    """What the Ollama test server lists now (empty while it is down)."""
    return listing(node) or set()


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


class Beats:
    """The heartbeats a control plane verified and accepted, fetched incrementally.

    Samplers look at the latest beat every 50-100 ms for the whole campaign; fetching the
    server's entire request log each time (what ``verified_beats`` does) made a long campaign
    quadratic: by the end of a 120 s outage trial each look copied, encoded and parsed
    megabytes. Only the entries since the last look are fetched here. Thread-safe (a sampler
    thread and the trial loop share one).
    """

    def __init__(self, cp: ControlPlaneServer) -> None:
        self.cp = cp
        self._seen = 0  # log entries fetched so far
        self._beats: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def all(self) -> list[dict[str, Any]]:
        """Every verified, accepted heartbeat so far, oldest first (as ``verified_beats``)."""
        with self._lock:
            new = self.cp.received(since=self._seen)
            self._seen += len(new)
            self._beats += [
                r
                for r in new
                if r["path"] == "/api/v1/node/heartbeat" and r["pubkey"] and r["status"] == 200
            ]
            return list(self._beats)

    def served(self) -> set[str] | None:
        """What the latest beat advertises (None before the first; an offline beat, which has
        no specs, advertises nothing)."""
        beats = self.all()
        if not beats:
            return None
        specs = (beats[-1]["body"] or {}).get("specs") or {}
        return set(specs.get("served_models") or [])


class Ledger:
    """What a campaign injected and every invariant violation it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.trials = 0
        self.faults: dict[str, int] = {}
        self.violations: list[str] = []
        self.started = time.monotonic()
        self.steps: dict[str, float] = {}  # seconds spent in each named step, all trials
        self._lock = threading.Lock()  # campaigns that run trials side by side share one

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a part of a trial: the summary says where a campaign's time goes."""
        began = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.steps[name] = self.steps.get(name, 0.0) + time.monotonic() - began

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] = self.faults.get(kind, 0) + 1

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            with self._lock:
                self.violations.append(f"trial {self.trials}: {message}")

    def trial(self) -> int:
        """Count a new trial (from any thread); returns its number, from 1."""
        with self._lock:
            self.trials += 1
            return self.trials

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
        if self.steps:
            spent = ", ".join(f"{k} {v:.1f}s" for k, v in self.steps.items())
            print(f"[faults] {self.name}: time by step: {spent}")
        return line

    def assert_clean(self) -> None:
        self.report()
        assert self.violations == [], "\n".join(self.violations)


def run_cli(node: Node, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``node.run`` plus the campaign-wide rule: never a traceback."""
    out = node.run(*args, timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    return out


__all__ = ["INFERNET", "Beats", "Ledger", "Node"]
