"""llama.cpp's name rules, and what the file may ask of it that the router can't do.

A model is a GGUF file in ``backends.llamacpp.models_dir``, named by its file name. Its
children run at the router's ``-c`` and ``-np``, and the router has no per-model keep-alive:
the planner says so when the file asks for either.
"""

from __future__ import annotations

import re

from reconciler.backends.driver import plain_name
from reconciler.backends.llamacpp.settings import LlamacppSettings
from reconciler.errors import InvalidModelName
from reconciler.model import ModelFacts, ModelSpec

_GGUF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}\.gguf$")


def canonical(name: str, _revision: str | None = None) -> str:
    """A plain GGUF file name is its own canonical form; ``InvalidModelName`` otherwise."""
    if not plain_name(_GGUF, name):
        raise InvalidModelName(
            f"'{name}' is not a valid llama.cpp model name: use a plain GGUF file name "
            "like 'qwen2.5-7b-instruct-q4_k_m.gguf' (no '/' or '..')"
        )
    return name


def valid(name: str) -> bool:
    """Whether ``name`` is a file name the file could list."""
    try:
        canonical(name)
    except InvalidModelName:
        return False
    return True


def claims(name: str) -> bool:
    """A ``*.gguf`` name is a llama.cpp file."""
    return name.endswith(".gguf")


def plan_warnings(spec: ModelSpec, facts: ModelFacts, settings: LlamacppSettings) -> list[str]:
    """A finite keep_alive and a per-model context can't be applied; a stated ``parallel``
    that the router does not run is said (once: one router serves every model)."""
    warnings = []
    keep = spec.keep_alive
    if keep is not None and keep > 0:
        warnings.append(
            f"{spec.name}: keep_alive {keep:g}s can't be set per model on llama.cpp (the "
            "router's --sleep-idle-seconds applies to all); only forever and 0 are applied"
        )
    stated = settings.parallel
    if stated and facts.run_context and facts.parallel and facts.parallel != stated:
        # The estimate counts what really runs.
        warnings.append(
            f"backends.llamacpp.parallel is {stated} but the router runs {facts.parallel} "
            f"slots (its -np); the estimate counts {facts.parallel}"
        )
    if spec.context is not None and facts.run_context and facts.run_context != spec.context:
        warnings.append(
            f"{spec.name}: context {spec.context} can't be set per model on llama.cpp; the "
            f"router runs it at {facts.run_context} tokens a slot (its -c over its -np). The "
            f"estimate uses {facts.run_context}, what runs"
        )
    return warnings
