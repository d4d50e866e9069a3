"""The remote verbs this node runs: ``VERBS`` maps each to its handler.

A new verb is one entry in ``VERBS`` and one handler, a function of a ``Context`` (the command,
the file as it is, the progress poster, the cancel flag, and the runner's services: the store,
the node lock, the daemon's reconcile) that returns an ``Answer``. The runner
(``reconciler.daemon.commands``) does the rest: the ledger, exactly-once answers, refusing
unknown verbs and invalid files, and taking a failed install's edit back out of the file.

Accepted commands edit ``infernet.yaml`` (comments kept, under the node lock) and reconcile,
so the file stays the single truth and ``git diff`` shows what the dashboard did. So a removal
is exactly a hand edit dropping the entry: the prune policy decides whether weights are
deleted, nothing is forced.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import names
from reconciler.controlplane.args import name_problem
from reconciler.controlplane.progress import CommandProgress
from reconciler.converge import edits
from reconciler.errors import one_line
from reconciler.limits import ANSWER_TEXT
from reconciler.model import Desired, Op
from state import NodeLock, StatusKey, Store

CANCELLED = "cancelled from the dashboard"


@dataclass(frozen=True)
class Answer:
    """What ``complete`` says: ``completed`` with a result, or ``failed`` with a reason."""

    status: str  # completed | failed
    result: dict[str, Any] | None = None
    error: str | None = None


def failed(error: str) -> Answer:
    return Answer("failed", None, answer_line(error))


@dataclass(frozen=True)
class ReconcileOutcome:
    """What the daemon's reconcile did: converged, what it advertises now, or why not."""

    converged: bool
    advertised: tuple[str, ...]
    error: str | None  # one line, when the reconcile failed or was refused


Reconciling = Callable[
    [CommandProgress, threading.Event, frozenset[str]], tuple[ReconcileOutcome | None, str | None]
]
"""``reconcile(progress, cancel, force_remove_keys)``: the daemon's reconcile, a raise turned into
``(None, one-line reason)``."""


@dataclass(frozen=True)
class Context:
    """One command being run, and what a handler may use."""

    command_id: str
    args: dict[str, Any]
    current: Desired  # the file as it is now (valid)
    progress: CommandProgress
    cancel: threading.Event
    store: Store
    config_path: Path
    file_lock: Callable[[], NodeLock]  # the node lock, held, for editing the file
    reconcile: Reconciling


def model_install(ctx: Context) -> Answer:
    """Add the model to the file (unless it is there) and reconcile; completed once the
    node advertises it."""
    store, progress, cancel = ctx.store, ctx.progress, ctx.cancel
    install = edits.remote_install(ctx.args, ctx.current)
    if isinstance(install, str):
        return failed(install)
    backend, advertised, existing = install.backend, install.advertised, install.existing
    progress.stage("config", "editing infernet.yaml", 1)
    if cancel.is_set():
        return failed(CANCELLED)
    if existing is None:

        def remember(before: bytes, after: bytes) -> None:
            # In the store before the file changes: a crash from here on is undone.
            edits.keep_undo(
                store,
                ctx.command_id,
                before,
                after,
                name=edits.entry_name(install.entry),
                backend=backend,
            )

        with ctx.file_lock():
            edits.add(ctx.config_path, install, before_write=remember)
    else:
        backend, advertised = existing.backend, existing.advertise_as
    outcome, crash = ctx.reconcile(progress, cancel, frozenset())
    ok = outcome is not None and outcome.converged and advertised in outcome.advertised
    if cancel.is_set():
        # A cancelled or failed install must not stay in the file (the runner takes it
        # out): the node would keep pulling (or failing to plan) a model nobody wants.
        # The next tick prunes whatever was already downloaded (infernet owns it).
        return failed(CANCELLED)
    if not ok:
        return failed(crash or _why_not(outcome, progress, f"{advertised} is not advertised"))
    assert outcome is not None
    result: dict[str, Any] = {
        "model": install.advertised,
        "backend": backend.value,
        "advertised": list(outcome.advertised),
    }
    if existing is not None:
        result["note"] = f"{existing.name} was already in infernet.yaml"
    return Answer("completed", result)


def model_remove(ctx: Context) -> Answer:
    """Exactly what dropping the entry from the file by hand does: the entry leaves the
    file, and the prune policy decides whether weights are deleted (a model infernet did
    not install stays under ``prune: managed``; nothing goes under ``prune: none``)."""
    current, progress, cancel = ctx.current, ctx.progress, ctx.cancel
    name = ctx.args.get("model")
    problem = name_problem(name)
    if problem is not None:
        return failed(problem)
    assert isinstance(name, str)
    # A model that left the file stays protected until it is gone (the session keeps
    # those keys); the planner keeps it too, but the answer should say why.
    remembered = ctx.store.get_status(StatusKey.PROTECTED) or []
    removal = edits.removal(current, name, remembered=remembered)
    if removal.invalid is not None:
        return failed(removal.invalid)
    matched, keys = removal.matched, removal.keys
    if removal.protected is not None or removal.remembered:
        where = (
            "is protect: true in infernet.yaml"
            if removal.protected is not None
            else "was declared protect: true"
        )
        shown = removal.protected.name if removal.protected is not None else name
        return failed(f"{shown} {where}; remote commands never remove protected models")
    owned = {names.key(r.backend, r.canonical) for r in ctx.store.owned()}
    progress.stage("config", "editing infernet.yaml", 1)
    if cancel.is_set():
        return failed(CANCELLED)
    if matched:
        with ctx.file_lock():
            edits.remove(ctx.config_path, name, None)
    # From here the removal runs to its end even if cancelled: the file no longer lists
    # the model, and a half-undone removal would be worse than a finished one. Nothing is
    # forced: the reconcile removes what the prune policy removes for any edit of the file.
    outcome, crash = ctx.reconcile(progress, threading.Event(), frozenset())
    removals = {k: progress.finished.get((Op.REMOVE.value, k)) for k in keys}
    broke = [done for done in removals.values() if done and done[0] != "ok"]
    gone = [m.advertise_as for m in matched]
    if broke:
        return failed(f"removing {name} failed: {broke[0][1] or broke[0][0]}")
    if outcome is None or (not outcome.converged and not any(removals.values())):
        return failed(crash or _why_not(outcome, progress, f"{name} may still be served"))
    if any(a in outcome.advertised for a in gone):
        return failed(f"{name} is still advertised after the apply")
    result: dict[str, Any] = {
        "model": name,
        "removed": [m.name for m in matched],
        "advertised": list(outcome.advertised),
    }
    if not any(removals.values()):
        kept = _kept_because(current.policy.prune, bool(keys & owned))
        result["note"] = (
            f"removed {name} from infernet.yaml; nothing deleted ({kept})"
            if matched
            else f"{name} is not in infernet.yaml; nothing deleted ({kept})"
        )
    return Answer("completed", result)


def _kept_because(prune: str, owned: bool) -> str:
    """Why a model that is not (or no longer) in the file was not deleted."""
    if prune == "none":
        return "policy.prune: none keeps the weights of models that leave the file"
    if prune == "managed" and not owned:
        return "infernet did not install it, and policy.prune: managed deletes only what it did"
    return "it is not installed"


def _why_not(outcome: ReconcileOutcome | None, progress: CommandProgress, what: str) -> str:
    """The best one-line reason a reconcile didn't do what the command asked."""
    if outcome is not None and outcome.error:
        return outcome.error
    broke = [m for outcome_, m in progress.finished.values() if outcome_ == "failed" and m]
    if broke:
        return broke[0]
    if outcome is not None and outcome.converged:
        return f"{what} after the apply"
    return f"the node did not converge, so {what} (see infernet status on the node)"


def answer_line(text: str) -> str:
    """An error as an answer carries it: one line, cut (the dashboard shows it in a cell)."""
    return one_line(text, ANSWER_TEXT)


VERBS: Mapping[str, Callable[[Context], Answer]] = {
    "model_install": model_install,
    "model_remove": model_remove,
}
