"""The metadata key/values of a GGUF file, read from a prefix of its bytes.

Why not PyPI's ``gguf`` package: its ``GGUFReader`` takes a path, memory-maps the whole file
with numpy and builds the tensor table after the metadata, so it needs the complete file on
disk; a ranged read of a multi-GB registry blob gives us only the first few MiB. It also
materialises every value, tokenizer vocabularies included. This parser is pure (bytes in,
dict out), reads only GGUF v2/v3 little-endian metadata, keeps the keys it is asked for, and
walks over everything else (large arrays of tokens and merges) without building it.

``file_type_name`` turns ``general.file_type`` (llama.cpp's ``llama_ftype``) into the
quantization name Ollama and the file use (``Q4_K_M``), for headers without a quantization
string; the table is a copy of ``gguf.LlamaFileType`` so the plan path needn't import numpy.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_KEPT_ARRAY = 4096  # a wanted array longer than this is skipped, not built

# value type → struct format of one fixed-size element (strings and arrays are variable)
_FIXED: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
STRING, ARRAY = 8, 9

WANTED_GENERAL = frozenset({"general.architecture", "general.parameter_count", "general.file_type"})
WANTED_ARCH = frozenset(
    {
        "block_count",
        "context_length",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
    }
)
ESSENTIAL_ARCH = ("block_count", "embedding_length", "attention.head_count")


# llama_ftype → name, as gguf.LlamaFileType spells it less its MOSTLY_/ALL_ prefix (the same
# strings Ollama's details print). Retired values (4-6 Q4_1_SOME_F16/Q4_2/Q4_3, 33-35 the
# Q4_0_N_M repacks) and 1024 GUESSED have no name.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip


def file_type_name(file_type: int | None) -> str | None:
    """The quantization ``general.file_type`` stands for; None when unknown or absent."""
    if file_type is None:
        return None
    return FILE_TYPES.get(int(file_type))


class NotGGUF(ValueError):
    """The bytes do not start with a GGUF header this parser reads."""


class _Short(Exception):
    """The prefix ends inside the metadata."""


@dataclass
class Header:
    """What a prefix gave: the kept key/values, and whether all metadata was walked."""

    version: int = 0
    kv_count: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    complete: bool = False
    consumed: int = 0  # bytes up to the end of the last whole key/value pair


def wanted_key(key: str) -> bool:
    """The keys the VRAM estimate needs (``<arch>.…`` for any architecture)."""
    if key in WANTED_GENERAL:
        return True
    _arch, _, rest = key.partition(".")
    return rest in WANTED_ARCH


def has_essentials(metadata: dict[str, Any]) -> bool:
    """Whether the kept keys are enough for a KV-cache estimate."""
    arch = metadata.get("general.architecture")
    return isinstance(arch, str) and all(f"{arch}.{k}" in metadata for k in ESSENTIAL_ARCH)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise _Short
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(int(self.unpack("<Q")))).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.take(int(self.unpack("<Q")))


def _value(cur: _Cursor, kind: int, keep: bool) -> Any:
    """Read (``keep``) or walk over one value of ``kind``."""
    if kind in _FIXED:
        fmt = _FIXED[kind]
        return cur.unpack(fmt) if keep else cur.take(struct.calcsize(fmt))
    if kind == STRING:
        return cur.string() if keep else cur.skip_string()
    if kind == ARRAY:
        elem, count = int(cur.unpack("<I")), int(cur.unpack("<Q"))
        keep = keep and count <= MAX_KEPT_ARRAY
        if elem in _FIXED and not keep:
            cur.take(struct.calcsize(_FIXED[elem]) * count)
            return None
        if keep:
            return [_value(cur, elem, True) for _ in range(count)]
        for _ in range(count):  # strings or nested arrays: walk, build nothing
            _value(cur, elem, False)
        return None
    raise NotGGUF(f"unknown GGUF value type {kind} at byte {cur.pos}")


def parse_header(data: bytes, wanted: Callable[[str], bool] = wanted_key) -> Header:
    """Parse the metadata in ``data`` (a prefix of a GGUF file).

    Raises ``NotGGUF`` for another magic, an unknown version or value type; a prefix that
    ends inside the metadata gives ``complete=False`` with the pairs read so far. Tensor
    infos after the metadata are not read.
    """
    if len(data) >= 4 and bytes(data[:4]) != MAGIC:
        raise NotGGUF(f"not a GGUF file (magic {bytes(data[:4])!r})")
    out = Header()
    cur = _Cursor(data)
    try:
        cur.take(4)
        out.version = int(cur.unpack("<I"))
        if out.version not in VERSIONS:
            raise NotGGUF(f"GGUF version {out.version} is not supported (only 2 and 3)")
        cur.unpack("<Q")  # tensor_count
        out.kv_count = int(cur.unpack("<Q"))
        out.consumed = cur.pos
        for _ in range(out.kv_count):
            key = cur.string()
            kind = int(cur.unpack("<I"))
            keep = wanted(key)
            value = _value(cur, kind, keep)
            if keep:
                out.metadata[key] = value
            out.consumed = cur.pos
    except _Short:
        return out
    out.complete = True
    return out
