"""``backends.ollama``: where the Ollama server listens, its registry and its model store."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.model import BackendKind, Desired

FAMILY = "ollama"
_OLLAMA_PORT = 11434


@dataclass(frozen=True)
class OllamaSettings:
    """``backends.ollama``."""

    url: str = "http://127.0.0.1:11434"
    registry: str = "https://registry.ollama.ai"
    models_dir: str = "~/.ollama/models"


SCHEMA: Mapping[str, Any] = {
    "description": "The Ollama server (backend: ollama).",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "url": {
            "description": (
                "Base URL of the Ollama API. Default: $OLLAMA_HOST (a bare host gets http:// "
                "and port 11434, as the ollama client does), then http://127.0.0.1:11434."
            ),
            "$ref": "#/$defs/http_url",
        },
        "registry": {
            "description": (
                "The registry Ollama pulls from; used to learn a model's size and digest "
                "before pulling."
            ),
            "$ref": "#/$defs/http_url",
            "default": "https://registry.ollama.ai",
        },
        "models_dir": {
            "description": (
                "Ollama's model store, where the disk check looks. Default: $OLLAMA_MODELS, "
                "then ~/.ollama/models."
            ),
            "type": "string",
            "minLength": 1,
        },
    },
}


def parse(fields: Mapping[str, Any], env: Mapping[str, str]) -> OllamaSettings:
    """The section as written; ``$OLLAMA_HOST`` and ``$OLLAMA_MODELS`` fill what it leaves out."""
    defaults = OllamaSettings()
    url = fields.get("url")
    if url is None:
        url = ollama_host(env["OLLAMA_HOST"]) if env.get("OLLAMA_HOST") else defaults.url
    return OllamaSettings(
        url=url.rstrip("/"),
        registry=fields.get("registry", defaults.registry).rstrip("/"),
        models_dir=fields.get("models_dir") or env.get("OLLAMA_MODELS") or defaults.models_dir,
    )


def ollama_host(value: str) -> str:
    """``$OLLAMA_HOST`` as the ollama client reads it: bare hosts get http:// and port 11434."""
    # Mirrors ollama-python's _parse_host, so `infernet` talks to the server `ollama` talks to.
    scheme, _, hostport = value.partition("://")
    port = _OLLAMA_PORT
    if not hostport:
        scheme, hostport = "http", value
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
    host = split.hostname or "127.0.0.1"
    port = split.port or port
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            host = f"[{host}]"
    except ValueError:
        pass
    path = split.path.strip("/")
    return f"{scheme}://{host}:{port}/{path}" if path else f"{scheme}://{host}:{port}"


def of(desired: Desired) -> OllamaSettings:
    """The ollama settings of ``desired`` (the defaults when it has none)."""
    from reconciler import backends

    found = backends.settings_of(desired, BackendKind.OLLAMA)
    assert isinstance(found, OllamaSettings)
    return found
