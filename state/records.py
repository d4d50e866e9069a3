"""The records the store hands out: frozen snapshots, never live rows.

Timestamps are ISO-8601 UTC strings (see :mod:`state.clock`); free-form payloads are the
JSON values they were stored as.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OwnedRecord:
    """A model this tool installed, so the only kind it may prune.

    ``pinned_by_us`` says this tool pinned it (keep-alive forever); ``measured_vram`` is the
    last size the backend reported while it was loaded, in bytes, if ever seen.
    """

    backend: str
    canonical: str
    name: str
    digest: str | None
    installed_at: str
    pinned_by_us: bool
    measured_vram: int | None


@dataclass(frozen=True)
class ApplyRecord:
    """The outcome of one finished apply."""

    at: str
    config_sha256: str
    git_commit: str | None
    converged: bool
    actions: int
    failed: int
    summary: dict[str, Any]


@dataclass(frozen=True)
class JournalEntry:
    """An action that was begun and never finished: the process died or was killed mid-way."""

    id: int
    run_id: str
    op: str
    backend: str
    canonical: str
    model: str
    started_at: str


@dataclass(frozen=True)
class CommandRecord:
    """A remote command as the ledger knows it.

    ``state`` is ``received``, ``running``, ``completed`` or ``failed``; ``reported_at`` is set
    once the final answer reached the control plane.
    """

    command_id: str
    verb: str
    payload: dict[str, Any]
    state: str
    result: dict[str, Any] | None
    error: str | None
    received_at: str
    updated_at: str
    reported_at: str | None


@dataclass(frozen=True)
class JobRecord:
    """A job this node took from the control plane, and its answer while it is owed."""

    job_id: str
    model: str | None
    state: str  # running | finished
    answer: dict[str, Any] | None  # the ``complete`` body, once finished
    received_at: str
    reported_at: str | None


@dataclass(frozen=True)
class LockHolder:
    """Who holds the node lock, as the holder wrote it into the lock file.

    ``pid`` is ``None`` only when the holder had not finished writing its details yet.
    """

    pid: int | None
    purpose: str
    since: str
    argv: tuple[str, ...]
