"""Per-action backoff in the daemon: 2 s × 3ⁿ, capped at 5 min, and removals wait for pulls."""

from __future__ import annotations

from reconciler.daemon.backoff import Backoff
from reconciler.model import (
    Action,
    BackendKind,
    Budget,
    ConfigSource,
    Op,
    Plan,
)

OLLAMA = BackendKind.OLLAMA


def _action(op: Op, model: str) -> Action:
    return Action(op, model, OLLAMA, f"registry.ollama.ai/library/{model}", "why")


def _plan(*actions: Action) -> Plan:
    budget = Budget(None, "none", 0, 0, 0, True, None, 0, 0)
    return Plan(ConfigSource("f", "s"), "fp", tuple(actions), (), budget, ())


def test_delays_grow_per_action_and_cap() -> None:
    now = [100.0]
    backoff = Backoff(clock=lambda: now[0])
    pull = _action(Op.PULL, "a:1b")
    assert [backoff.failed(pull) for _ in range(7)] == [2, 6, 18, 54, 162, 300, 300]
    other = _action(Op.PULL, "b:1b")
    assert backoff.allowed(other), "backoff is per action, not global"
    assert not backoff.allowed(pull)
    now[0] += 301
    assert backoff.allowed(pull)
    backoff.succeeded(pull)
    assert backoff.failed(pull) == 2


def test_held_pull_holds_back_removals_too() -> None:
    backoff = Backoff(clock=lambda: 0.0)
    pull, pin = _action(Op.PULL, "a:1b"), _action(Op.PIN, "c:1b")
    remove = _action(Op.REMOVE, "old:1b")
    backoff.failed(pull)
    plan, held = backoff.filter(_plan(pull, pin, remove))
    assert held == [pull]
    assert plan.actions == (pin,)


def test_nothing_held_returns_the_plan_unchanged() -> None:
    backoff = Backoff(clock=lambda: 0.0)
    plan = _plan(_action(Op.REMOVE, "old:1b"))
    assert backoff.filter(plan) == (plan, [])
