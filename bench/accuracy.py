"""Benchmark: the llama.cpp memory estimate against a real ``llama-server`` (not a test).

Writes random-weight llama-architecture GGUF files of several shapes with the ``gguf`` package
(``SHAPES``: vocabularies of 32k-256k tokens, SentencePiece or byte-level BPE with its merges;
grouped-query, full and single-KV-head attention; feed-forward 2.5-6 x hidden; F32, F16, Q8_0,
Q6_K and Q4_K_M, the quantized ones as random blocks with small scales, since only their sizes
and kernels matter here), starts a real ``llama-server`` in router mode for each (context,
parallel) pair of ``MATRIX`` (``-c context×parallel -np parallel``: each slot serves
``context`` tokens; parallel 0 leaves ``-np`` out: llama-server's default, 4 slots sharing one
unified pool of ``-c`` cells), and for each router:

* runs ``infernet plan --json`` against it, as a user would (a file listing the models, the
  router's URL, a fresh state folder), and keeps each model's ``estimated_bytes``;
* loads every model through ``POST /models/load``, waits for ``GET /models`` to say
  ``loaded``, sends one multi-prompt completion that fills every slot's whole context (so the
  compute buffer, the attention mask and each slot are really used, as serving uses them), and
  measures the router's child for that model (found by ``--alias <id>`` in its command line):
  on CPU its peak resident set (``VmHWM``; RSS and USS go into the JSON too), with ``--gpu``
  on an NVIDIA GPU (children run with ``-ngl 999``) NVML's per-process used GPU memory.

A row passes when both the plan's figure and ``budget.estimate`` (on the facts ``ggufmeta``
reads from the file, run as the router's arguments say) are within +0..10 % of the
measurement, never below it. The buffer sizes llama.cpp logs (model, CPU_REPACK, KV cache,
compute) are printed beside them to explain the terms; the estimate never reads them.

    .venv/bin/python -m bench.accuracy [--gpu] [--json-out FILE] [--threads N]
        [--models tiny,l3-f16 --contexts 512,2048 --parallel 1,2,0]   # else MATRIX
    .venv/bin/python -m bench.accuracy --quantized [--gpu] [--json-out FILE]  # QUANT_MATRIX
    .venv/bin/python -m bench.accuracy --rescore bench/results/accuracy_gpu_h200.json

``--quantized`` (issue 17) measures real quantized files instead: the F32/F16 models above made
Q8_0, Q5_K_M and Q4_K_M by the real ``llama-quantize``, built from the same llama.cpp source as
the server (``python -m tests.servers.llamabuild --quantize``); each row records the matrix types
llama-quantize wrote and the fallbacks it logged (K-quants need rows a multiple of 256 wide).

The binary is ``tests/servers/llamabuild.py``'s ``build()`` (``INFERNET_LLAMA_SERVER``
overrides). ``LLAMA_CACHE`` is set to an empty temporary folder, so the router lists only the
models written here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/accuracy.py
    sys.path.insert(0, str(ROOT))

from reconciler.backends.gguf import meta as ggufmeta  # noqa: E402
from reconciler.backends.llamacpp import estimate as llamacpp_estimate  # noqa: E402
from reconciler.backends.llamacpp.router import AUTO_PARALLEL, run_settings  # noqa: E402
from reconciler.model import BackendKind, ModelFacts, ModelSpec  # noqa: E402
from reconciler.planning import budget  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TRAINED_CONTEXT = 16384


@dataclasses.dataclass(frozen=True)
class Shape:
    """A llama-architecture model to write: sizes, weight type and tokenizer."""

    hidden: int
    layers: int
    ff: int
    heads: int
    kv_heads: int
    vocab: int
    f16: bool = False  # the first run's spelling of dtype F16 (kept: recorded rows name it)
    dtype: str = ""  # F32 | F16 | Q8_0 | Q6_K | Q4_K_M; "" = F16 or F32 by ``f16``
    tokenizer: str = "spm"  # spm (SentencePiece, Llama 2) | bpe (byte-level, Llama 3, Qwen)
    merges: int = 0  # BPE merge rules (real ones: about one per token)
    pre: str = "llama-bpe"  # tokenizer.ggml.pre for BPE

    @property
    def weights(self) -> str:
        return self.dtype or ("F16" if self.f16 else "F32")


SHAPES: dict[str, Shape] = {
    # the first run's three (2026-11-27): one family, Llama 2's 32k vocabulary, GQA
    # the reference's tiny model (64 wide, F32), with Llama 2's vocabulary size like the others
    "tiny": Shape(hidden=64, layers=2, ff=256, heads=4, kv_heads=2, vocab=32000, f16=False),
    # about 100M parameters, F16 (GPT-2-small-like widths, grouped-query attention)
    "m100": Shape(hidden=768, layers=12, ff=2048, heads=12, kv_heads=4, vocab=32000, f16=True),
    # about 500M parameters, F16
    "m500": Shape(hidden=1536, layers=18, ff=4096, heads=12, kv_heads=4, vocab=32000, f16=True),
    # issue 13's widening: vocabularies 32k-256k (SPM and BPE with merges), no GQA and a single
    # KV head, feed-forward 2.5x-6x, F32/F16/Q8_0/Q6_K/Q4_K_M
    "nogqa-f32": Shape(hidden=256, layers=4, ff=640, heads=4, kv_heads=4, vocab=32000),
    "l3-f16": Shape(
        hidden=512,
        layers=8,
        ff=1792,
        heads=8,
        kv_heads=2,
        vocab=128256,
        dtype="F16",
        tokenizer="bpe",
        merges=280147,
    ),
    "qw-q8": Shape(
        hidden=896,
        layers=4,
        ff=4864,
        heads=14,
        kv_heads=2,
        vocab=151936,
        dtype="Q8_0",
        tokenizer="bpe",
        merges=151387,
        pre="qwen2",
    ),
    "mqa-q4km": Shape(
        hidden=768,
        layers=6,
        ff=4608,
        heads=12,
        kv_heads=1,
        vocab=49152,
        dtype="Q4_K_M",
        tokenizer="bpe",
        merges=48900,
    ),
    "g256-q6k": Shape(
        hidden=512, layers=4, ff=2048, heads=4, kv_heads=4, vocab=256000, dtype="Q6_K"
    ),
}

MATRIX: dict[tuple[int, int], tuple[str, ...]] = {
    # (context per slot, -np; 0 = llama-server's default auto: 4 slots, one unified KV pool)
    (512, 1): ("tiny", "m100", "nogqa-f32", "l3-f16", "qw-q8", "mqa-q4km", "g256-q6k"),
    (2048, 2): ("tiny", "m100", "nogqa-f32", "l3-f16", "qw-q8", "mqa-q4km", "g256-q6k"),
    (1024, 4): ("tiny", "m100", "nogqa-f32", "l3-f16", "qw-q8", "mqa-q4km", "g256-q6k"),
    (4096, 1): ("tiny", "nogqa-f32", "l3-f16", "mqa-q4km"),
    (4096, 0): ("nogqa-f32", "l3-f16", "qw-q8"),
    (8192, 2): ("tiny", "l3-f16", "mqa-q4km"),
}
"""The widened run's rows: every model at 1, 2 and 4 slots, some at longer contexts (up to
16384 cells) and under llama-server's default slots."""

QUANT_TYPES = {"Q8_0": "q8", "Q5_K_M": "q5km", "Q4_K_M": "q4km"}
"""What issue 17 quantizes to with the real ``llama-quantize``, and the name suffix."""
QUANT_SOURCES = ("tiny", "m100", "nogqa-f32", "l3-f16")
"""The F32/F16 models written here that are quantized: 64, 768, 256 and 512 wide. K-quants
need rows a multiple of 256 wide, so ``tiny`` (64) and ``nogqa-f32``'s ``ffn_down`` (640) fall
back to 32-block types (llama-quantize's log says which; the rows record it)."""
QUANTIZED: dict[str, tuple[str, str]] = {
    f"{source}-{suffix}": (source, kind)
    for source in QUANT_SOURCES
    for kind, suffix in QUANT_TYPES.items()
}
"""Quantized model name → (the F32/F16 model it is made from, llama-quantize's type)."""

QUANT_MATRIX: dict[tuple[int, int], tuple[str, ...]] = {
    (512, 1): tuple(QUANTIZED),
    (2048, 2): tuple(QUANTIZED),
    (1024, 4): tuple(QUANTIZED),
    (4096, 0): tuple(QUANTIZED),
    (8192, 2): tuple(n for n in QUANTIZED if n.startswith(("m100-", "l3-f16-"))),
}
"""``--quantized``: the quantized rows (issue 17), at 1, 2 and 4 slots, under llama-server's
default slots (one unified pool) and at 8192 tokens a slot."""


def shape_of(name: str) -> Shape:
    """A written model's shape, or a quantized one's: its source's, with the target type."""
    if name in QUANTIZED:
        source, kind = QUANTIZED[name]
        return dataclasses.replace(SHAPES[source], dtype=kind, f16=False)
    return SHAPES[name]


# --------------------------------------------------------------------------- GGUF files


def _tokens(vocab: int) -> tuple[list[str], list[int]]:
    """``<unk> <s> </s>``, the 256 byte tokens, then plain filler tokens up to ``vocab``."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types += [1] * (vocab - len(types))  # NORMAL
    return tokens, types


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 byte tokens of a BPE vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _bpe_tokens(vocab: int, merges: int) -> tuple[list[str], list[int], list[str]]:
    """Byte tokens, ``Ġ``-words as filler, two control tokens last; merge rules of short
    pieces (they are what the tokenizer's rank map is built from)."""
    tokens = _byte_chars()
    tokens += [f"\u0120w{i}" for i in range(vocab - len(tokens) - 2)]
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [1] * (vocab - 2) + [3, 3]
    rules = [f"\u0120w{i % 5000} {i // 5000}x" for i in range(merges)]
    return tokens, types, rules


_BLOCKS = {  # weights per block, bytes per block, (offset, f16 scale) pairs, int8 scale range
    "Q8_0": (32, 34, ((0, 5e-4),), None),
    "Q4_K": (256, 144, ((0, 1e-4), (2, 1e-4)), None),
    "Q6_K": (256, 210, ((208, 1e-4),), (192, 208)),
}


def _quantized(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random blocks of a quantized type with small, finite scales: the sizes and kernels of
    a real file of that type (this measures memory, not quality), without a quantizer."""
    per, size, scales, int8 = _BLOCKS[kind]
    if cols % per:
        raise ValueError(f"{kind} rows must be a multiple of {per} wide, not {cols}")
    data = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for offset, value in scales:
        data[:, :, offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    if int8 is not None:  # Q6_K's signed sub-block scales: kept small
        lo, hi = int8
        data[:, :, lo:hi] = (
            rng.integers(-16, 17, size=(rows, cols // per, hi - lo)).astype(np.int8).view(np.uint8)
        )
    return data.reshape(rows, cols // per * size)


_FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def _matrix_type(shape: Shape, tensor: str, layer: int) -> str:
    """The type of one matrix: the file's, except that Q4_K_M keeps the embedding (the head
    too, tied) and a few layers' attn_v and ffn_down at Q6_K, as llama-quantize does."""
    kind = shape.weights
    if kind != "Q4_K_M":
        return kind
    n = shape.layers
    more_bits = layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2
    if tensor == "token_embd" or (tensor in ("attn_v", "ffn_down") and more_bits):
        return "Q6_K"
    return "Q4_K"


def write_model(path: Path, name: str, shape: Shape, seed: int = 0) -> int:
    """Write a random-weight llama GGUF at ``path``; returns its parameter count."""
    import gguf

    rng = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".partial")  # the router must never list half a file
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(name)
    writer.add_context_length(TRAINED_CONTEXT)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_file_type(_FILE_TYPE[shape.weights])
    if shape.tokenizer == "bpe":
        tokens, types, merges = _bpe_tokens(shape.vocab, shape.merges)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(shape.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(shape.vocab - 2)
        writer.add_eos_token_id(shape.vocab - 1)
    else:
        tokens, types = _tokens(shape.vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores([0.0] * shape.vocab)
    params = 0

    def add(tensor_name: str, rows: int, cols: int | None = None, layer: int = 0) -> None:
        nonlocal params
        if cols is None:  # norms stay F32 with weight 1, as converted models have them
            writer.add_tensor(tensor_name, np.ones(rows, dtype=np.float32))
            params += rows
            return
        params += rows * cols
        kind = _matrix_type(shape, tensor_name.split(".")[-2], layer)
        if kind in ("F32", "F16"):
            dtype = np.float16 if kind == "F16" else np.float32
            data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)
            writer.add_tensor(tensor_name, data)
        else:
            raw = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(tensor_name, _quantized(rng, rows, cols, kind), raw_dtype=raw)

    kv = shape.hidden // shape.heads * shape.kv_heads
    add("token_embd.weight", shape.vocab, shape.hidden)  # no output.weight: tied head
    add("output_norm.weight", shape.hidden)
    for i in range(shape.layers):
        add(f"blk.{i}.attn_norm.weight", shape.hidden)
        add(f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden, i)
        add(f"blk.{i}.attn_k.weight", kv, shape.hidden, i)
        add(f"blk.{i}.attn_v.weight", kv, shape.hidden, i)
        add(f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden, i)
        add(f"blk.{i}.ffn_norm.weight", shape.hidden)
        add(f"blk.{i}.ffn_gate.weight", shape.ff, shape.hidden, i)
        add(f"blk.{i}.ffn_up.weight", shape.ff, shape.hidden, i)
        add(f"blk.{i}.ffn_down.weight", shape.hidden, shape.ff, i)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return params


def ensure_models(folder: Path, names: list[str]) -> dict[str, int]:
    """The models in ``folder`` (written once; a sidecar remembers the shape they were made
    with, so a changed shape rewrites the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    params: dict[str, int] = {}
    for name in names:
        path, meta = folder / f"{name}.gguf", folder / f"{name}.json"
        want = dataclasses.asdict(SHAPES[name]) | {"trained": TRAINED_CONTEXT}
        if path.exists() and meta.exists():
            saved = json.loads(meta.read_text())
            if saved.get("shape") == want:
                params[name] = int(saved["params"])
                continue
        started = time.monotonic()
        params[name] = write_model(path, name, SHAPES[name])
        meta.write_text(json.dumps({"shape": want, "params": params[name]}))
        took = time.monotonic() - started
        print(
            f"wrote {path.name}: {params[name]:,} parameters, "
            f"{path.stat().st_size / MiB:.1f} MiB in {took:.1f} s",
            flush=True,
        )
    return params


_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<cols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<want>\S+)\).*?falling back to\s+(?P<got>\S+)"
)


def _quantize_report(log: str, path: Path) -> dict[str, Any]:
    """What llama-quantize really did: each fallback it logged, and the types of the file it
    wrote (matrix name → type counts, read from the tensor table, not assumed)."""
    _meta, tensors, _start = ggufmeta.read_header(path)
    types: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            types[t.kind] = types.get(t.kind, 0) + 1
    fallbacks = [
        f"{m['tensor']}: {m['cols']} cols, {m['want']} -> {m['got']}"
        for m in _FALLBACK.finditer(log)
    ]
    embd = next((t.kind for t in tensors if t.name == "token_embd.weight"), None)
    return {
        "matrix_types": dict(sorted(types.items())),
        "token_embd": embd,
        "fallbacks": fallbacks,
    }


def ensure_quantized(
    folder: Path, names: list[str], binary: Path, threads: int
) -> dict[str, tuple[int, dict[str, Any]]]:
    """The quantized models in ``folder``, made from their F32/F16 sources with the real
    ``llama-quantize`` (once; a sidecar remembers the source's shape and the type, so a
    changed source is quantized again): name → (parameters, what llama-quantize did)."""
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    sources = ensure_models(folder, sorted({QUANTIZED[n][0] for n in names}))
    for name in names:
        source, kind = QUANTIZED[name]
        path, meta = folder / f"{name}.gguf", folder / f"{name}.json"
        want = {
            "source": source,
            "type": kind,
            "shape": json.loads((folder / f"{source}.json").read_text())["shape"],
            "quantizer": binary.name,
        }
        if path.exists() and meta.exists():
            saved = json.loads(meta.read_text())
            if saved.get("made") == want:
                out[name] = (int(saved["params"]), saved["quantize"])
                continue
        partial = folder / f"{name}.partial"  # not *.gguf: the router never lists half a file
        started = time.monotonic()
        done = subprocess.run(
            [str(binary), str(folder / f"{source}.gguf"), str(partial), kind, str(threads)],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        log = done.stdout + done.stderr
        if done.returncode != 0:
            tail = "\n".join(log.splitlines()[-15:])
            raise RuntimeError(f"llama-quantize {source} {kind} exited {done.returncode}:\n{tail}")
        (folder / f"{name}.quantize.log").write_text(log)
        report = _quantize_report(log, partial)
        partial.replace(path)
        out[name] = (sources[source], report)
        meta.write_text(
            json.dumps({"made": want, "params": sources[source], "quantize": report}, indent=1)
        )
        took = time.monotonic() - started
        falls = len(report["fallbacks"])
        print(
            f"quantized {source} to {kind}: {path.name}, {path.stat().st_size / MiB:.1f} MiB in "
            f"{took:.1f} s; matrices {report['matrix_types']}, {falls} fallbacks",
            flush=True,
        )
    return out


def router_args(context: int, parallel: int) -> list[str]:
    """The router's ``-c``/``-np`` for ``context`` tokens per slot and ``parallel`` slots.

    llama-server's ``-c`` is the total over its ``-np`` slots (each slot gets ``-c / -np``), so
    a backend serving ``context`` tokens to each of ``parallel`` requests runs ``-c
    context×parallel``. ``parallel`` 0 leaves ``-np`` out: llama-server's default, four slots
    sharing one unified pool of ``-c`` cells (each slot may use all of it).
    """
    if parallel == 0:
        return ["-c", str(context)]
    return ["-c", str(context * parallel), "-np", str(parallel)]


def facts_from_gguf(path: Path, *, context: int, parallel: int) -> ModelFacts:
    """What the planner knows: the file read as ``infernet`` reads it (``ggufmeta``), run
    the way the router's arguments say (``llamacpp.run_settings``)."""
    facts = ggufmeta.read_file(path)
    return dataclasses.replace(
        facts, **run_settings(router_args(context, parallel), facts.context_length)
    )


def rescore(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded measurements against today's estimate: the formula is a pure function of the
    model's metadata (rebuilt from its shape and recorded file bytes), so a run on a lent GPU
    can be scored again after the estimate changes without the GPU."""
    out = []
    for row in rows:
        shape = shape_of(row["model"])
        size = int(row.get("file_bytes") or row["estimate_parts"]["weights"])
        facts = ModelFacts(
            size=size,
            weights_bytes=size,
            family="llama",
            format="gguf",
            parameter_count=row["params"],
            block_count=shape.layers,
            head_count=shape.heads,
            head_count_kv=shape.kv_heads,
            embedding_length=shape.hidden,
            context_length=TRAINED_CONTEXT,
            vocab_size=shape.vocab,
            vocab_merges=shape.merges,
            feed_forward_length=shape.ff,
            file_type=_FILE_TYPE[shape.weights],
            cpu_repack_bytes=int(row.get("cpu_repack_bytes") or 0),
        )
        run = run_settings(router_args(row["context"], row["parallel"]), TRAINED_CONTEXT)
        facts = dataclasses.replace(facts, **run)
        spec = ModelSpec(row["model"], BackendKind.LLAMACPP, row["model"], row["model"])
        on_gpu = row["device"] == "gpu"
        est = budget.estimate(spec, facts, None, None, accelerator=on_gpu).bytes or 0
        parts = _parts(facts, accelerator=on_gpu)
        measured = row["measured_bytes"]
        ratio = est / measured if measured else float("nan")
        residual = measured - sum(v for k, v in parts.items() if k != "runtime")
        out.append(
            {
                **row,
                "estimate_bytes": est,
                "estimate_parts": parts,
                "ratio": round(ratio, 4),
                "ok": _ok(measured, est),
                "residual_bytes": residual,
            }
        )
    return out


def _parts(facts: ModelFacts, *, accelerator: bool) -> dict[str, int]:
    context, parallel = facts.run_context or 0, facts.parallel or 1
    return llamacpp_estimate.parts(facts, context, parallel, accelerator=accelerator) or {}


def _ok(measured: int, estimate: int | None) -> bool:
    """The pass rule: never under the measurement, at most 10 % over."""
    return bool(measured > 0 and estimate and 1.0 <= estimate / measured <= 1.10)


# --------------------------------------------------------------------------- llama-server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Router:
    """A running router, its HTTP client and its log file."""

    proc: subprocess.Popen[bytes]
    url: str
    http: httpx.Client
    log: Path

    def status(self, model: str) -> dict[str, Any]:
        for entry in self.http.get(f"{self.url}/models").json()["data"]:
            if entry["id"] == model:
                status: dict[str, Any] = entry["status"]
                return status
        raise RuntimeError(f"{model} is not listed by the router")

    def wait(self, model: str, want: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(model)
            if status.get("failed"):
                raise RuntimeError(
                    f"{model} failed to load (exit {status.get('exit_code')}); see {self.log}"
                )
            if status["value"] == want:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"{model} not {want} after {timeout:.0f} s; see {self.log}")


@contextlib.contextmanager
def router(
    binary: Path, models: Path, log: Path, *, context: int, parallel: int, gpu: bool, threads: int
) -> Iterator[Router]:
    """A router whose children run ``context`` tokens per sequence, ``parallel`` sequences
    (``router_args``; 0 = llama-server's default slots)."""
    port = _free_port()
    args = [
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models-dir",
        str(models),
        "--models-max",
        "1",
        *router_args(context, parallel),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--no-warmup",
        "--cache-ram",
        "0",
        "--no-webui",
        "-lv",
        "4",
        "--fit",
        "off",
        *(["-ngl", "999"] if gpu else ["-ngl", "0"]),
    ]
    cache = tempfile.mkdtemp(prefix="llama-cache-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env["LLAMA_CACHE"] = cache
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    http = httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready after 30 s; see {log}")
            time.sleep(0.05)
        yield Router(proc, url, http, log)
    finally:
        http.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(cache, ignore_errors=True)


def find_child(router_pid: int, alias: str) -> psutil.Process:
    """The router's child serving ``alias`` (child PIDs are not in the API)."""
    for child in psutil.Process(router_pid).children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if any(a == "--alias" and b == alias for a, b in itertools.pairwise(cmd)):
                return child
    raise RuntimeError(f"no child of router {router_pid} has --alias {alias}")


_BUFFER = re.compile(
    r"(?P<dev>[A-Za-z0-9_]+)\s+(?P<what>model|KV|compute|output) buffer size\s*=\s*"
    r"(?P<mib>[0-9.]+) MiB"
)


def logged_buffers(log: Path, port: int) -> dict[str, float]:
    """The buffer sizes (MiB) the child on ``port`` logged: ``what/device`` → MiB."""
    found: dict[str, float] = {}
    prefix = f"[{port}]"
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith(prefix):
            continue
        match = _BUFFER.search(line)
        if match:
            key = f"{match['what']}/{match['dev']}"
            found[key] = found.get(key, 0.0) + float(match["mib"])
    return found


# --------------------------------------------------------------------------- measuring


class GpuMeter:
    """NVML's per-process used GPU memory (all GPUs, summed)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
        ]
        self.total = sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).total) for h in self.handles)

    def used_by(self, pid: int) -> int | None:
        total, seen = 0, False
        for handle in self.handles:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
                    seen = True
        return total if seen else None


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def measure_cpu(child: psutil.Process) -> dict[str, int]:
    info = child.memory_full_info()
    return {"rss": int(info.rss), "uss": int(info.uss), "hwm": _status_kib(child.pid, "VmHWM")}


def _exercise(rt: Router, model: str, tokens: int, parallel: int) -> None:
    """One completion per slot over ``tokens`` byte tokens each, sent as one multi-prompt
    request so the server starts them together and their prompts share micro-batches: the
    compute buffer, every slot and its context are then really used."""
    prompts = [
        [1] + [3 + (i * 7 + seq * 13) % 256 for i in range(tokens - 1)]  # BOS, byte tokens
        for seq in range(parallel)
    ]  # (byte tokens of SPM vocabularies; of BPE ones, the byte-level alphabet)
    body = {"model": model, "prompt": prompts, "n_predict": 1, "cache_prompt": False}
    rt.http.post(f"{rt.url}/completion", json=body).raise_for_status()


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a model under one router's context and parallel settings."""

    name: str
    params: int
    context: int
    parallel: int  # 0 = llama-server's default (auto: 4 slots, one unified KV pool)

    @property
    def slots(self) -> int:
        return AUTO_PARALLEL if self.parallel == 0 else self.parallel

    def prompt_tokens(self, cap: int) -> int:
        """Tokens per slot that fill the context: each slot's own cells, or a share of the
        unified pool (the slots then fill it together)."""
        room = self.context // AUTO_PARALLEL if self.parallel == 0 else self.context
        return room - 8 if cap <= 0 else min(room - 8, cap)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every row shares."""

    models_dir: Path
    meter: GpuMeter | None
    prompt_tokens: int
    work: Path


def matrix(args: argparse.Namespace) -> dict[tuple[int, int], tuple[str, ...]]:
    """The rows to measure: ``MATRIX`` (``QUANT_MATRIX`` with ``--quantized``), or the cross
    product the options name."""
    if not (args.models or args.contexts or args.parallel):
        return QUANT_MATRIX if args.quantized else MATRIX
    every = QUANTIZED if args.quantized else SHAPES
    names = tuple((args.models or ",".join(every)).split(","))
    contexts = [int(c) for c in (args.contexts or "512,2048").split(",")]
    slots = [int(p) for p in (args.parallel or "1,2").split(",")]
    return {(c, n): names for n in slots for c in contexts}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tests.servers import llamabuild

    binary = llamabuild.build()
    work = Path(args.workdir)
    setup = Setup(work / "models", GpuMeter() if args.gpu else None, args.prompt_tokens, work)
    groups = matrix(args)
    wanted = sorted({name for names in groups.values() for name in names})
    params = ensure_models(setup.models_dir, [n for n in wanted if n in SHAPES])
    quantized = [n for n in wanted if n in QUANTIZED]
    made: dict[str, tuple[int, dict[str, Any]]] = {}
    if quantized:
        quantizer = llamabuild.build(llamabuild.QUANTIZE)
        made = ensure_quantized(setup.models_dir, quantized, quantizer, args.threads)
        params |= {name: count for name, (count, _report) in made.items()}
    rows: list[dict[str, Any]] = []
    for (context, parallel), names in groups.items():
        log = work / f"router-c{context}-np{parallel}.log"
        with router(
            binary,
            setup.models_dir,
            log,
            context=context,
            parallel=parallel,
            gpu=args.gpu,
            threads=args.threads,
        ) as rt:
            planned = plan_estimates(rt, setup, names, f"c{context}-np{parallel}")
            for name in names:
                case = Case(name, params[name], context, parallel)
                row = _row(rt, case, setup)
                row |= _scored_plan(planned.get(f"{name}.gguf"), row["measured_bytes"])
                if name in made:
                    row["quantized_from"] = QUANTIZED[name][0]
                    row["quantize"] = made[name][1]
                rows.append(row)
                print(
                    f"  {name} ctx {context} np {parallel}: plan {_mib(row['plan_bytes'])} "
                    f"library {_mib(row['estimate_bytes'])} measured "
                    f"{_mib(row['measured_bytes'])} MiB",
                    flush=True,
                )
    return rows


def plan_estimates(
    rt: Router, setup: Setup, names: tuple[str, ...], tag: str
) -> dict[str, dict[str, Any]]:
    """``infernet plan --json`` against this router, the way a user runs it: a file listing
    the models (already in the folder), the router's URL, a fresh state folder; the plan's
    budget estimates by model name."""
    folder = setup.work / f"plan-{tag}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    served = "\n".join(f"  - {{name: {n}.gguf, backend: llamacpp}}" for n in names)
    config = folder / "infernet.yaml"
    config.write_text(
        f"version: 1\nserved_models:\n{served}\n"
        f"backends:\n  llamacpp: {{models_dir: {setup.models_dir}, url: {rt.url}}}\n"
        "budget: {vram: 1000GiB, reserve: 0}\npolicy: {prune: none}\n"
    )
    cli = Path(sys.executable).with_name("infernet")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "reconciler.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNET_")}
    done = subprocess.run(
        [*command, "plan", "--json", "-c", str(config), "--state-dir", str(folder / "state")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if done.returncode not in (0, 2):
        raise RuntimeError(f"infernet plan exited {done.returncode}: {done.stderr.strip()}")
    doc = json.loads(done.stdout)
    return {e["model"]: e for e in doc["budget"]["estimates"]}


def _scored_plan(entry: dict[str, Any] | None, measured: int) -> dict[str, Any]:
    """The plan's figure for a row: what the metadata says (``estimated_bytes``; nothing was
    measured in a fresh state folder) and its ratio to the measurement."""
    if entry is None:
        return {"plan_bytes": None, "plan_source": None, "plan_ratio": None, "plan_ok": False}
    got = entry.get("estimated_bytes")
    return {
        "plan_bytes": got,
        "plan_source": entry.get("source"),
        "plan_ratio": round(got / measured, 4) if got and measured else None,
        "plan_ok": _ok(measured, got),
    }


def _row(rt: Router, case: Case, setup: Setup) -> dict[str, Any]:
    name, context, parallel, meter = case.name, case.context, case.parallel, setup.meter
    rt.http.post(f"{rt.url}/models/load", json={"model": name}).raise_for_status()
    status = rt.wait(name, "loaded")
    child = find_child(rt.proc.pid, name)
    cmd = status.get("args", [])
    port = int(cmd[cmd.index("--port") + 1])
    at_load = measure_cpu(child)
    gpu_at_load = meter.used_by(child.pid) if meter else None
    tokens = case.prompt_tokens(setup.prompt_tokens)
    started = time.monotonic()
    _exercise(rt, name, tokens, case.slots)
    took = time.monotonic() - started
    served = measure_cpu(child)
    gpu_served = meter.used_by(child.pid) if meter else None
    buffers = logged_buffers(rt.log, port)
    rt.http.post(f"{rt.url}/models/unload", json={"model": name}).raise_for_status()
    rt.wait(name, "unloaded")
    path = setup.models_dir / f"{name}.gguf"
    facts = facts_from_gguf(path, context=context, parallel=parallel)
    spec = ModelSpec(name, BackendKind.LLAMACPP, name, name)
    on_gpu = meter is not None
    est = budget.estimate(spec, facts, None, meter.total if meter else None, accelerator=on_gpu)
    parts = _parts(facts, accelerator=on_gpu)
    if meter is not None:
        measured = max(gpu_at_load or 0, gpu_served or 0)
    else:
        measured = max(served["hwm"], served["rss"])
    estimate = est.bytes or 0
    ratio = estimate / measured if measured else float("nan")
    # what the runtime term would have to be for this row alone: measured less the buffers
    residual = measured - sum(v for k, v in parts.items() if k != "runtime")
    shape = shape_of(name)
    return {
        "model": name,
        "params": case.params,
        "context": context,
        "parallel": parallel,
        "weights": shape.weights,
        "vocab": shape.vocab,
        "tokenizer": shape.tokenizer,
        "ff_ratio": round(shape.ff / shape.hidden, 2),
        "kv_heads": shape.kv_heads,
        "heads": shape.heads,
        "file_bytes": path.stat().st_size,
        "cpu_repack_bytes": facts.cpu_repack_bytes,
        "device": "gpu" if meter else "cpu",
        "prompt_tokens": tokens,
        "request_s": round(took, 2),
        "estimate_bytes": estimate,
        "estimate_source": est.source,
        "estimate_parts": parts,
        "measured_bytes": measured,
        "ratio": round(ratio, 4),
        "ok": _ok(measured, estimate),
        "residual_bytes": residual,
        "cpu_at_load": at_load,
        "cpu_served": served,
        "gpu_at_load": gpu_at_load,
        "gpu_served": gpu_served,
        "logged_mib": buffers,
    }


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = [
        "model",
        "weights",
        "vocab",
        "ff/h",
        "kv/heads",
        "params",
        "ctx",
        "par",
        "plan MiB",
        "library MiB",
        "measured MiB",
        "plan ratio",
        "ratio",
        "ok",
        "runtime est/left MiB",
        "logged model/KV/compute MiB",
    ]
    lines = [head]
    for r in rows:
        logged = r["logged_mib"]
        model = sum(v for k, v in logged.items() if k.startswith("model/"))
        kv = sum(v for k, v in logged.items() if k.startswith("KV/"))
        compute = sum(v for k, v in logged.items() if k.startswith("compute/"))
        shape = shape_of(r["model"])
        plan_ratio = r.get("plan_ratio")
        ok = r["ok"] and r.get("plan_ok", True)
        lines.append(
            [
                r["model"],
                shape.weights,
                f"{shape.vocab // 1000}k",
                f"{shape.ff / shape.hidden:.2f}",
                f"{shape.kv_heads}/{shape.heads}",
                f"{r['params'] / 1e6:.1f}M",
                str(r["context"]),
                str(r["parallel"]) if r["parallel"] else "auto",
                _mib(r.get("plan_bytes")),
                _mib(r["estimate_bytes"]),
                _mib(r["measured_bytes"]),
                "-" if plan_ratio is None else f"{plan_ratio:.3f}",
                f"{r['ratio']:.3f}",
                "yes" if ok else "no",
                f"{_mib(r['estimate_parts'].get('runtime'))}/{_mib(r['residual_bytes'])}",
                f"{model:.1f}/{kv:.1f}/{compute:.1f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def _passed(rows: list[dict[str, Any]]) -> int:
    """Rows where the library's estimate and (when run) the plan's both pass."""
    return sum(1 for r in rows if r["ok"] and r.get("plan_ok", True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="offload to the NVIDIA GPU, use NVML")
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="the F32/F16 models quantized with the real llama-quantize (QUANT_MATRIX)",
    )
    parser.add_argument("--models", help="comma-separated SHAPES (default: MATRIX's rows)")
    parser.add_argument("--contexts", help="tokens per slot, e.g. 512,2048")
    parser.add_argument("--parallel", help="slots, e.g. 1,2,4 (0 = llama-server's default)")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="prompt length of the exercising request; 0 = fill the sequence's "
        "context (the attention mask is then resident on CPU too)",
    )
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "accuracy"))
    parser.add_argument("--json-out", help="write the rows and the machine as JSON here")
    parser.add_argument(
        "--rescore",
        metavar="JSON",
        help="score the measurements of an earlier --json-out run against the current "
        "estimate (no llama-server, no GPU needed)",
    )
    args = parser.parse_args(argv)
    if args.rescore:
        recorded = json.loads(Path(args.rescore).read_text())
        rows = rescore(recorded["rows"])
        print(f"recorded on {recorded.get('device') or recorded.get('machine')}")
        print_table(rows)
        good = sum(1 for r in rows if r["ok"])
        print(
            f"{good}/{len(rows)} rows within +0..10 % of the measurement (library call; "
            "the recorded plan figures are not rescored)"
        )
        return 0 if good == len(rows) else 1
    if args.gpu:
        try:
            GpuMeter()
        except Exception as exc:  # no driver, no pynvml: nothing to measure against
            print(f"accuracy --gpu: NVML unavailable ({type(exc).__name__}: {exc}); skipped")
            return 0
    started = time.monotonic()
    rows = run(args)
    print_table(rows)
    passed = _passed(rows)
    print(
        f"{passed}/{len(rows)} rows within +0..10 % of the measurement, by `infernet plan "
        f"--json` and by budget.estimate ({time.monotonic() - started:.0f} s)"
    )
    measured = [r for r in rows if r["measured_bytes"]]
    if measured:  # for recalibrating: what the runtime term had to cover, row by row
        left = [r["residual_bytes"] / MiB for r in measured]
        now = sorted({r["estimate_parts"].get("runtime", 0) / MiB for r in measured})
        print(
            f"measured less weights, KV and compute: {min(left):.1f}..{max(left):.1f} MiB "
            f"(runtime term now {', '.join(f'{n:.1f}' for n in now)} MiB)"
        )
    if args.json_out:
        doc = {
            "machine": {
                "node": platform.node(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            },
            "device": "gpu" if args.gpu else "cpu",
            "rows": rows,
        }
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
