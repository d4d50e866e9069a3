"""Progress events: what the executor reports, through one injected callback.

The executor never prints. It calls ``progress(Event(...))``; the CLI turns events into rich
bars on a terminal, plain lines off one, or JSON lines with ``--json``; the daemon logs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from reconciler.model import Action


class Kind(StrEnum):
    """What happened."""

    STARTED = "action_started"  # an action began
    PROGRESS = "progress"  # bytes moved or a phase changed within an action
    FINISHED = "action_finished"  # an action ended; ``outcome`` says how
    RETRY = "retry"  # a retryable failure; the action will be tried again
    NOTE = "note"  # something worth telling the operator (withdrawal, resume, skip)
    CONVERGED = "converged"  # the final observation: ``outcome`` is converged or not_converged


@dataclass(frozen=True)
class Event:
    """One progress report; ``action`` is None for run-level events."""

    kind: Kind
    action: Action | None = None
    phase: str | None = None
    completed: int | None = None
    total: int | None = None
    outcome: str | None = None  # ok | failed | skipped | converged | not_converged
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON-lines record (``apply --json``)."""
        doc: dict[str, Any] = {"event": self.kind.value}
        if self.action is not None:
            doc["op"] = self.action.op.value
            doc["model"] = self.action.model
            doc["backend"] = self.action.backend.value
        for name in ("phase", "completed", "total", "outcome", "message"):
            value = asdict(self)[name]
            if value is not None:
                doc[name] = value
        return doc


Progress = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default callback: nobody is listening."""
