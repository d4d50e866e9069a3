"""One apply, start to end: plan (or check the saved plan), refuse a plan with errors, confirm,
execute, heartbeat.

``infernet apply``, ``model install`` and ``model remove`` go through ``apply``; the caller holds
the node lock (taken before it read the file, so what it applies is never older than what the
last writer did) and says how to show the plan, how to ask, and where progress goes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.converge.executor import Result
from reconciler.converge.session import Session
from reconciler.errors import PlanError
from reconciler.events import Progress
from reconciler.model import Desired, Plan


@dataclass(frozen=True)
class SavedPlan:
    """A plan saved by ``plan --out``, read back, and the file it was made from."""

    path: str
    desired: Desired
    plan: Plan


@dataclass(frozen=True)
class Applied:
    """How an apply ended: ``result`` is None when there was nothing to do, or when the
    changes were not confirmed (``cancelled``)."""

    plan: Plan
    result: Result | None
    cancelled: bool = False


def read_saved(path: Path) -> SavedPlan:
    """The plan saved at ``path`` and the file it was made from, which must not have changed
    since; ``PlanError`` when it has (the plan would apply to a file that no longer says so)."""
    from reconciler.config import desired
    from reconciler.planning.document import read_document, with_sources

    saved = read_document(path)
    the_desired = desired.load(Path(saved.source.path))
    if the_desired.source.sha256 != saved.source.sha256:
        raise PlanError(
            f"saved plan {path} was made from another version of "
            f"{saved.source.path}; run infernet plan --out again"
        )
    # The document shows each source redacted: the file's real ones go back in.
    return SavedPlan(str(path), the_desired, with_sources(saved, the_desired))


def apply(
    session: Session,
    *,
    show: Callable[[Plan], None],
    confirm: Callable[[], bool] | None,
    progress: Progress,
    saved: SavedPlan | None = None,
    allow_destroy: bool = False,
    refresh: bool = False,
    force_remove: frozenset[str] = frozenset(),
) -> Applied:
    """Observe and plan (recording what the observation establishes about ownership), check a
    saved plan against the node, ``show`` the plan, refuse it when it has errors, heartbeat
    when there is nothing to do, run the canaries alone when that is all there is, else
    ``confirm`` (None: no question) and execute."""
    observed, plan = session.observe_and_plan(
        allow_destroy=allow_destroy, refresh=refresh, force_remove=force_remove, record=True
    )
    if saved is not None:
        if saved.plan.fingerprint != plan.fingerprint:
            raise PlanError(
                f"the node changed since the plan in {saved.path} was made "
                "(installed, loaded or upstream models differ); run infernet plan --out again"
            )
        plan = saved.plan
    show(plan)
    if plan.errors:
        more = f" (and {len(plan.errors) - 1} more)" if len(plan.errors) > 1 else ""
        raise PlanError(plan.errors[0] + more)
    if not plan.actions and not plan.checks:
        session.heartbeat(plan, observed, converged=True, progress=progress)
        return Applied(plan, None)
    if not plan.actions:  # only canaries to run: nothing to confirm, nothing is taken away
        return Applied(plan, session.apply(plan, observed, progress=progress))
    if confirm is not None and not confirm():
        return Applied(plan, None, cancelled=True)
    return Applied(plan, session.apply(plan, observed, progress=progress))
