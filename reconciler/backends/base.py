"""The Protocol every backend adapter implements.

Observation is split into ``inventory`` (cheap: what is installed and loaded) and
``details``/``upstream`` (per model, possibly slow or remote), so ``observe`` can ask for the
expensive parts only for models the file mentions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

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
