"""The Protocol every backend adapter implements, and what a family's adapters are opened with.

Observation is split into ``inventory`` (cheap: what is installed and loaded) and
``details``/``upstream`` (per model, possibly slow or remote), so ``observe`` can ask for the
expensive parts only for models the file mentions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from reconciler.model import BackendKind, BackendState, ModelFacts, ModelSpec, Upstream

PullProgress = Callable[[str, int | None, int | None], None]
"""``(phase, completed_bytes, total_bytes)`` as a pull advances."""


class Cache(Protocol):
    """A small persistent cache (the state store's), so details by digest are asked once."""

    def get(self, kind: str, key: str, max_age: float | None = None) -> object | None:
        """The cached JSON value or None."""
        ...

    def put(self, kind: str, key: str, value: object) -> None:
        """Remember a JSON value."""
        ...


@dataclass(frozen=True)
class AdapterContext:
    """What every family's ``open_backends`` gets besides its own settings."""

    cache: Cache | None = None  # the state store's cache table
    state_dir: Path | None = None  # None: a caller without a state folder (no engine records)
    stall_timeout: float = 300.0  # seconds without pull progress before a pull fails
    disk_reserve: int = 0  # budget.disk_reserve, kept free while downloading


class Backend(Protocol):
    """An inference server whose model inventory the reconciler manages."""

    kind: BackendKind
    url: str

    def inventory(self) -> BackendState:
        """Installed and loaded models; an unreachable server is a state, not an exception."""
        ...

    def details(self, name: str, digest: str | None) -> ModelFacts:
        """Full facts for an installed model (metadata for the VRAM estimate)."""
        ...

    def upstream(self, spec: ModelSpec) -> Upstream:
        """What a pull of ``spec`` would fetch: size, bytes still missing, quantization."""
        ...

    def pull(
        self,
        name: str,
        progress: PullProgress,
        cancel: threading.Event,
        *,
        source: str | None = None,
        digest: str | None = None,
    ) -> None:
        """Download ``name`` (from ``source`` for file-based backends; ``digest`` is what the
        plan expects to get); raise a ``BackendError`` subclass on failure."""
        ...

    def verify(self, name: str, digest: str | None) -> ModelFacts:
        """Check ``name`` is installed (with ``digest`` when given) and return its facts."""
        ...

    def load(
        self,
        name: str,
        *,
        keep_alive: float,
        embedding: bool,
        context: int | None,
        advertise_as: str | None = None,
    ) -> None:
        """Load ``name`` with ``keep_alive`` seconds (negative: forever, 0: unload);
        ``advertise_as`` is the name an engine-served model is served under."""
        ...

    def remove(self, name: str, *, embedding: bool) -> None:
        """Unload ``name`` whatever its keep_alive, then delete its weights."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class Supervises(Protocol):
    """An adapter that starts processes of its own (engines): ``status`` lists them."""

    def supervised(self) -> list[dict[str, Any]]:
        """One row per process: model, state, pid, port, exit_code, restarts, log, log_tail."""
        ...
