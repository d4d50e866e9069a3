"""Campaign 6: 50 ``infernet apply --yes`` started at once against one node.

One writer at a time (the node lock): every process exits 0, or 1 with the documented lock
message; the end state is converged; the backend saw each model pulled exactly once.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.faults.conftest import Ledger, budget, installed, run_cli, scaled, write_config
from tests.integration.conftest import Node

pytestmark = [pytest.mark.faults, pytest.mark.integration]

MODELS = ["smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b", "all-minilm:latest"]
PROCESSES = 50
ROUNDS = scaled(1, full=2, per=20)
LOCK_MESSAGE = "holds the node lock"


@pytest.mark.timeout(budget(60, 90, ROUNDS))
def test_fifty_concurrent_applies(fnode: Node) -> None:
    rng = random.Random(9006)
    server = fnode.throttle(400_000)
    fnode.env["INFERNET_LOCK_TIMEOUT"] = "60"
    ledger = Ledger(f"{PROCESSES} concurrent applies")
    for n in range(ROUNDS):
        ledger.trials += 1
        have = installed(fnode)
        target = set(rng.sample(MODELS, 2 + n % 2)) if n else set(MODELS[:3])
        write_config(fnode, sorted(target))
        server.reset_requests()
        procs = [fnode.popen("apply", "--yes") for _ in range(PROCESSES)]
        ledger.fault(f"{PROCESSES} applies at once")
        codes: Counter[int] = Counter()
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            codes[proc.returncode] += 1
            ledger.check("Traceback" not in err, f"traceback: {err}")
            clean = proc.returncode == 0 or (proc.returncode == 1 and LOCK_MESSAGE in err)
            ledger.check(clean, f"exit {proc.returncode}: {out}{err}")
        print(f"[faults] round {n}: exit codes {dict(codes)}")
        pulls = Counter(
            r["body"].get("model") or r["body"].get("name")
            for r in server.requests()
            if r["path"] == "/api/pull"
        )
        for model in target - have:
            ledger.check(pulls[model] == 1, f"{model} pulled {pulls[model]} times: {pulls}")
        ledger.check(set(pulls) <= target - have, f"unexpected pulls {pulls}")
        out = run_cli(fnode, "plan", "--detailed-exitcode")
        ledger.check(out.returncode == 0, f"not converged after the burst: {out.stdout}")
        ledger.converged_invariants(fnode, target)
    ledger.assert_clean()
