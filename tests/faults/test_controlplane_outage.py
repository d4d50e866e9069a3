"""Campaign 3: the control plane is down for a while during changes and commands.

Each trial: ``infernet watch`` has converged and heartbeats; a ``model_install`` command is
claimed; the control plane goes down (503, dropped connections or garbage, by turn) while the
install finishes and the file drops another model. Checked: the dropped model is not deleted
before its withdrawal timed out (``INFERNET_WITHDRAW_TIMEOUT``, README "The control plane"),
nothing is ever advertised that is not installed, heartbeats resume after the outage, and the
command's answer is delivered exactly once.

An outage is mostly waiting, so each failure mode has its own node (test server, control
plane, daemon and sampler) and the modes' trials run side by side: three 120 s outages take
about as long as one. A node runs its mode's trials one after the other.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.conftest import (
    Beats,
    Ledger,
    budget,
    installed,
    listing,
    make_node,
    outage_seconds,
    scaled,
    wait_for,
    write_config,
)
from tests.faults.test_watch_kill import Watch
from tests.integration.conftest import Node, keygen
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL, QWEN, LLAMA = "smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b"
OUTAGE = outage_seconds()
WITHDRAW = min(4.0, OUTAGE / 2)
MODES = ["503", "close", "garbage"]
# Full size: one 120 s outage of each mode (side by side); INFERNET_FAULT_TRIALS=N: N/20.
COUNT = scaled(1, full=len(MODES), per=20)
PER_NODE = -(-COUNT // len(MODES))  # trials the busiest node runs one after the other


class _Sampler(threading.Thread):
    """Every 50 ms: nothing advertised that is not installed; when QWEN went."""

    def __init__(self, node: Node, beats: Beats, ledger: Ledger, name: str) -> None:
        super().__init__(daemon=True)
        self.node, self.beats, self.ledger, self.name = node, beats, ledger, name
        self.stop = threading.Event()
        # While the control plane is down its last accepted beat is stale by design: a model
        # whose withdrawal timed out is deleted while that beat still lists it (README).
        self.outage = threading.Event()
        self.gone_at: float | None = 0.0  # nothing to time before the first trial

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._sample()
            except Exception as exc:  # a sampler that dies silently would check nothing more
                self.ledger.check(False, f"[{self.name}] the sampler failed: {exc!r}")
            time.sleep(0.05)

    def _sample(self) -> None:
        # Read before the beats: the trial ends the outage as soon as a fresh beat is in,
        # and a sample that fetched the last stale one just before must not be judged.
        stale = self.outage.is_set()
        first = listing(self.node)
        served = self.beats.served()
        second = listing(self.node)
        if first is None or second is None:
            return  # no listing this time (the test server answered an error)
        if served is not None and not stale:
            extra = served - first - second
            self.ledger.check(
                not extra,
                f"[{self.name}] advertised, not installed: {sorted(extra)} (installed "
                f"{sorted(first)}, then {sorted(second)})",
            )
        if QWEN not in second and self.gone_at is None:
            self.gone_at = time.monotonic()


class _OutageNode:
    """One node (test server, control plane, ``infernet watch``, sampler) and its trials."""

    def __init__(self, node: Node, cp: ControlPlaneServer, ledger: Ledger, name: str) -> None:
        self.node, self.cp, self.ledger = node, cp, ledger
        self.pubkey = keygen(node)
        self.plane = {
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "heartbeat_interval": "1s",
        }
        self.beats = Beats(cp)
        self.probe = _Sampler(node, self.beats, ledger, name)

    def start_state(self) -> None:
        write_config(self.node, [SMALL, QWEN], control_plane=self.plane)
        wait_for("the start state", lambda: installed(self.node) == {SMALL, QWEN}, 30)

    def trial(self, mode: str) -> None:
        node, cp, beats, ledger, probe = self.node, self.cp, self.beats, self.ledger, self.probe
        tag = f"[{mode} #{ledger.trial()}]"
        self.start_state()
        wait_for("a beat listing it", lambda: beats.served() == {SMALL, QWEN}, 15)
        probe.gone_at = None
        command = cp.enqueue_command(self.pubkey, "model_install", {"model": LLAMA})
        wait_for("the command claimed", lambda: cp.command(command)["status"] != "pending", 15)
        probe.outage.set()
        cp.set_down(OUTAGE, mode=mode)
        down_at = time.monotonic()
        ledger.fault(f"control plane down ({mode})")
        wait_for("the install during the outage", lambda: LLAMA in installed(node), 30)
        wait_for("the command's file edit", lambda: LLAMA in node.config.read_text())
        doc = yaml.safe_load(node.config.read_text())
        doc["served_models"] = [m for m in doc["served_models"] if m != QWEN]
        tmp = node.config.with_name(".edit.tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        edited_at = time.monotonic()
        os.replace(tmp, node.config)
        wait_for("the dropped model to go", lambda: probe.gone_at is not None, OUTAGE + 30)
        assert probe.gone_at is not None
        gap = probe.gone_at - edited_at
        up_at = down_at + OUTAGE
        early = probe.gone_at < up_at and gap < WITHDRAW - 0.3
        ledger.check(
            not early,
            f"{tag} {QWEN} deleted {gap:.1f}s after the edit, while the control plane was "
            f"down: before the {WITHDRAW}s withdrawal timeout",
        )
        wait_for("the outage to end", lambda: time.monotonic() > up_at, OUTAGE + 5)
        cp.set_down(None)
        resumed = time.time()
        wait_for("the answer", lambda: cp.command(command)["status"] in ("completed", "failed"), 30)
        wait_for("heartbeats to resume", lambda: any(b["time"] > resumed for b in beats.all()), 15)
        probe.outage.clear()
        wait_for("a beat with the new set", lambda: beats.served() == {SMALL, LLAMA}, 15)
        time.sleep(2.5)  # a few more ticks: a queued answer must not be re-sent
        row = cp.command(command)
        ledger.check(row["status"] == "completed", f"{tag} command ended {row}")
        calls = row.get("complete_calls")
        ledger.check(calls == 1, f"{tag} answer delivered {calls} times: {row}")
        ledger.check(installed(node) == {SMALL, LLAMA}, f"{tag} not converged after the outage")


def _run_node(where: Path, modes: list[str], ledger: Ledger) -> None:
    node = make_node(where, bandwidth=100_000)  # the install takes a couple of seconds
    node.env["INFERNET_WITHDRAW_TIMEOUT"] = str(WITHDRAW)
    try:
        with start_control_plane(where / "cp") as cp:
            it = _OutageNode(node, cp, ledger, modes[0])
            write_config(node, [SMALL, QWEN], control_plane=it.plane)
            watch = Watch(node, 0)
            it.probe.start()
            try:
                for mode in modes:
                    it.trial(mode)
                    it.start_state()  # back to the start state for the next trial
            finally:
                it.probe.stop.set()
                it.probe.join(5)
                watch.kill()
                ledger.check("Traceback" not in watch.text(), watch.text())
    finally:
        if node.server is not None:
            node.server.close()


@pytest.mark.timeout(budget(120, OUTAGE + 60, PER_NODE))
def test_control_plane_outage(tmp_path: Path) -> None:
    ledger = Ledger(f"control plane down {OUTAGE:.0f}s")
    shares = [
        [MODES[n % len(MODES)] for n in range(COUNT) if n % len(MODES) == i]
        for i in range(min(COUNT, len(MODES)))
    ]
    failures: list[BaseException] = []

    def run(modes: list[str]) -> None:
        try:
            _run_node(tmp_path / f"node-{modes[0]}", modes, ledger)
        except BaseException as exc:  # re-raised below: a stuck wait fails the campaign
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(modes,)) for modes in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    ledger.assert_clean()
