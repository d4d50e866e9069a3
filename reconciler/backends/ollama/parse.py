"""Ollama's answers as the reconciler's types: pure functions of the server's (or the
registry's) JSON, tested from recorded responses; ``backend`` does the I/O."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from reconciler.backends.gguf import meta as ggufmeta
from reconciler.backends.ollama.names import parse_ollama
from reconciler.model import BackendKind, InstalledModel, LoadedModel, ModelFacts

if TYPE_CHECKING:
    from reconciler.backends.ollama.registry import Manifest

PINNED_YEAR = 2200  # keep_alive forever shows as now + ~292 years (year 2318 in 2026)
_HUMAN = re.compile(r"^\s*([0-9.]+)\s*([KMBT]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_parameter_size(text: str | None) -> int | None:
    """``'7.6B'`` → 7_600_000_000; None when absent or unreadable."""
    match = _HUMAN.match(text or "")
    if not match:
        return None
    return int(float(match.group(1)) * _SCALE[match.group(2).upper()])


def parse_details(details: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``details`` object of tags/ps/show as ``ModelFacts`` keyword arguments."""
    d = details or {}
    return {
        "quantization": (str(d["quantization_level"]).upper() or None)
        if d.get("quantization_level")
        else None,
        "parameter_size": d.get("parameter_size") or None,
        "parameter_count": parse_parameter_size(d.get("parameter_size")),
        "family": d.get("family") or None,
        "format": d.get("format") or None,
    }


def parse_tags(raw: Mapping[str, Any]) -> list[InstalledModel]:
    """``/api/tags`` → installed models (cloud stubs skipped: they hold no weights here)."""
    out = []
    for item in raw.get("models") or []:
        if item.get("remote_host") or item.get("remote_model"):
            continue
        name = str(item.get("model") or item.get("name"))
        facts = ModelFacts(
            digest=item.get("digest"),
            size=int(item.get("size") or 0),
            weights_bytes=int(item.get("size") or 0),
            **parse_details(item.get("details")),
        )
        out.append(InstalledModel(BackendKind.OLLAMA, name, parse_ollama(name).canonical, facts))
    return out


def parse_ps(raw: Mapping[str, Any]) -> list[LoadedModel]:
    """``/api/ps`` → loaded runners; a runner expiring centuries ahead is pinned."""
    out = []
    for item in raw.get("models") or []:
        name = str(item.get("model") or item.get("name"))
        expires = item.get("expires_at")
        expires_text = expires.isoformat() if hasattr(expires, "isoformat") else expires
        year = int(str(expires_text)[:4]) if expires_text and str(expires_text)[:4].isdigit() else 0
        out.append(
            LoadedModel(
                backend=BackendKind.OLLAMA,
                name=name,
                canonical=parse_ollama(name).canonical,
                digest=item.get("digest"),
                size=int(item.get("size") or 0),
                size_vram=int(item.get("size_vram") or 0),
                expires_at=expires_text,
                pinned=year >= PINNED_YEAR,
                context_length=item.get("context_length"),
            )
        )
    return out


def parse_show(raw: Mapping[str, Any], *, digest: str | None, size: int | None) -> ModelFacts:
    """``/api/show`` → facts for the VRAM estimate (the GGUF keys of ``model_info``, read as
    for any GGUF file), with ``details`` and ``capabilities`` on top."""
    info: Mapping[str, Any] = raw.get("model_info") or raw.get("modelinfo") or {}
    base = parse_details(raw.get("details"))
    if isinstance(info.get("general.parameter_count"), int):
        base["parameter_count"] = int(info["general.parameter_count"])
    facts = ggufmeta.facts_from_metadata(info, size=size, digest=digest)
    capabilities = tuple(str(c) for c in raw.get("capabilities") or ())
    return dataclasses.replace(facts, capabilities=capabilities, **base)


def parse_config_blob(config: Mapping[str, Any], manifest: Manifest) -> ModelFacts:
    """The registry config blob (``ConfigV2``) → facts known before pulling."""
    quant = config.get("file_type")
    return ModelFacts(
        digest=manifest.digest,
        size=manifest.total_bytes,
        weights_bytes=manifest.weights_bytes,
        quantization=str(quant).upper() if quant else None,
        parameter_size=config.get("model_type") or None,
        parameter_count=parse_parameter_size(config.get("model_type")),
        family=config.get("model_family") or None,
        format=config.get("model_format") or None,
    )


def apply_gguf_header(facts: ModelFacts, header: Mapping[str, Any]) -> ModelFacts:
    """Facts from the config blob, completed with the weights' GGUF metadata keys."""
    if not header.get("general.architecture"):
        return facts
    meta = parse_show({"model_info": header}, digest=facts.digest, size=facts.size)
    return dataclasses.replace(
        facts,
        context_length=meta.context_length,
        block_count=meta.block_count,
        head_count=meta.head_count,
        head_count_kv=meta.head_count_kv,
        embedding_length=meta.embedding_length,
        key_length=meta.key_length,
        value_length=meta.value_length,
        parameter_count=facts.parameter_count or meta.parameter_count,
    )
