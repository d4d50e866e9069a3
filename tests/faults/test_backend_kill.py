"""Campaign 1: the Ollama backend is SIGKILLed (and restarted) in the middle of a throttled pull.

Each trial moves the node to a random set of models, kills the backend while the apply is
pulling, restarts it on the same ports and models folder, and checks that no desired model
that was installed disappeared, nothing is advertised that is not installed, and that the next
apply converges (installed == desired; every model here is infernet's, so a dropped one must
be gone).

A kill can land while the backend writes a download's part file (``…-partial-<N>``, JSON,
written in place as Ollama does): that download can then never resume, on Ollama as on the test
server, until the file is deleted. The trial then checks that infernet fails that pull with one
line and keeps everything else, deletes the file as an operator would, and goes on.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import (
    Ledger,
    budget,
    installed,
    run_cli,
    status,
    trials,
    write_config,
)
from tests.integration.conftest import Node

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MODELS = ["smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b", "all-minilm:latest"]
COUNT = trials(20, full=60)


def half_written_parts(models_dir: Path) -> list[Path]:
    """Part files of unfinished downloads that are not the JSON the backend resumes from."""
    damaged = []
    for part in sorted((models_dir / "blobs").glob("*-partial-*")):
        try:
            json.loads(part.read_bytes())
        except ValueError:
            damaged.append(part)
        except OSError:
            continue
    return damaged


def _delete(node: Node, name: str) -> None:
    resp = httpx.request(
        "DELETE", f"{node.url}/api/delete", json={"model": name}, timeout=10, trust_env=False
    )
    resp.raise_for_status()


def next_trial(rng: random.Random, before: set[str]) -> tuple[set[str], str | None]:
    """A trial's target set, always with something to pull, and the installed model to delete
    by hand first when everything is already installed (a long campaign gets there)."""
    target = set(rng.sample(MODELS, rng.randint(1, 3)))
    if target - before:
        return target, None
    missing = sorted(set(MODELS) - before)
    if missing:
        return target | {rng.choice(missing)}, None
    return target, rng.choice(sorted(target))


def test_a_trial_always_has_something_to_pull() -> None:
    """The generator once asked ``random.choice`` for a model from an empty list (every model
    installed), failing the full-size campaign on its own."""
    rng = random.Random(1)
    for before in (set(), set(MODELS), set(MODELS[:3]), {MODELS[0]}):
        for _ in range(200):
            target, delete = next_trial(rng, before)
            have = before - {delete} if delete else before
            assert target - have, (before, target, delete)


@pytest.mark.timeout(budget(60, 8, COUNT))
def test_backend_killed_mid_pull(fnode: Node) -> None:
    rng = random.Random(9001)
    server = fnode.throttle(250_000)  # 60-200 KB models: pulls take a fraction of a second
    ledger = Ledger("backend killed mid-pull")
    for _ in range(COUNT):
        ledger.trials += 1
        with ledger.step("setup"):
            before = installed(fnode)
            target, delete = next_trial(rng, before)
            if delete is not None:
                _delete(fnode, delete)
                before = installed(fnode)
            kept = target & before
            write_config(fnode, sorted(target))
            server.reset_requests()
        with ledger.step("apply until /api/pull"):
            proc = fnode.popen("apply", "--yes")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                if any(r["path"] == "/api/pull" for r in server.requests()):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        with ledger.step("restart"):
            server.restart(kill=True)
        ledger.fault("backend SIGKILL + restart")
        with ledger.step("faulted apply ends"):
            _out, err = proc.communicate(timeout=60)
        ledger.check("Traceback" not in err, f"traceback from the faulted apply: {err}")
        ledger.check(proc.returncode in (0, 1), f"faulted apply exited {proc.returncode}: {err}")
        with ledger.step("status"):
            have = installed(fnode)
            ledger.check(kept <= have, f"kept models lost: {sorted(kept - have)}")
            extra = set(status(fnode)["advertised"]) - have
        ledger.check(not extra, f"advertised after the fault, not installed: {sorted(extra)}")

        damaged = half_written_parts(fnode.models_dir)
        if damaged:
            ledger.fault("backend left a half-written part file")
            with ledger.step("apply on the damaged download"):
                out = run_cli(fnode, "apply", "--yes")
            ledger.check(
                out.returncode == 1 and "Traceback" not in out.stderr,
                f"an apply on a download the backend can't resume: exit {out.returncode}: "
                f"{out.stderr}",
            )
            ledger.check(kept <= installed(fnode), "kept models lost on a damaged download")
            for part in damaged:  # the operator's repair: the whole unfinished download
                for path in part.parent.glob(part.name.rsplit("-partial", 1)[0] + "-partial*"):
                    path.unlink(missing_ok=True)

        with ledger.step("apply"):
            out = run_cli(fnode, "apply", "--yes")
        ledger.check(out.returncode == 0, f"the next apply failed: {out.stdout}{out.stderr}")
        with ledger.step("converged"):
            ledger.converged_invariants(fnode, target)
    ledger.assert_clean()
