"""What a node advertises: the one definition of "advertised".

The control plane routes a job only to nodes whose heartbeat lists the requested name, so a
name goes out only for a model that is installed, verified and fits the budget: the plan's
``advertised`` names (served by a backend that answers, fitting, the first ``MAX_ADVERTISED``
in file order, ``first``), less those whose pull or engine start has not been done or whose
canary has not answered (``now``, ``planning.verified``). Heartbeats, ``status``, the job
routes and the withdrawal before deletes all ask ``now``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from reconciler import backends
from reconciler.limits import MAX_ADVERTISED
from reconciler.model import Action, BackendKind, Desired, Op, Plan


def first(names: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """The names the control plane will take (the first ``MAX_ADVERTISED`` in file order),
    and the warning saying which are left out, if any: every model is still installed and
    served, and reachable by its name on the node."""
    if len(names) <= MAX_ADVERTISED:
        return tuple(names), None
    left = names[MAX_ADVERTISED:]
    warning = (
        f"{len(names)} models to advertise, but the control plane lists at most "
        f"{MAX_ADVERTISED} per node: the first {MAX_ADVERTISED} in file order are "
        f"advertised; {len(left)} are installed and served but not advertised "
        f"({', '.join(left[:5])}{', …' if len(left) > 5 else ''})"
    )
    return tuple(names[:MAX_ADVERTISED]), warning


def makes_servable(action: Action) -> bool:
    """Whether a model is not served until ``action`` is done: its pull, or its engine's start."""
    return action.op is Op.PULL or (action.op is Op.PIN and backends.driver(action.backend).engine)


def now(
    the_plan: Plan,
    desired: Desired,
    *,
    done: Collection[Action] = (),
    verified: Collection[tuple[BackendKind, str]] = (),
) -> tuple[str, ...]:
    """What may be advertised right now: the plan's advertised names, in file order, less the
    models whose pull or engine start in the plan is not among ``done`` (the actions that have
    succeeded so far), or whose canary (``the_plan.checks``) is not among ``verified``
    (``(backend, canonical)`` of those that answered): a model is advertised only once it is
    installed and answered."""
    waiting = {
        (a.backend, a.canonical) for a in the_plan.actions if makes_servable(a) and a not in done
    } | {
        (c.backend, c.canonical)
        for c in the_plan.checks
        if (c.backend, c.canonical) not in verified
    }
    return tuple(
        spec.advertise_as
        for spec in desired.models
        if spec.advertise_as in the_plan.advertised
        and (spec.backend, spec.canonical) not in waiting
    )
