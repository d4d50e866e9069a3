"""Where a job goes: the advertised name it asks for → the backend serving that model.

The control plane routes a chat to this node only for a name its heartbeat lists, so the routes
are exactly the names advertised now (``planning.advertised``), rebuilt after every reconcile:
a model not installed, not verified, not fitting or being removed has none. An embedding
model is advertised (it serves embeddings) but takes no chat.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from reconciler.backends.base import Backend, ChatRequest, Ending, Served
from reconciler.model import BackendKind, Desired, ModelKey, Observed
from reconciler.names import addressed, key


@dataclass(frozen=True)
class Route:
    """One advertised model: its name, its key, the backend kind serving it, and how."""

    model: str  # the advertised name jobs ask for
    key: ModelKey
    engine: str  # the backend kind, as the job's ``meta`` event names it
    backend: Backend
    served: Served

    def chat(self, request: ChatRequest, ending: Ending, cancel: threading.Event) -> Iterator[str]:
        """The backend's stream of text deltas (``Backend.chat``)."""
        return self.backend.chat(self.served, request, ending, cancel)


def build(
    desired: Desired,
    advertised: Sequence[str],
    observed: Observed,
    adapters: Mapping[BackendKind, Backend],
) -> dict[str, Route]:
    """A route for every name advertised now, keyed by that name."""
    names = set(advertised)
    routes: dict[str, Route] = {}
    for spec in desired.models:
        backend = adapters.get(spec.backend)
        if spec.advertise_as not in names or backend is None:
            continue
        state = observed.backends.get(spec.backend)
        installed = (
            next((m for m in state.installed if m.canonical == spec.canonical), None)
            if state is not None
            else None
        )
        embedding = installed is not None and "embedding" in installed.facts.capabilities
        served = Served(
            name=addressed(spec.backend, spec.name, spec.canonical),
            advertise_as=spec.advertise_as,
            keep_alive=spec.keep_alive,
            context=spec.context,
            embedding=embedding,
        )
        routes[spec.advertise_as] = Route(
            spec.advertise_as,
            key(spec.backend, spec.canonical),
            spec.backend.value,
            backend,
            served,
        )
    return routes


class Routes:
    """The routes in force, swapped whole after each reconcile; the job runner's router."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()

    def update(self, routes: Mapping[str, Route]) -> None:
        """The routes of what is advertised now."""
        with self._lock:
            self._routes = dict(routes)

    def withdraw(self, keys: Collection[ModelKey]) -> list[str]:
        """Drop the routes of models about to be removed; returns their advertised names."""
        with self._lock:
            gone = [name for name, r in self._routes.items() if r.key in keys]
            for name in gone:
                del self._routes[name]
        return gone

    def __call__(self, name: str) -> Route | str:
        """The route for a job asking for ``name``, or why there is none (one line)."""
        with self._lock:
            route = self._routes.get(name)
        if route is None:
            return f"{name} is not advertised by this node right now"
        if route.served.embedding:
            return f"{name} is an embedding model: this node serves it no chat"
        return route
