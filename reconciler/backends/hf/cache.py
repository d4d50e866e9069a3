"""The hub cache the three engine kinds share: one walk of it per observation, and what a
cached revision's own files say about its shape and weights (``config.json``, safetensors
headers), for the VRAM estimate."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconciler.model import ModelFacts

DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def split(ref: str) -> tuple[str, str]:
    """``org/repo@revision`` → ``(org/repo, revision)`` (``main`` when absent)."""
    repo, _, revision = ref.partition("@")
    return repo, revision or "main"


def config_facts(config: Mapping[str, Any], facts: ModelFacts) -> ModelFacts:
    """``config.json`` → the shape the KV-cache estimate needs."""
    text = config.get("text_config")
    cfg: Mapping[str, Any] = text if isinstance(text, dict) else config

    def num(*keys: str) -> int | None:
        for k in keys:
            value = cfg.get(k)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    heads = num("num_attention_heads", "n_head")
    hidden = num("hidden_size", "n_embd", "d_model")
    head_dim = num("head_dim") or (hidden // heads if hidden and heads else None)
    return dataclasses.replace(
        facts,
        family=str(config.get("model_type") or "") or None,
        format="safetensors",
        context_length=num("max_position_embeddings", "n_positions", "seq_length"),
        block_count=num("num_hidden_layers", "n_layer"),
        head_count=heads,
        head_count_kv=num("num_key_value_heads") or heads,
        embedding_length=hidden,
        key_length=head_dim,
        value_length=head_dim,
    )


def weights(parameter_count: Mapping[Any, int]) -> tuple[int, int]:
    """(parameters, bytes) from a dtype → parameter count map."""
    params = sum(parameter_count.values())
    size = sum(n * DTYPE_BYTES.get(dtype.upper(), 2) for dtype, n in parameter_count.items())
    return params, size


def local_parameter_count(snapshot: Path) -> dict[str, int]:
    """Parameter counts by dtype from the safetensors headers (8-byte length, then JSON)."""
    counts: dict[str, int] = {}
    for path in sorted(snapshot.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(length, 100 << 20)))
        except (OSError, ValueError, struct.error):
            continue
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            n = 1
            for dim in tensor.get("shape") or ():
                n *= int(dim)
            dtype = str(tensor.get("dtype"))
            counts[dtype] = counts.get(dtype, 0) + n
    return counts


class CacheScanner:
    """``scan_cache_dir`` of one hub cache, remembered for ``ttl`` seconds: the three engine
    kinds' inventories and the per-model details of one observation share a walk of the
    tree. Downloads and removals call ``forget``, so what they changed is read again."""

    def __init__(self, cache_dir: Path, ttl: float = 2.0) -> None:
        self.cache_dir = cache_dir
        self.ttl = ttl
        self._lock = threading.Lock()
        self._at = -ttl
        self._info: Any = None

    def scan(self) -> Any:
        """The cache's ``HFCacheInfo``, or None when there is no cache."""
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._info
            self._info = self._walk()
            self._at = time.monotonic()
            return self._info

    def forget(self) -> None:
        """The next ``scan`` walks the cache again."""
        with self._lock:
            self._at = -self.ttl

    def _walk(self) -> Any:
        if not self.cache_dir.is_dir() or not _holds_models(self.cache_dir):
            return None
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            return scan_cache_dir(self.cache_dir)
        except CacheNotFound:
            return None


def _holds_models(cache_dir: Path) -> bool:
    """Whether the cache has a model repository folder (``models--org--name``): one without
    any lists no model, as no cache does, and is answered without importing
    ``huggingface_hub`` (~150 ms: a node that serves no HF model should not pay it)."""
    try:
        with os.scandir(cache_dir) as entries:
            return any(entry.name.startswith("models--") for entry in entries)
    except OSError:
        return True  # the scan says what is wrong with the folder


def blob_bytes(repo_dir: Path) -> int:
    """Bytes under the repo's blobs folder (complete and ``.incomplete``): download progress."""
    total = 0
    try:
        for blob in (repo_dir / "blobs").iterdir():
            try:
                total += blob.stat().st_size
            except OSError:
                continue
    except OSError:
        return 0
    return total
