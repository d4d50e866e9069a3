"""Ollama parsers, from recorded responses of the real server (reference §1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.backends.ollama.parse import (
    parse_config_blob,
    parse_parameter_size,
    parse_ps,
    parse_show,
    parse_tags,
)
from reconciler.backends.ollama.registry import parse_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "ollama"


def _load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def test_tags_skip_cloud_stubs_and_canonicalise() -> None:
    models = parse_tags(_load("tags.json"))
    assert [m.name for m in models] == [
        "llama3.2:latest",
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        "qwen2.5:0.5b",
    ]
    assert models[0].canonical == "registry.ollama.ai/library/llama3.2:latest"
    assert models[1].canonical == "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m"
    assert models[0].facts.size == 2019393189
    assert models[0].facts.quantization == "Q4_K_M"
    assert models[2].facts.parameter_count == 494_030_000


def test_ps_pinned_is_centuries_ahead() -> None:
    loaded = parse_ps(_load("ps.json"))
    assert [(m.name, m.pinned) for m in loaded] == [
        ("llama3.2:latest", True),
        ("qwen2.5:0.5b", False),
    ]
    assert loaded[1].size_vram == 600000000
    assert loaded[1].context_length == 4096


def test_show_reads_gguf_keys() -> None:
    facts = parse_show(_load("show.json"), digest="abc", size=None)
    assert facts.block_count == 28
    assert facts.head_count == 24
    assert facts.head_count_kv == 8
    assert facts.key_length == 128
    assert facts.context_length == 131072
    assert facts.parameter_count == 3212749888
    assert facts.capabilities == ("completion", "tools")


def test_show_without_model_info_is_empty_not_an_error() -> None:
    facts = parse_show({"details": {}, "model_info": {}}, digest=None, size=None)
    assert facts.block_count is None


def test_manifest_and_config_blob_give_exact_sizes() -> None:
    raw = (FIXTURES / "manifest.json").read_bytes()
    manifest = parse_manifest(raw, (FIXTURES / "config_blob.json").read_bytes())
    assert manifest.total_bytes == 1678447520 + 8433 + 136 + 84 + 483
    assert manifest.weights_bytes == 1678447520
    facts = parse_config_blob(manifest.config, manifest)
    assert facts.quantization == "Q8_0"
    assert facts.parameter_count == 1_200_000_000
    assert len(manifest.digest) == 64


def test_parameter_size_forms() -> None:
    assert parse_parameter_size("8B") == 8_000_000_000
    assert parse_parameter_size("7.6B") == 7_600_000_000
    assert parse_parameter_size("494.03M") == 494_030_000
    assert parse_parameter_size("") is None
    assert parse_parameter_size(None) is None
