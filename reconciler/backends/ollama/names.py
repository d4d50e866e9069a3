"""Ollama model names: validation, the canonical form, and where a name points.

Ollama's grammar is ``[scheme://][host/][namespace/]model[:tag]`` (``types/model/name.go``):
defaults ``registry.ollama.ai``, ``library``, ``latest``. Storage keeps case, matching ignores
it, so two spellings that differ only in case are the same model. We compare on the fully
qualified lower-case form and keep the user's spelling for pulls and display.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from reconciler.errors import InfernetError, InvalidModelName, one_line
from reconciler.limits import SHOWN_NAME
from reconciler.model import BackendKind, Desired

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$")
_MODEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$")


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


def canonical(name: str, _revision: str | None = None) -> str:
    """The comparison form of an Ollama name; ``InvalidModelName`` when it is not one."""
    return parse_ollama(name).canonical


def registry_problem(model: str, current: Desired) -> str | None:
    """Why a remote install of the Ollama name ``model`` is refused for where it points, or None.

    An Ollama name may carry a registry host (``host/namespace/model:tag``) and a scheme, and
    the node fetches that host's manifest to plan the pull: a dashboard could make it request
    any URL it can reach (SSRF). So a remote name has no scheme, and its host is the
    configured registry (``backends.ollama.registry``, which the default host stands for) or
    a host infernet.yaml already pulls Ollama models from.
    """
    from reconciler.backends.ollama.settings import of

    shown = one_line(model, SHOWN_NAME, mark="")
    if "://" in model:
        return (
            f"args.model '{shown}' is a URL; remote commands name a model as its registry "
            "lists it (model:tag or namespace/model:tag)"
        )
    try:
        host = parse_ollama(model).host.lower()
    except InfernetError as exc:
        return str(exc)
    registry = urlsplit(of(current).registry)
    allowed = {DEFAULT_HOST, registry.netloc.rpartition("@")[2].lower()}
    for spec in current.models:
        if spec.backend is BackendKind.OLLAMA:
            with contextlib.suppress(InfernetError):
                allowed.add(parse_ollama(spec.name).host.lower())
    if host in allowed:
        return None
    return (
        f"args.model '{shown}' is on the registry host '{host[:80]}'; remote commands pull only "
        "from the configured registry (backends.ollama.registry) or hosts infernet.yaml "
        "already pulls from: add the model to infernet.yaml on the node instead"
    )
