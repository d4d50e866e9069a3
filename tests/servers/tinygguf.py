"""Tiny random-weight llama GGUF files that llama.cpp really loads (no download).

    python -m tests.servers.tinygguf OUT.gguf --name tiny-a [--hidden 64 --layers 2 --ff 128
        --heads 4 --kv-heads 2 --context 256 --f16 --seed 0 --file-type 15]
    python -m tests.servers.tinygguf OUT.gguf --corrupt garbage|truncated

The recipe is ``../../../shared/reference/llamacpp-router.md`` §2: architecture ``llama``,
N(0, 0.02) weights from a seeded RNG with norm weights of 1, no ``output.weight`` (llama.cpp
ties the head to ``token_embd``), and a 259-token SentencePiece-style vocabulary (``<unk>``,
``<s>``, ``</s>``, ``<0x00>`` … ``<0xFF>``) with token types, so any text tokenizes through
byte fallback and byte tokens detokenize to bytes. With the defaults a file is 370,176 bytes
and llama-server reports ``meta.size`` 362,496 and ``n_params`` 90,624.

Files are written under a temporary name that does not end in ``.gguf`` and renamed into
place, so a router's ``?reload=1`` never lists a half-written model (reference P5).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

VOCAB_SIZE = 259
_SPECIAL = ("<unk>", "<s>", "</s>")
_NORM_EPS = 1e-5
GGUF_MAGIC = b"GGUF"

CorruptKind = Literal["garbage", "truncated", "nested"]


def _shape(hidden: int, ff: int | None, heads: int, kv_heads: int | None) -> tuple[int, int, int]:
    """(ff, kv_heads, head_dim) with the defaults filled in, or ValueError."""
    ff = 2 * hidden if ff is None else ff
    # Half the query heads by default, so head_count_kv ≠ head_count is exercised (GQA).
    kv_heads = max(1, heads // 2) if kv_heads is None else kv_heads
    if hidden <= 0 or ff <= 0 or heads <= 0 or kv_heads <= 0:
        raise ValueError("hidden, ff, heads and kv_heads must be positive")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return ff, kv_heads, hidden // heads


def _tensor_shapes(
    hidden: int, layers: int, ff: int, kv_dim: int
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and numpy shapes ``(rows, cols)``; the GGUF ne order is reversed."""
    yield "token_embd.weight", (VOCAB_SIZE, hidden)
    yield "output_norm.weight", (hidden,)
    for i in range(layers):
        yield f"blk.{i}.attn_norm.weight", (hidden,)
        yield f"blk.{i}.attn_q.weight", (hidden, hidden)
        yield f"blk.{i}.attn_k.weight", (kv_dim, hidden)
        yield f"blk.{i}.attn_v.weight", (kv_dim, hidden)
        yield f"blk.{i}.attn_output.weight", (hidden, hidden)
        yield f"blk.{i}.ffn_norm.weight", (hidden,)
        yield f"blk.{i}.ffn_gate.weight", (ff, hidden)
        yield f"blk.{i}.ffn_up.weight", (ff, hidden)
        yield f"blk.{i}.ffn_down.weight", (hidden, ff)


def param_count(
    *,
    hidden: int = 64,
    layers: int = 2,
    ff: int | None = None,
    heads: int = 4,
    kv_heads: int | None = None,
) -> int:
    """What llama-server reports as ``meta.n_params`` for these dimensions."""
    ff, kv_heads, head_dim = _shape(hidden, ff, heads, kv_heads)
    total = 0
    for _, shape in _tensor_shapes(hidden, layers, ff, kv_heads * head_dim):
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def _partial_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def _replace_atomically(tmp: Path, path: Path) -> int:
    size = tmp.stat().st_size
    tmp.replace(path)
    return size


def write_tiny_gguf(
    path: Path | str,
    *,
    name: str,
    hidden: int = 64,
    layers: int = 2,
    ff: int | None = None,
    heads: int = 4,
    kv_heads: int | None = None,
    context: int = 256,
    f16: bool = False,
    seed: int = 0,
    file_type: int | None = None,
) -> int:
    """Write a loadable llama GGUF to ``path`` atomically; returns the bytes written.

    ``ff`` defaults to ``2 * hidden`` and ``kv_heads`` to ``heads // 2``. ``f16`` stores the
    matrices as F16 (norms stay F32). ``file_type`` is written as ``general.file_type``
    (default: 1 with ``f16``, else 0); a different value makes the file claim a quantization
    its tensors don't have, which llama.cpp believes, as it does for real files.
    """
    import numpy as np
    from gguf import GGUFWriter, TokenType

    ff, kv_heads, head_dim = _shape(hidden, ff, heads, kv_heads)
    if layers <= 0 or context <= 0:
        raise ValueError("layers and context must be positive")
    path = Path(path)
    rng = np.random.default_rng(seed)
    matrix_type = np.float16 if f16 else np.float32

    tokens = [*_SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * 256

    tmp = _partial_name(path)
    writer = GGUFWriter(tmp, "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(file_type if file_type is not None else int(f16))
        writer.add_context_length(context)
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(ff)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_layer_norm_rms_eps(_NORM_EPS)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(VOCAB_SIZE)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * VOCAB_SIZE)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        for tensor_name, shape in _tensor_shapes(hidden, layers, ff, kv_heads * head_dim):
            data: Any
            if len(shape) == 1:
                data = np.ones(shape, dtype=np.float32)
            else:
                data = rng.normal(0.0, 0.02, size=shape).astype(matrix_type)
            writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    return _replace_atomically(tmp, path)


def corrupt_gguf(
    path: Path | str,
    *,
    kind: CorruptKind = "garbage",
    size: int = 4096,
    source: Path | str | None = None,
    seed: int = 0,
) -> int:
    """Write a file llama.cpp lists but cannot load; returns the bytes written.

    ``garbage``: the ``GGUF`` magic followed by ``size - 4`` random bytes (the header fails to
    parse). ``truncated``: the first half of ``source`` (default: a fresh tiny model), so the
    header parses but tensor data lies past the end of the file. ``nested``: a well-formed
    GGUF v3 header whose second key holds arrays nested ``size`` deep (an attacker's header:
    a recursive reader runs out of stack), before any model key.
    """
    path = Path(path)
    if kind == "garbage":
        data = GGUF_MAGIC + random_bytes(max(size - len(GGUF_MAGIC), 0), seed)
    elif kind == "nested":
        data = nested_gguf(size)
    elif kind == "truncated":
        if source is None:
            whole = _partial_name(path)
            try:
                write_tiny_gguf(whole, name=path.stem, seed=seed)
                data = whole.read_bytes()
            finally:
                whole.unlink(missing_ok=True)
        else:
            data = Path(source).read_bytes()
        data = data[: len(data) // 2]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    tmp = _partial_name(path)
    tmp.write_bytes(data)
    return _replace_atomically(tmp, path)


def nested_gguf(depth: int) -> bytes:
    """A GGUF v3 file (no tensors): ``general.architecture = llama``, then ``general.deep``,
    an array holding an array … ``depth`` levels down."""
    import struct

    def text(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw

    array, string, uint32 = 9, 8, 4
    nested = struct.pack("<IQ", array, 1) * (depth - 1) + struct.pack("<IQ", uint32, 0)
    arch = text("general.architecture") + struct.pack("<I", string) + text("llama")
    deep = text("general.deep") + struct.pack("<I", array) + nested
    return GGUF_MAGIC + struct.pack("<IQQ", 3, 0, 2) + arch + deep


def random_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.servers.tinygguf", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--name", help="general.name (default: the file name without .gguf)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff", type=int)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--f16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file-type", type=int)
    parser.add_argument("--corrupt", choices=["garbage", "truncated", "nested"])
    args = parser.parse_args(argv)
    try:
        if args.corrupt:
            written = corrupt_gguf(args.out, kind=args.corrupt, seed=args.seed)
        else:
            written = write_tiny_gguf(
                args.out,
                name=args.name or args.out.name.removesuffix(".gguf"),
                hidden=args.hidden,
                layers=args.layers,
                ff=args.ff,
                heads=args.heads,
                kv_heads=args.kv_heads,
                context=args.context,
                f16=args.f16,
                seed=args.seed,
                file_type=args.file_type,
            )
    except (ValueError, OSError) as exc:
        print(f"tinygguf: {exc}", file=sys.stderr)
        return 1
    print(f"{os.fspath(args.out)} {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
