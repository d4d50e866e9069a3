"""One exception tree for the whole reconciler.

Everything the reconciler raises on purpose is an :class:`InfernetError`; the CLI prints those
as one line (``error: <message>``) and exits 1. Anything else is a bug and gets a traceback.

::

    InfernetError                    expected failure; ``str()`` is the one-line message
    ├── ConfigError                  the desired-state file is unusable
    │   ├── InvalidModelName         a model reference breaks its backend's grammar
    │   └── ValidationError          schema or semantic errors; carries every ``Problem``
    ├── PlanError                    a plan was refused (budget, stale saved plan, safety rule)
    ├── LockError                    another writer holds the node lock
    ├── StateError                   the state store could not be used (never fatal for plan)
    └── BackendError                 a backend answered badly or not at all
        ├── BackendUnreachable       connection refused / DNS / timeout; retryable
        ├── ModelNotFound            the backend or registry does not know the model; permanent
        ├── PullFailed               a pull ended with an error line or was stalled
        │   └── PullStalled          the pull's progress stopped moving; retryable
        └── TransientBackendError    5xx, busy, reset; retryable

``retryable`` is part of the type so the executor alone decides how often to retry.
"""

from __future__ import annotations

from dataclasses import dataclass

ELLIPSIS = "…"


def one_line(text: str, limit: int | None = None, *, mark: str = ELLIPSIS) -> str:
    """``text`` on one line (every run of whitespace one space), cut to ``limit`` characters
    with ``mark`` as the last of them: an error that reaches a log line, a table cell or a
    peer never spans lines or floods it."""
    flat = " ".join(text.split())
    if limit is None or len(flat) <= limit:
        return flat
    return flat[: limit - len(mark)] + mark


def listed(words: list[str]) -> str:
    """``a, b and c``: names in a message."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


@dataclass(frozen=True)
class Problem:
    """One validation finding, located in the file: rendered as ``FILE:LINE:COL: message``."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class InfernetError(Exception):
    """Base of every expected failure; the message is one line saying what to do."""

    retryable: bool = False


class ConfigError(InfernetError):
    """The desired-state file can't be read or used."""


class ValidationError(ConfigError):
    """The file failed schema or semantic validation; ``problems`` lists every finding."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = str(problems[0]) if problems else "invalid configuration"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)


class InvalidModelName(ConfigError):
    """A model reference is not valid for its backend; the message says why."""


class PlanError(InfernetError):
    """A plan was refused before anything changed."""


class LockError(InfernetError):
    """Another process holds the node lock."""


class StateError(InfernetError):
    """The state store could not be opened or written."""


class BackendError(InfernetError):
    """A backend failed; ``model`` names the model when one was involved."""

    def __init__(
        self, message: str, *, model: str | None = None, retryable: bool | None = None
    ) -> None:
        self.model = model
        if retryable is not None:
            self.retryable = retryable
        super().__init__(message)


class BackendUnreachable(BackendError):
    """The backend could not be reached at all."""

    retryable = True


class ModelNotFound(BackendError):
    """The backend or registry does not know the model."""


class PullFailed(BackendError):
    """A pull ended in an error."""


class PullStalled(PullFailed):
    """A pull's progress stopped moving for longer than the stall timeout."""

    retryable = True


class TransientBackendError(BackendError):
    """A failure worth retrying: 5xx, busy, connection reset."""

    retryable = True


class ChatFailed(BackendError):
    """A chat or a canary generation failed: the backend said so (before or inside its
    stream), the stream was cut or stalled; the message is one line."""
