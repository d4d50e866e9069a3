"""The job figures every heartbeat carries, so the job router sees this node as it is.

The router reads ``load.active_jobs`` against ``load.concurrency_cap`` (default 4 when absent),
``load.gpu_utilization_max`` (skips a node at 95 % or more) and ``bench.tokens_per_second_avg``
(weights its draw). A node is what it serves: only a running ``infernet watch`` takes jobs, so
a heartbeat sent by anything else (``apply``, ``model install`` from a shell) reports what the
daemon published in the state store while its process lives, and otherwise a cap of 0 (the
router then skips the node: nothing here would answer a job). ``jobs.enabled: false`` does the
same on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from reconciler.gpu import utilization_max
from state import StatusKey, Store

Report = Mapping[str, Any]


def idle() -> dict[str, Any]:
    """Nothing serves jobs here: the router skips a node whose cap is 0."""
    return {"active_jobs": 0, "concurrency_cap": 0}


def live(load: Callable[[], Mapping[str, int]], bench: Callable[[], Report | None]) -> Report:
    """What the running job runner says now, with the GPUs' utilization."""
    report: dict[str, Any] = dict(load())
    report["gpu_utilization_max"] = utilization_max()
    figures = bench()
    if figures is not None:
        report["bench"] = dict(figures)
    return report


def publish(store: Store, report: Report | None) -> None:
    """Keep the daemon's figures where another process's heartbeat finds them (None: it
    stopped serving)."""
    store.put_status(StatusKey.JOBS, None if report is None else {"pid": os.getpid(), **report})


def published(store: Store) -> Report:
    """The figures a running daemon published, or ``idle()`` when none runs."""
    kept = store.get_status(StatusKey.JOBS)
    if not isinstance(kept, dict) or not _alive(kept.get("pid")):
        return idle()
    report = {k: v for k, v in kept.items() if k != "pid"}
    report["gpu_utilization_max"] = utilization_max()
    return report


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive (a daemon run as another user)
    return True
