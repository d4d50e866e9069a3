"""Model names across backends: validation, canonical forms, comparison keys, and "which entry".

Each backend's own grammar lives with its driver (``reconciler.backends``); this module asks the
driver of the kind at hand, so an unknown kind is an error here, never another backend's rule.
A model is known everywhere (desired, observed, owned, the state store) by its ``ModelKey``:
``<kind>:<canonical name>``.
"""

from __future__ import annotations

from reconciler import backends
from reconciler.errors import InvalidModelName
from reconciler.model import BackendKind, ModelKey, ModelSpec


def canonical(backend: str, name: str, revision: str | None = None) -> str:
    """The comparison form of ``name`` on ``backend``; raises ``InvalidModelName`` when invalid
    (and ``UnknownBackend`` for a kind no driver serves)."""
    return backends.driver(backend).canonical(name, revision)


def key(backend: str, canonical_name: str) -> ModelKey:
    """The key that identifies a model across desired, observed and owned maps."""
    return ModelKey(f"{BackendKind(backend).value}:{canonical_name}")


def addressed(backend: str, name: str, canonical_name: str) -> str:
    """What ``backend`` is told a model is called: its canonical ``org/repo@revision`` for a
    kind whose models are repositories at a revision, else the name as the file writes it."""
    return canonical_name if backends.driver(backend).revisions else name


def is_valid(backend: str, name: str) -> str | None:
    """None when ``name`` is valid on ``backend``, else the reason."""
    try:
        canonical(backend, name)
    except InvalidModelName as exc:
        return str(exc)
    return None


def refers_to(spec: ModelSpec, name: str, backend: BackendKind | None = None) -> bool:
    """Whether ``name``, as a person or the dashboard types it, means the file entry ``spec``.

    It does when it is the entry's advertised name, or the same model once both are in
    canonical form (Ollama's case and default tag, say). A repository at a revision is compared
    at the entry's own revision (``org/repo`` means the entry whatever revision it pins)
    unless ``name`` names one itself (``org/repo@v1``). ``backend`` narrows to one backend.
    The CLI, remote commands and file edits all decide "which entry" here.
    """
    if backend is not None and spec.backend is not backend:
        return False
    if spec.advertise_as == name:
        return True
    repo, revision = name, spec.revision
    if backends.driver(spec.backend).revisions and "@" in name:
        repo, _, revision = name.partition("@")
    try:
        return canonical(spec.backend, repo, revision) == spec.canonical
    except InvalidModelName:
        return False


__all__ = ["ModelKey", "canonical", "is_valid", "key", "refers_to"]
