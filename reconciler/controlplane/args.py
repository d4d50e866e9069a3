"""The arguments of remote commands, checked strictly before anything reaches a backend.

The dashboard sends free text (trimmed, 1–256 characters, nothing more is checked there), and
the name ends up in a file we edit, in backend API paths and in the heartbeat. So on top of
each backend's grammar (``names.is_valid``) every name must be a string of at most 200
characters (the heartbeat's limit) with no whitespace, control or invisible characters, and
nothing that reads as a file path (``/x``, ``~/x``, ``..``, backslashes). An Ollama name to
install names no URL scheme and no registry host but the configured one (or one the file
already pulls from): the node fetches that host's manifest, so a dashboard must not be able
to point it at any URL it can reach (``registry_problem``).
"""

from __future__ import annotations

import contextlib
import unicodedata
from typing import Any
from urllib.parse import urlsplit

from reconciler import names
from reconciler.errors import InfernetError
from reconciler.model import ENGINE_KINDS, BackendKind, Desired

MAX_NAME = 200  # the control plane's limit for a served_models string
NO_HF = "HuggingFace models need the vllm backend, which this node doesn't run yet"

Entry = str | dict[str, Any]
"""A ``served_models`` entry as ``configedit.add_model`` takes it."""


def name_problem(value: object, *, field: str = "model") -> str | None:
    """Why ``args.<field>`` can't be a model name on any backend, or None.

    These are the checks every backend shares (and the heartbeat's 200-character limit);
    each backend's own grammar (``names.is_valid``) comes on top.
    """
    if not isinstance(value, str):
        return f"args.{field} must be a model name (a string), not {type(value).__name__}"
    if not value:
        return f"args.{field} is empty; send the model name to use"
    if len(value) > MAX_NAME:
        return f"args.{field} is {len(value)} characters long; model names have at most {MAX_NAME}"
    shown = " ".join(value.split())[:80]
    if any(c.isspace() for c in value):
        return f"args.{field} '{shown}' contains whitespace; model names have none"
    if any(unicodedata.category(c).startswith("C") for c in value):
        return f"args.{field} {value!r:.80} contains a control or invisible character"
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "~")) or "\\" in value or any(p in (".", "..") for p in parts):
        return f"args.{field} '{shown}' looks like a file path, not a model name"
    return None


def model_problem(value: object, backend: BackendKind) -> str | None:
    """Why ``value`` can't be installed on ``backend``, or None (shared checks + grammar)."""
    problem = name_problem(value)
    if problem is None:
        assert isinstance(value, str)
        problem = names.is_valid(backend, value)
    return problem


def registry_problem(model: str, current: Desired) -> str | None:
    """Why a remote install of the Ollama name ``model`` is refused for where it points, or None.

    An Ollama name may carry a registry host (``host/namespace/model:tag``) and a scheme, and
    the node fetches that host's manifest to plan the pull: a dashboard could make it request
    any URL it can reach (SSRF). So a remote name has no scheme, and its host is the
    configured registry (``backends.ollama.registry``, which the default host stands for) or
    a host infernet.yaml already pulls Ollama models from.
    """
    shown = " ".join(model.split())[:80]
    if "://" in model:
        return (
            f"args.model '{shown}' is a URL; remote commands name a model as its registry "
            "lists it (model:tag or namespace/model:tag)"
        )
    try:
        host = names.parse_ollama(model).host.lower()
    except InfernetError as exc:
        return str(exc)
    registry = urlsplit(current.ollama.registry)
    allowed = {names.DEFAULT_HOST, registry.netloc.rpartition("@")[2].lower()}
    for spec in current.models:
        if spec.backend is BackendKind.OLLAMA:
            with contextlib.suppress(InfernetError):
                allowed.add(names.parse_ollama(spec.name).host.lower())
    if host in allowed:
        return None
    return (
        f"args.model '{shown}' is on the registry host '{host[:80]}'; remote commands pull only "
        "from the configured registry (backends.ollama.registry) or hosts infernet.yaml "
        "already pulls from: add the model to infernet.yaml on the node instead"
    )


def install_target(
    args: dict[str, Any], current: Desired
) -> tuple[str, BackendKind, Entry, str] | str:
    """``(model, backend, file entry, advertised name)``, or why the install is refused."""
    model = args.get("model")
    hf = args.get("hf")
    if hf is None and isinstance(model, str) and model.startswith("hf:"):
        hf = model[3:]  # Infernet's own spelling of "the HF repo, served under this name"
    if hf is None:
        problem = model_problem(model, current.default_backend)
        if problem is None and current.default_backend is BackendKind.OLLAMA:
            assert isinstance(model, str)
            problem = registry_problem(model, current)
        if problem is not None:
            return problem
        assert isinstance(model, str)
        return model, current.default_backend, model, model
    problem = name_problem(model) or name_problem(hf, field="hf")
    if problem is not None:
        return problem
    assert isinstance(model, str) and isinstance(hf, str)
    backend = current.default_backend
    if backend not in ENGINE_KINDS:
        return NO_HF
    reason = names.is_valid(backend, hf)
    if reason is not None:
        return f"args.hf: {reason}"
    entry = {"name": hf, "backend": backend.value, "advertise_as": model}
    return model, backend, entry, model
