"""The metadata key/values of a GGUF file, read from a prefix of its bytes.

Why not PyPI's ``gguf`` package: its ``GGUFReader`` takes a path, memory-maps the whole file
with numpy and builds the tensor table after the metadata, so it needs the complete file on
disk; a ranged read of a multi-GB registry blob gives us only the first few MiB. It also
materialises every value, tokenizer vocabularies included. This parser is pure (bytes in,
dict out), reads only GGUF v2/v3 little-endian metadata, keeps the keys it is asked for, and
walks over everything else (large arrays of tokens and merges) without building it.

Every walk is bounded: arrays nest at most ``MAX_ARRAY_DEPTH`` levels (llama.cpp itself loads
no array of arrays), so a crafted header can't exhaust the stack, and an unknown value type is
``NotGGUF``, never a crash.

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
MAX_ARRAY_DEPTH = 4
"""Arrays of arrays deeper than this are refused (``NotGGUF``): real files have none (llama.cpp
refuses even one level), and an unbounded depth would recurse until the stack runs out."""

# value type → struct format of one fixed-size element (strings and arrays are variable)
_FIXED: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9

WANTED_GENERAL = frozenset(
    {"general.architecture", "general.parameter_count", "general.file_type", "general.alignment"}
)
WANTED_ARCH = frozenset(
    {
        "block_count",
        "context_length",
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "feed_forward_length",
        "vocab_size",
    }
)
TOKENS = "tokenizer.ggml.tokens"
TOKEN_COUNT = TOKENS + ":count"
"""The vocabulary's size, kept under this key (``:`` is never in a GGUF key) from the length of
the token list, which is walked, not built: the runtime's tokenizer tables grow with it."""
MERGES = "tokenizer.ggml.merges"
MERGE_COUNT = MERGES + ":count"
"""The number of BPE merge rules, kept the same way (the tokenizer's rank map grows with it)."""
COUNTED = {TOKENS: TOKEN_COUNT, MERGES: MERGE_COUNT}
ESSENTIAL_ARCH = ("block_count", "embedding_length", "attention.head_count")


# llama_ftype → name, as gguf.LlamaFileType spells it less its MOSTLY_/ALL_ prefix (the same
# strings Ollama's details print). Retired values (4-6 Q4_1_SOME_F16/Q4_2/Q4_3, 33-35 the
# Q4_0_N_M repacks) and 1024 GUESSED have no name.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}


def file_type_name(file_type: int | None) -> str | None:
    """The quantization ``general.file_type`` stands for; None when unknown or absent."""
    if file_type is None:
        return None
    return FILE_TYPES.get(int(file_type))


# ggml_type → (name, values per block, bytes per block): a copy of gguf.GGML_QUANT_SIZES (the
# plan path needn't import numpy). Retired ids (4, 5, 31-33, 36-38) are unknown.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: its shape (ggml's ``ne`` order), type and data offset."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section

    @property
    def kind(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def n_elements(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    @property
    def n_bytes(self) -> int:
        _name, block, size = GGML_TYPES[self.type_id]
        return self.n_elements // block * size


class NotGGUF(ValueError):
    """The bytes do not start with a GGUF header this parser reads."""


class _Short(Exception):
    """The prefix ends inside the metadata."""


@dataclass
class Header:
    """What a prefix gave: the kept key/values, and whether all metadata was walked."""

    version: int = 0
    tensor_count: int = 0
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

    def skip_strings(self, count: int) -> None:
        """Walk over ``count`` strings (a 150k-token vocabulary in tens of milliseconds)."""
        data, pos, end = self.data, self.pos, len(self.data)
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise _Short
            pos += 8 + length(data, pos)[0]
            if pos > end:
                raise _Short
        self.pos = pos


def _value(cur: _Cursor, kind: int, keep: bool, depth: int = 0) -> Any:
    """Read (``keep``) or walk over one value of ``kind``; ``depth`` arrays enclose it."""
    if kind in _FIXED:
        fmt = _FIXED[kind]
        return cur.unpack(fmt) if keep else cur.take(struct.calcsize(fmt))
    if kind == STRING:
        return cur.string() if keep else cur.skip_string()
    if kind == ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise NotGGUF(
                f"arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {cur.pos}; "
                "not a GGUF file llama.cpp or Ollama could load"
            )
        elem, count = int(cur.unpack("<I")), int(cur.unpack("<Q"))
        keep = keep and count <= MAX_KEPT_ARRAY
        if elem in _FIXED and not keep:
            cur.take(struct.calcsize(_FIXED[elem]) * count)
            return None
        if keep:
            return [_value(cur, elem, True, depth + 1) for _ in range(count)]
        if elem == STRING:  # a vocabulary: the hot loop of a header walk
            cur.skip_strings(count)
            return None
        for _ in range(count):  # nested arrays (or an unknown type): walk, build nothing
            _value(cur, elem, False, depth + 1)
        return None
    raise NotGGUF(f"unknown GGUF value type {kind} at byte {cur.pos}")


def parse_header(data: bytes, wanted: Callable[[str], bool] = wanted_key) -> Header:
    """Parse the metadata in ``data`` (a prefix of a GGUF file).

    Raises ``NotGGUF`` for another magic, an unknown version or value type, or arrays nested
    deeper than ``MAX_ARRAY_DEPTH``; a prefix that ends inside the metadata gives
    ``complete=False`` with the pairs read so far. Tensor infos after the metadata are not read.
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
        out.tensor_count = int(cur.unpack("<Q"))
        out.kv_count = int(cur.unpack("<Q"))
        out.consumed = cur.pos
        seen: set[str] = set()
        for _ in range(out.kv_count):
            key = cur.string()
            if key in seen:  # llama.cpp refuses the file
                raise NotGGUF(f"duplicate key {key!r}")
            seen.add(key)
            kind = int(cur.unpack("<I"))
            keep = wanted(key)
            if key in COUNTED and kind == ARRAY and len(cur.data) >= cur.pos + 12:
                # the length (the vocabulary's size…) is known before the walk over it
                count = struct.unpack_from("<Q", cur.data, cur.pos + 4)[0]
                out.metadata[COUNTED[key]] = int(count)
            value = _value(cur, kind, keep)
            if keep:
                out.metadata[key] = value
            out.consumed = cur.pos
    except _Short:
        return out
    out.complete = True
    if TOKEN_COUNT in out.metadata:  # all of it was seen: no merge list means none (SPM)
        out.metadata.setdefault(MERGE_COUNT, 0)
    return out


def parse_tensor_infos(data: bytes, start: int, count: int) -> tuple[list[TensorInfo], int] | None:
    """The ``count`` tensor infos at ``start`` (where the metadata ended) and the offset just
    past them; None when ``data`` ends first (read more). ``NotGGUF`` for a type or shape no
    ggml build could load."""
    cur = _Cursor(data)
    cur.pos = start
    out: list[TensorInfo] = []
    names: set[str] = set()
    try:
        for _ in range(count):
            name = cur.string()
            if name in names:
                raise NotGGUF(f"duplicate tensor {name!r}")
            names.add(name)
            dims = int(cur.unpack("<I"))
            if not 1 <= dims <= MAX_DIMS:
                raise NotGGUF(f"tensor {name!r} has {dims} dimensions (at most {MAX_DIMS})")
            shape = tuple(int(cur.unpack("<Q")) for _ in range(dims))
            type_id = int(cur.unpack("<I"))
            offset = int(cur.unpack("<Q"))
            if type_id not in GGML_TYPES:
                raise NotGGUF(f"tensor {name!r} has an unknown type {type_id}")
            if shape[0] % GGML_TYPES[type_id][1]:
                raise NotGGUF(
                    f"tensor {name!r}'s rows are not whole {GGML_TYPES[type_id][0]} blocks"
                )
            out.append(TensorInfo(name, shape, type_id, offset))
    except _Short:
        return None
    return out, cur.pos
