"""Campaign 3: the control plane is down for a while during changes and commands.

Each trial: ``infernet watch`` has converged and heartbeats; a ``model_install`` command is
claimed; the control plane goes down (503, dropped connections or garbage, by turn) while the
install finishes and the file drops another model. Checked: the dropped model is not deleted
before its withdrawal timed out (``INFERNET_WITHDRAW_TIMEOUT``, README "The control plane"),
nothing is ever advertised that is not installed, heartbeats resume after the outage, and the
command's answer is delivered exactly once.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.conftest import (
    Ledger,
    budget,
    installed,
    outage_seconds,
    trials,
    wait_for,
    write_config,
)
from tests.faults.test_watch_kill import Watch
from tests.integration.conftest import Node, keygen, verified_beats
from tests.servers.controlplane_harness import start_control_plane

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL, QWEN, LLAMA = "smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b"
OUTAGE = outage_seconds()
WITHDRAW = min(4.0, OUTAGE / 2)
COUNT = max(1, trials(20) // 20)
MODES = ["503", "close", "garbage"]


@pytest.mark.timeout(budget(60, OUTAGE + 40, COUNT))
def test_control_plane_outage(fnode: Node, tmp_path: Path) -> None:
    fnode.throttle(100_000)  # the install takes a couple of seconds
    fnode.env["INFERNET_WITHDRAW_TIMEOUT"] = str(WITHDRAW)
    ledger = Ledger(f"control plane down {OUTAGE:.0f}s")
    with start_control_plane(tmp_path / "cp") as cp:
        pubkey = keygen(fnode)
        plane = {"url": cp.url, "key_file": str(fnode.tmp / "node.key"), "heartbeat_interval": "1s"}
        write_config(fnode, [SMALL, QWEN], control_plane=plane)
        watch = Watch(fnode, 0)
        gone_at: dict[str, float] = {}
        stop = threading.Event()
        # While the control plane is down its last accepted beat is stale by design: a model
        # whose withdrawal timed out is deleted while that beat still lists it (README).
        outage = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                first = installed(fnode)
                beats = verified_beats(cp)
                second = installed(fnode)
                if beats and not outage.is_set():
                    extra = set(beats[-1]["body"]["specs"]["served_models"]) - first - second
                    ledger.check(not extra, f"advertised, not installed: {sorted(extra)}")
                if QWEN not in second and QWEN not in gone_at:
                    gone_at[QWEN] = time.monotonic()
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            for n in range(COUNT):
                ledger.trials += 1
                write_config(fnode, [SMALL, QWEN], control_plane=plane)
                wait_for("the start state", lambda: installed(fnode) == {SMALL, QWEN}, 30)
                wait_for(
                    "a beat listing it",
                    lambda: bool(
                        (b := verified_beats(cp))
                        and set(b[-1]["body"]["specs"]["served_models"]) == {SMALL, QWEN}
                    ),
                    15,
                )
                gone_at.clear()
                command = cp.enqueue_command(pubkey, "model_install", {"model": LLAMA})
                wait_for(
                    "the command claimed",
                    lambda c=command: cp.command(c)["status"] != "pending",
                    15,
                )
                mode = MODES[n % len(MODES)]
                outage.set()
                cp.set_down(OUTAGE, mode=mode)
                down_at = time.monotonic()
                ledger.fault(f"control plane down ({mode})")
                wait_for("the install during the outage", lambda: LLAMA in installed(fnode), 30)
                wait_for("the command's file edit", lambda: LLAMA in fnode.config.read_text())
                doc = yaml.safe_load(fnode.config.read_text())
                doc["served_models"] = [m for m in doc["served_models"] if m != QWEN]
                tmp = fnode.config.with_name(".edit.tmp")
                tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
                edited_at = time.monotonic()
                os.replace(tmp, fnode.config)
                wait_for("the dropped model to go", lambda: QWEN in gone_at, OUTAGE + 30)
                gap = gone_at[QWEN] - edited_at
                up_at = down_at + OUTAGE
                early = gone_at[QWEN] < up_at and gap < WITHDRAW - 0.3
                ledger.check(
                    not early,
                    f"{QWEN} deleted {gap:.1f}s after the edit, while the "
                    f"control plane was down: before the {WITHDRAW}s withdrawal timeout",
                )
                wait_for("the outage to end", lambda u=up_at: time.monotonic() > u, OUTAGE + 5)
                cp.set_down(None)
                resumed = time.time()
                wait_for(
                    "the answer",
                    lambda c=command: cp.command(c)["status"] in ("completed", "failed"),
                    30,
                )
                wait_for(
                    "heartbeats to resume",
                    lambda r=resumed: any(b["time"] > r for b in verified_beats(cp)),
                    15,
                )
                outage.clear()
                wait_for(
                    "a beat with the new set",
                    lambda: (
                        set(verified_beats(cp)[-1]["body"]["specs"]["served_models"])
                        == {SMALL, LLAMA}
                    ),
                    15,
                )
                time.sleep(2.5)  # a few more ticks: a queued answer must not be re-sent
                row = cp.command(command)
                ledger.check(row["status"] == "completed", f"command ended {row}")
                calls = row.get("complete_calls")
                ledger.check(calls == 1, f"answer delivered {calls} times: {row}")
                ledger.check(installed(fnode) == {SMALL, LLAMA}, "not converged after the outage")
                ledger.check("Traceback" not in watch.text(), watch.text())
                # Back to the start state for the next trial.
                write_config(fnode, [SMALL, QWEN], control_plane=plane)
                wait_for("the reset", lambda: installed(fnode) == {SMALL, QWEN}, 30)
        finally:
            stop.set()
            sampler.join(5)
            watch.kill()
    ledger.assert_clean()
