"""Model references per backend: validation, canonical forms and comparison keys.

Ollama's grammar is ``[scheme://][host/][namespace/]model[:tag]`` (``types/model/name.go``):
defaults ``registry.ollama.ai``, ``library``, ``latest``. Storage keeps case, matching ignores
it, so two spellings that differ only in case are the same model. We compare on the fully
qualified lower-case form and keep the user's spelling for pulls and display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.errors import InvalidModelName
from reconciler.model import BackendKind

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_GGUF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}\.gguf$")
_HF_REPO = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class OllamaName:
    """An Ollama model reference split into its parts, case as written."""

    scheme: str
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def canonical(self) -> str:
        """The fully qualified lower-case form used for comparison."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    @property
    def display(self) -> str:
        """The shortest form, as ``/api/tags`` prints it (always with a tag)."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"


def parse_ollama(name: str) -> OllamaName:
    """Split an Ollama reference, filling in defaults; raise ``InvalidModelName`` when invalid."""
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise InvalidModelName(f"'{name}' is not a valid Ollama model name (no spaces allowed)")
    scheme = "https"
    rest = name
    for prefix in ("https://", "http://"):
        if rest.startswith(prefix):
            scheme, rest = prefix[:-3], rest[len(prefix) :]
            break
    if "@" in rest:
        raise InvalidModelName(
            f"'{name}' is not a valid Ollama model name: '@digest' is not supported"
        )
    tag = DEFAULT_TAG
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    parts = rest.split("/")
    if len(parts) > 3:
        raise InvalidModelName(f"'{name}' is not a valid Ollama model name: too many '/' parts")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        (model,) = parts
    checks = (
        (_HOST, host, "host"),
        (_NAMESPACE, namespace, "namespace"),
        (_MODEL, model, "model"),
        (_TAG, tag, "tag"),
    )
    for pattern, value, what in checks:
        if not pattern.match(value):
            raise InvalidModelName(
                f"'{name}' is not a valid Ollama model name: bad {what} '{value}' "
                "(letters, digits, '_', '-', '.'; must start with a letter, digit or '_')"
            )
    return OllamaName(scheme, host, namespace, model, tag)


def canonical(backend: BackendKind, name: str, revision: str | None = None) -> str:
    """The comparison form of ``name`` on ``backend``; raises ``InvalidModelName`` when invalid."""
    if backend is BackendKind.OLLAMA:
        return parse_ollama(name).canonical
    if backend is BackendKind.LLAMACPP:
        if not _GGUF.match(name) or ".." in name:
            raise InvalidModelName(
                f"'{name}' is not a valid llama.cpp model name: use a plain GGUF file name "
                "like 'qwen2.5-7b-instruct-q4_k_m.gguf' (no '/' or '..')"
            )
        return name
    if not _HF_REPO.match(name) or ".." in name:
        raise InvalidModelName(
            f"'{name}' is not a valid HuggingFace repo id: use 'org/repo' "
            "(letters, digits, '_', '-', '.')"
        )
    return f"{name}@{revision or 'main'}"


def key(backend: BackendKind | str, canonical_name: str) -> str:
    """The key that identifies a model across desired, observed and owned maps."""
    return f"{BackendKind(backend).value}:{canonical_name}"


def is_valid(backend: BackendKind, name: str) -> str | None:
    """None when ``name`` is valid on ``backend``, else the reason."""
    try:
        canonical(backend, name)
    except InvalidModelName as exc:
        return str(exc)
    return None
