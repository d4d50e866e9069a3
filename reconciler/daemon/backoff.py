"""Backing off: per failed action, and per step of the daemon that raised at its boundary.

Both back off the same way (2 s × 3ⁿ, at most 5 min): a failure that a tick meets every time is
met once per backoff, not once per second.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.model import Action, Op, Plan
from reconciler.names import key

BACKOFF_BASE, BACKOFF_CAP = 2.0, 300.0


@dataclass
class Backoff:
    """Per-action failure counts and when each may be tried again."""

    clock: Callable[[], float] = time.monotonic
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def key_of(action: Action) -> str:
        return f"{action.op.value}:{key(action.backend, action.canonical)}"

    def allowed(self, action: Action) -> bool:
        return self.clock() >= self.until.get(self.key_of(action), 0.0)

    def failed(self, action: Action) -> float:
        k = self.key_of(action)
        n = self.failures.get(k, 0) + 1
        self.failures[k] = n
        delay = min(BACKOFF_BASE * 3.0 ** (n - 1), BACKOFF_CAP)
        self.until[k] = self.clock() + delay
        return delay

    def succeeded(self, action: Action) -> None:
        k = self.key_of(action)
        self.failures.pop(k, None)
        self.until.pop(k, None)

    def filter(self, plan: Plan) -> tuple[Plan, list[Action]]:
        """The plan without actions still backing off; removals wait while a pull does."""
        held = [a for a in plan.actions if not self.allowed(a)]
        if not held:
            return plan, []
        pull_held = any(a.op in (Op.PULL, Op.UPDATE) for a in held)
        keep = tuple(
            a for a in plan.actions if a not in held and not (pull_held and a.op is Op.REMOVE)
        )
        return dataclasses.replace(plan, actions=keep), held


@dataclass
class Faults:
    """What each step of the daemon raised at its boundary (one line), and its backoff.

    Steps back off like failed actions (2 s × 3ⁿ, at most 5 min): a bug that a tick triggers
    every time is met once per backoff, not once per second.
    """

    clock: Callable[[], float] = time.monotonic
    reasons: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    def allowed(self, step: str) -> bool:
        return self.clock() >= self.until.get(step, 0.0)

    def failed(self, step: str, reason: str) -> tuple[float, bool]:
        """The delay before ``step`` runs again, and whether ``reason`` is news (to log)."""
        n = self.failures.get(step, 0) + 1
        self.failures[step] = n
        delay = min(BACKOFF_BASE * 3.0 ** (n - 1), BACKOFF_CAP)
        self.until[step] = self.clock() + delay
        news = self.reasons.get(step) != reason
        self.reasons[step] = reason
        return delay, news

    def cleared(self, step: str) -> bool:
        """``step`` ran through; True when it had been failing."""
        self.until.pop(step, None)
        self.failures.pop(step, None)
        return self.reasons.pop(step, None) is not None

    def retry_now(self, step: str) -> None:
        """New input (the file changed, SIGHUP): try at once, still counting failures."""
        self.until.pop(step, None)
