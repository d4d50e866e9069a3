"""``backends.llamacpp``: the GGUF folder and the ``llama-server`` router that serves it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FAMILY = "llamacpp"


@dataclass(frozen=True)
class LlamacppSettings:
    """``backends.llamacpp``."""

    models_dir: str = "/var/lib/infernet/models"
    url: str = "http://127.0.0.1:8080"
    parallel: int | None = None  # the router's -np, for the estimate while it can't be asked


SCHEMA: Mapping[str, Any] = {
    "description": "llama.cpp's llama-server in router mode (backend: llamacpp).",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "models_dir": {
            "description": "Directory of GGUF files that llama-server serves; downloads go here.",
            "type": "string",
            "minLength": 1,
            "default": "/var/lib/infernet/models",
        },
        "url": {
            "description": "Base URL of llama-server.",
            "$ref": "#/$defs/http_url",
            "default": "http://127.0.0.1:8080",
        },
        "parallel": {
            "description": (
                "Slots each llama-server child serves: the -np the router is started with. The "
                "VRAM estimate counts every slot's KV cache; it reads the router's own -c and -np "
                "while the router answers, and uses this while it doesn't. Default: "
                "llama-server's (-np auto: 4 slots sharing one KV cache)."
            ),
            "type": "integer",
            "minimum": 1,
            "maximum": 1024,
        },
    },
}


def parse(fields: Mapping[str, Any], _env: Mapping[str, str]) -> LlamacppSettings:
    """The section as written (the schema checked it), defaults for what it leaves out."""
    return LlamacppSettings(**fields)
