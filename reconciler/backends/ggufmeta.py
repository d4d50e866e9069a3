"""A GGUF file's facts for the VRAM estimate: from its metadata keys and tensor table.

Local files are read with the ``gguf`` package (llama.cpp's own reader, which memory-maps the
file, so only the header pages are touched); remote prefixes are parsed by
``reconciler.gguf_header``. Both end up as the same ``ModelFacts``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconciler.errors import BackendError
from reconciler.gguf_header import file_type_name
from reconciler.model import ModelFacts


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
    return ModelFacts(
        digest=digest, size=size, weights_bytes=weights_bytes or size,
        quantization=file_type_name(file_type), parameter_count=count if count else None,
        family=arch or None, format="gguf", context_length=num("context_length"),
        block_count=num("block_count"), head_count=num("attention.head_count"),
        head_count_kv=num("attention.head_count_kv"), embedding_length=num("embedding_length"),
        key_length=num("attention.key_length"), value_length=num("attention.value_length"),
        file_type=file_type,
    )  # fmt: skip


def _value(field: Any) -> Any:
    """A reader field as a plain value; long arrays (vocabularies) are not materialised."""
    if len(field.data) > 64:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_file(path: Path, *, digest: str | None = None) -> ModelFacts:
    """Facts of the GGUF file at ``path``; ``BackendError`` naming the file when it is broken."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        meta = {name: _value(field) for name, field in reader.fields.items()}
        params = sum(int(t.n_elements) for t in reader.tensors)
        weights = sum(int(t.n_bytes) for t in reader.tensors)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise BackendError(f"{path} is not a readable GGUF file ({exc})") from exc
    if not meta.get("general.architecture"):
        raise BackendError(f"{path} is not a usable GGUF model: no general.architecture key")
    size = path.stat().st_size
    return facts_from_metadata(
        meta, size=size, digest=digest, parameter_count=params or None, weights_bytes=weights
    )
