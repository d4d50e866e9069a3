"""Campaign 2: ``infernet watch`` is SIGKILLed in the middle of an apply and started again.

One control plane watches the whole campaign. A sampler thread compares every heartbeat with
what the backend has (nothing advertised that is not installed) and every desired model with
what is installed (no kept model is ever lost), all through the trials; each trial ends when
the restarted daemon has converged.
"""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    INFERNET,
    Ledger,
    budget,
    installed,
    trials,
    wait_for,
    write_config,
)
from tests.integration.conftest import Node, keygen, verified_beats
from tests.servers.controlplane_harness import start_control_plane

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MODELS = ["smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b", "all-minilm:latest"]
COUNT = trials(20)


class Watch:
    def __init__(self, node: Node, n: int) -> None:
        self.log = node.tmp / f"watch-{n}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    INFERNET,
                    "watch",
                    "-c",
                    str(node.config),
                    "--state-dir",
                    str(node.state),
                    "--tick",
                    "1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=node.env,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class Sampler(threading.Thread):
    """Checks the invariants that must hold at every moment, not only once converged."""

    def __init__(self, node: Node, cp: Any, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.node, self.cp, self.ledger = node, cp, ledger
        self.stop = threading.Event()
        self.kept: set[str] = set()  # desired before and after the current change
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            first = installed(self.node)
            beats = verified_beats(self.cp)
            second = installed(self.node)
            kept = set(self.kept)
            if beats:
                listed = set(beats[-1]["body"]["specs"]["served_models"])
                extra = listed - first - second
                self.ledger.check(not extra, f"heartbeat advertises uninstalled {sorted(extra)}")
            lost = kept - first - second
            self.ledger.check(not lost, f"kept models vanished: {sorted(lost)}")
            self.samples += 1
            time.sleep(0.1)


@pytest.mark.timeout(budget(60, 10, COUNT))
def test_watch_killed_mid_apply(fnode: Node, tmp_path: Path) -> None:
    rng = random.Random(9002)
    fnode.throttle(250_000)
    ledger = Ledger("watch SIGKILLed mid-apply")
    with start_control_plane(tmp_path / "cp") as cp:
        keygen(fnode)
        plane = {"url": cp.url, "key_file": str(fnode.tmp / "node.key"), "heartbeat_interval": "1s"}
        write_config(fnode, [MODELS[0]], control_plane=plane)
        first = Watch(fnode, 0)
        wait_for("the first convergence", lambda: installed(fnode) == {MODELS[0]}, 30)
        first.kill()
        sampler = Sampler(fnode, cp, ledger)
        sampler.start()
        desired = {MODELS[0]}
        try:
            for n in range(1, COUNT + 1):
                ledger.trials += 1
                have = installed(fnode)
                target = set(rng.sample(MODELS, rng.randint(1, 3)))
                if not target - have:
                    target.add(rng.choice(sorted(set(MODELS) - have)))
                sampler.kept = target & desired
                write_config(fnode, sorted(target), control_plane=plane)
                watch = Watch(fnode, n)
                wait_for("the daemon to act", lambda w=watch: "reconciling" in w.text(), 20)
                time.sleep(rng.uniform(0.0, 0.6))
                watch.kill()
                ledger.fault("watch SIGKILL mid-apply")
                again = Watch(fnode, n + 1000)
                try:
                    wait_for(
                        "convergence after the restart", lambda t=target: installed(fnode) == t, 30
                    )
                    wait_for(
                        "a heartbeat listing the file",
                        lambda t=target: bool(
                            (b := verified_beats(cp))
                            and set(b[-1]["body"]["specs"]["served_models"]) == t
                        ),
                        15,
                    )
                except AssertionError as exc:
                    ledger.check(False, f"{exc}: installed {sorted(installed(fnode))}")
                finally:
                    again.kill()
                text = watch.text() + again.text()
                ledger.check("Traceback" not in text, f"traceback in the daemon log: {text}")
                desired = target
                sampler.kept = set()
        finally:
            sampler.stop.set()
            sampler.join(5)
        ledger.converged_invariants(fnode, desired)
        assert sampler.samples > COUNT, "the sampler must have run through the trials"
    ledger.assert_clean()
