"""A GGUF file's facts for the VRAM estimate: from its metadata keys and tensor table.

Metadata, local or remote, and a local file's tensor table are parsed by ``gguf.header``:
bounded (a crafted header is a one-line error, never a crash) and fast (the ``gguf`` package's
reader builds a numpy view per vocabulary token: 13 s for Llama 3's 128k tokens and 280k
merges, against 0.1 s here). Both end up as the same ``ModelFacts``.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler.backends.gguf.header import (
    MERGE_COUNT,
    TOKEN_COUNT,
    NotGGUF,
    TensorInfo,
    file_type_name,
    parse_header,
    parse_tensor_infos,
)
from reconciler.errors import BackendError
from reconciler.model import ModelFacts

MiB = 1 << 20
METADATA_LIMIT = 64 * MiB
"""A local file's metadata larger than this is refused: the largest real tokenizers (256k
tokens with their merges) take about 20 MiB."""

_REPACKED_X86 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"})
_REPACKED_ARM = frozenset({"Q1_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"})
CPU_REPACKED: dict[str, frozenset[str]] = {
    "x86_64": _REPACKED_X86,
    "amd64": _REPACKED_X86,
    "aarch64": _REPACKED_ARM,
    "arm64": _REPACKED_ARM,
}
"""Weight types llama.cpp's CPU backend (ggml-cpu ``repack.cpp``) re-lays out into a buffer of
its own on this kind of processor, so a CPU-served model holds those matrices twice: the mapped
file and the repacked copy (x86: with AVX2, Q2_K only with AVX-512, counted anyway; another
architecture: both sets)."""


def facts_from_metadata(
    meta: Mapping[str, Any],
    *,
    size: int | None,
    digest: str | None = None,
    parameter_count: int | None = None,
    weights_bytes: int | None = None,
) -> ModelFacts:
    """Metadata keys (``general.*`` and ``<arch>.*``) → facts."""
    arch = str(meta.get("general.architecture") or "")

    def num(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on some archs)
            value = max(value) if value else None
        return int(value) if isinstance(value, int | float) else None

    file_type = meta.get("general.file_type")
    file_type = int(file_type) if isinstance(file_type, int) else None
    count = parameter_count or meta.get("general.parameter_count")
    tokens, merges = meta.get(TOKEN_COUNT), meta.get(MERGE_COUNT)
    vocab = num("vocab_size") or (int(tokens) if isinstance(tokens, int) and tokens > 0 else None)
    return ModelFacts(
        digest=digest,
        size=size,
        weights_bytes=weights_bytes or size,
        quantization=file_type_name(file_type),
        parameter_count=count if count else None,
        family=arch or None,
        format="gguf",
        context_length=num("context_length"),
        block_count=num("block_count"),
        head_count=num("attention.head_count"),
        head_count_kv=num("attention.head_count_kv"),
        embedding_length=num("embedding_length"),
        key_length=num("attention.key_length"),
        value_length=num("attention.value_length"),
        file_type=file_type,
        vocab_size=vocab,
        feed_forward_length=num("feed_forward_length"),
        vocab_merges=int(merges) if isinstance(merges, int) else None,
    )


def cpu_repack_bytes(tensors: Sequence[TensorInfo], machine: str | None = None) -> int:
    """Bytes of the matrices llama.cpp's CPU backend repacks on ``machine`` (default: this
    one): the multiplied weights of a repacked type with rows in multiples of 4, the tied head
    too (it is the embedding table, multiplied), never the embedding lookup itself."""
    arch = (machine or platform.machine()).lower()
    types = CPU_REPACKED.get(arch, _REPACKED_X86 | _REPACKED_ARM)
    names = {t.name for t in tensors}
    total = 0
    for t in tensors:
        shape = [int(n) for n in t.shape]
        if len(shape) < 2 or shape[1] % 4 or t.kind not in types:
            continue
        lookup = t.name.endswith("_embd.weight") or t.name.startswith("token_embd")
        if lookup and not (t.name == "token_embd.weight" and "output.weight" not in names):
            continue
        total += int(t.n_bytes)
    return total


def read_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo], int]:
    """The wanted metadata, the tensor table and where the tensor data starts, of the local
    GGUF file at ``path`` (``gguf.header``, bounded), reading a growing prefix until
    both end; ``BackendError`` naming the file when it is not a GGUF file llama.cpp could load
    (nested arrays, unknown types, cut short)."""
    n = 1 * MiB
    try:
        with path.open("rb") as f:
            while True:
                f.seek(0)
                data = f.read(n)
                header = parse_header(data)
                table = None
                if header.complete:  # the tensor infos start where the metadata ends
                    table = parse_tensor_infos(data, header.consumed, header.tensor_count)
                if table is not None:
                    tensors, end = table
                    align = header.metadata.get("general.alignment")
                    align = align if isinstance(align, int) and align > 0 else 32
                    return header.metadata, tensors, -(-end // align) * align
                if len(data) < n:
                    raise BackendError(
                        f"{path} is not a readable GGUF file (it ends inside its header)"
                    )
                if n >= METADATA_LIMIT:
                    raise BackendError(
                        f"{path} is not a usable GGUF file (its header is over "
                        f"{METADATA_LIMIT // MiB} MiB)"
                    )
                n = min(n * 4, METADATA_LIMIT)
    except NotGGUF as exc:
        raise BackendError(f"{path} is not a readable GGUF file ({exc})") from exc
    except OSError as exc:
        raise BackendError(f"can't read {path}: {exc.strerror or exc}") from exc


def read_file(path: Path, *, digest: str | None = None) -> ModelFacts:
    """Facts of the GGUF file at ``path``; ``BackendError`` naming the file when it is broken
    (its header, or tensor data that lies past the end of the file: a cut download)."""
    meta, tensors, data_start = read_header(path)
    if not meta.get("general.architecture"):
        raise BackendError(f"{path} is not a usable GGUF model: no general.architecture key")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BackendError(f"can't read {path}: {exc.strerror or exc}") from exc
    for t in tensors:
        if data_start + t.offset + t.n_bytes > size:
            raise BackendError(
                f"{path} is not a readable GGUF file (tensor {t.name!r}'s data lies past the "
                "end of the file: cut short?)"
            )
    facts = facts_from_metadata(
        meta,
        size=size,
        digest=digest,
        parameter_count=sum(t.n_elements for t in tensors) or None,
        weights_bytes=sum(t.n_bytes for t in tensors),
    )
    return dataclasses.replace(facts, cpu_repack_bytes=cpu_repack_bytes(tensors))
