"""Campaign 5: the state database is deleted, truncated or overwritten between runs.

The store only remembers; losing it must never stop the node nor prune by mistake. Each trial
converges on a random set, damages ``state.db`` (or its WAL) one of several ways, then moves
to another set through ``plan`` and ``apply``: never a traceback, exit 0, every desired model
installed, the model pulled by hand (never infernet's) never removed, nothing advertised that
is not installed, and a second plan with no changes. A dropped model may stay after the store
was lost: with no record left, it counts as unmanaged (README, ``state/database.py``).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import ollama
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
BY_HAND = "llama3.2:1b-instruct-q8_0"
KINDS = [
    "delete",
    "truncate",
    "random-bytes",
    "header",
    "wal-garbage",
    "zero-length",
    "row-garbage",
]
COUNT = trials(len(KINDS), full=7 * len(KINDS))  # one of each kind; full: seven
# Rows an apply always leaves, and the text columns they are read back through.
ROWS = [("owned", "name"), ("applies", "summary"), ("cache", "value"), ("runs", "plan")]


def damage(state: Path, kind: str, rng: random.Random) -> None:
    db = state / "state.db"
    wal = state / "state.db-wal"
    if kind == "delete":
        for path in (db, wal, state / "state.db-shm"):
            path.unlink(missing_ok=True)
    elif kind == "truncate":
        size = db.stat().st_size
        with db.open("r+b") as f:
            f.truncate(rng.randrange(0, max(size, 1)))
    elif kind == "zero-length":
        db.write_bytes(b"")
    elif kind == "random-bytes":
        size = db.stat().st_size
        with db.open("r+b") as f:
            for _ in range(rng.randint(1, 8)):
                f.seek(rng.randrange(0, max(size, 1)))
                f.write(rng.randbytes(rng.randint(1, 512)))
    elif kind == "header":
        with db.open("r+b") as f:
            f.write(rng.randbytes(100))
    elif kind == "wal-garbage":
        with wal.open("ab") as f:
            f.write(rng.randbytes(rng.randint(1, 4096)))
    elif kind == "row-garbage":
        # Random bytes inside stored values: the file stays a sound database (its integrity
        # check passes), but the rows no longer decode (issue 13, item 25).
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            for table, column in ROWS:
                garbage = rng.randbytes(rng.randint(1, 64)) + b"\xff"
                conn.execute(f"UPDATE {table} SET {column} = CAST(? AS TEXT)", (garbage,))
        finally:
            conn.close()


@pytest.mark.timeout(budget(60, 8, COUNT))
def test_state_database_damaged_between_runs(fnode: Node) -> None:
    rng = random.Random(9005)
    ledger = Ledger("state database damaged between runs")
    with ollama.Client(host=fnode.url) as client:
        client.pull(BY_HAND)  # installed by hand: infernet must never remove it
    desired = {MODELS[0]}
    write_config(fnode, sorted(desired))
    assert run_cli(fnode, "apply", "--yes").returncode == 0
    for n in range(COUNT):
        ledger.trials += 1
        kind = KINDS[n % len(KINDS)]
        damage(fnode.state, kind, rng)
        ledger.fault(kind)
        target = set(rng.sample(MODELS, rng.randint(1, 3)))
        write_config(fnode, sorted(target))
        before = installed(fnode)
        for args in (("status", "--json"), ("plan", "--json"), ("apply", "--yes")):
            out = fnode.run(*args)
            ledger.check("Traceback" not in out.stderr, f"{kind}: traceback: {out.stderr}")
            ok = out.returncode == 0
            ledger.check(ok, f"{kind}: {' '.join(args)} exited {out.returncode}: {out.stderr}")
        have = installed(fnode)
        ledger.check(target <= have, f"{kind}: desired models missing {sorted(target - have)}")
        ledger.check(BY_HAND in have, f"{kind}: the hand-pulled model was pruned")
        kept = before & target
        ledger.check(kept <= have, f"{kind}: kept models lost {sorted(kept - have)}")
        extra = set(status(fnode)["advertised"]) - have
        ledger.check(not extra, f"{kind}: advertised, not installed {sorted(extra)}")
        again = fnode.run("plan", "--detailed-exitcode")
        ledger.check(again.returncode == 0, f"{kind}: not converged: {again.stdout}")
        desired = target
    ledger.assert_clean()
