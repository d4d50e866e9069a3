"""The Protocol every backend adapter implements, and what a family's adapters are opened with.

Observation is split into ``inventory`` (cheap: what is installed and loaded) and
``details``/``upstream`` (per model, possibly slow or remote), so ``observe`` can ask for the
expensive parts only for models the file mentions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Mapping
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


@dataclass(frozen=True)
class ChatRequest:
    """One chat a backend is asked to generate (a job's ``input_spec``, checked)."""

    messages: tuple[Mapping[str, str], ...]  # {"role": ..., "content": ...}
    max_tokens: int | None = None  # None: the backend's own limit
    temperature: float | None = None  # None: the backend's default


@dataclass
class Ending:
    """How a generation ended, filled in by ``Backend.chat`` as the stream is read."""

    reason: str | None = None  # stop | length | ... as the backend said
    tokens: int | None = None  # tokens generated, when the backend counts them
    seconds: float | None = None  # generation time, when the backend measures it


@dataclass(frozen=True)
class Served:
    """How one advertised model is served: what its chats and its canary are sent as."""

    name: str  # the model as actions name it (the file's name; ``org/repo@rev`` for engines)
    advertise_as: str  # the name jobs ask for; an engine serves the model under it
    keep_alive: float | None = None  # the file's keep_alive (FOREVER = pinned); None: default
    context: int | None = None  # the file's context, sent where the backend takes it per request
    embedding: bool = False  # an embedding model: its canary is one embedding, it never chats


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

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream a chat: yields the text deltas and fills ``ending``. Ends early (quietly)
        once ``cancel`` is set. A backend error, an error inside the stream, a cut stream or
        a stall raises ``ChatFailed`` (one line): never a quiet end without the backend's own
        end of stream."""
        ...

    def canary(self, model: Served) -> None:
        """Prove ``model`` answers: a one-token generation (one embedding for an embedding
        model), leaving it loaded only if it is pinned; raises ``ChatFailed`` (one line)."""
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


@runtime_checkable
class Tidies(Protocol):
    """An adapter that leaves things behind for a later try (a partial download, kept so the
    next pull resumes it) and can drop what belongs to models no longer wanted."""

    def tidy(self, keep: Collection[str]) -> list[str]:
        """Drop leftovers of models not named in ``keep``; returns what was dropped."""
        ...
