"""The llama.cpp estimate: what a ``llama-server`` router child really holds.

Calibrated against a real ``llama-server`` by ``bench/accuracy.py`` (results in
``bench/RESULTS.md``): every model runs in its own router child process, so besides weights
and the f16 KV cache each one pays its compute buffer (see ``compute_bytes``) and a process
runtime (``RUNTIME_*``). The router's own flags win over the file (its children run at the
router's ``-c`` and ``-np`` whatever the file says): the estimate is of what will really run.
Pure; the planner's budget calls ``parts`` through the llama.cpp driver.
"""

from __future__ import annotations

from reconciler.backends.gguf.memory import kv_bytes, quantization
from reconciler.model import ModelFacts, ModelSpec

MiB = 1 << 20

UBATCH = 512
"""llama-server's default physical batch (``-ub``): the compute buffer is sized for it."""
BATCH = 2048
"""llama-server's default logical batch (``-b``), which caps the physical one."""
FF_PER_HIDDEN_UNKNOWN = 8
"""Feed-forward width over hidden size taken when the GGUF has no ``feed_forward_length``:
the widest dense models seen (Gemma 7B: 8; Qwen 2.5: up to 5.4; Llama 3: 3.5)."""
VOCAB_UNKNOWN = 262144
"""Vocabulary size taken when the GGUF's token list was not seen: the largest in use."""
# The CPU terms below were fitted (least squares) to 46 rows of bench/accuracy.py
# (bench/RESULTS.md, the CPU calibration: vocabularies 32k-256k, SPM and BPE, 1-4 slots, 256-16384
# cells), then rounded up so that no row is under: the fit's worst row was 1.6 MiB off.
RUNTIME_CPU = 17 * MiB
"""A llama-server child's own memory on CPU besides its buffers and its vocabulary: the static
binary's resident text, libc/libstdc++ and the HTTP server's threads (fitted: 15.2 MiB)."""
VOCAB_CPU = 128
"""Bytes per vocabulary token on CPU: the tokenizer's tables (token text, scores, the lookup
maps) and the metadata copy it is built from (fitted: 122)."""
MERGE_CPU = 104
"""Bytes per BPE merge rule on CPU: the tokenizer's rank map, a pair of strings per rule
(fitted: 98; Llama 3's 280k rules are 28 MiB)."""
SLOT_CPU = 0
"""Each server slot's own state on CPU besides its vocabulary-sized arrays (fitted: ~0). It was
256 KiB, a cushion per slot on top of the runtime's rounding: with the rows of files the real
``llama-quantize`` made (issue 17), a 2.9 MiB model at 4 slots came out 11 % over (its whole
footprint is ~31 MiB, and the cushions were 3.4 MiB of it). At the fitted value no row of the
103 CPU rows is under (the least margin is 1.0 MiB) and none is more than 8.6 % over."""
SLOT_VOCAB_CPU = 14
"""…plus, per slot and vocabulary token, its sampler's candidate arrays (with the 4-byte logit
of its one output: 16.3 fitted)."""
TOKEN_CPU = 768
"""Heap per KV cell on CPU while the slots serve full contexts (the prompts as requested,
tokenized and cached), for the first ``TOKEN_CPU_KNEE`` cells (fitted: 759)…"""
TOKEN_CPU_KNEE = 4096
TOKEN_CPU_TAIL = 256
"""…and per cell beyond them: the heap grows slower than the context (fitted: 141 over
4096-16384 cells; 256 keeps longer contexts, unmeasured here, on the safe side)."""
DOT_BYTES_CPU = 1.25
"""Bytes per activation that a quantized matrix product converts to its dot type first (Q8_0:
1.06, Q8_K: 1.14), in the CPU backend's work buffer: one micro-batch of the widest matrix's
input (fitted: 0.94 of it). F32 and F16 weights multiply without it."""
RUNTIME_GPU = 680 * MiB
"""A llama-server child's GPU memory besides its buffers: the CUDA context, the kernels the
driver loads for it and cuBLAS's handles (every child is a process of its own, so each model
pays it). Measured 622–689 MiB on an H200 (CUDA 13, driver 580; bench/RESULTS.md)."""
RUNTIME_GPU_PER_WEIGHT = 0.07
"""…plus this share of the weights: staging and scratch that grow with the tensors (the same
run: 686 MiB beside 192 MiB of weights, 689 MiB beside 959 MiB, 622 MiB beside 9 MiB). 6 % was
fitted while the compute term assumed a feed-forward 4 × hidden; with the GGUF's own (narrower)
width, CUDA's compute buffer, larger than the CPU's, left the 192 MiB model 0.7 MiB of margin:
7 % gives it 2.6 MiB (the rescore in bench/RESULTS.md)."""
CPU_REPACKED_PREFIXES = ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K", "Q5_K", "Q6_K", "Q8_0", "Q1_0")
"""Quantizations whose matrices llama.cpp's CPU backend repacks on some processor (x86 or
Arm; ``ggufmeta.CPU_REPACKED``), for facts without a tensor table."""
CUDA_FLASH_HEAD_DIMS = frozenset({64, 80, 96, 112, 128, 256, 576})
"""Head sizes llama.cpp's CUDA flash attention has kernels for; for others attention runs
unfused and its score matrix is a compute buffer of its own."""


def kv_cells(facts: ModelFacts, context: int, parallel: int) -> int:
    """KV cells llama.cpp allocates: one pool of ``context`` shared by the sequences when the
    cache is unified (llama-server's default ``-np`` auto), else ``context`` per sequence."""
    return context if facts.kv_unified else context * parallel


def _ubatch_tokens(facts: ModelFacts, cells: int) -> int:
    """Tokens in the micro-batch ggml sizes the compute buffer for: ``-ub`` (default 512),
    capped by ``-b`` and by the context (llama.cpp caps the batch at ``n_ctx``)."""
    return min(cells, facts.ubatch or UBATCH, BATCH)


def compute_bytes(facts: ModelFacts, context: int, parallel: int) -> int | None:
    """llama.cpp's compute buffer, sized by ggml for its largest graph: one micro-batch.

    A micro-batch is ``min(cells, 512)`` tokens. Per token it keeps ``3 × feed_forward + 5 ×
    hidden`` f32 activations alive at the peak (the feed-forward gate, up and product beside
    the residual stream and attention rows), plus the f16 attention mask over one sequence's
    ``context`` cells. The feed-forward width is the GGUF's ``feed_forward_length``
    (``FF_PER_HIDDEN_UNKNOWN`` × hidden without it). Checked against llama-server's
    logged "CPU compute buffer size" (bench/RESULTS.md).
    """
    if not facts.embedding_length:
        return None
    tokens = _ubatch_tokens(facts, kv_cells(facts, context, parallel))
    hidden = facts.embedding_length
    feed_forward = facts.feed_forward_length or FF_PER_HIDDEN_UNKNOWN * hidden
    return tokens * (3 * feed_forward + 5 * hidden) * 4 + context * tokens * 2


def _unfused_attention_bytes(facts: ModelFacts, context: int, parallel: int) -> int:
    """f32 attention scores of one micro-batch over every cell, when flash attention can't run
    on the GPU for this head size (the sizes it has kernels for cost nothing extra)."""
    if not (facts.embedding_length and facts.head_count):
        return 0
    head_dim = facts.key_length or facts.embedding_length // facts.head_count
    if head_dim in CUDA_FLASH_HEAD_DIMS:
        return 0
    cells = kv_cells(facts, context, parallel)
    return cells * _ubatch_tokens(facts, cells) * facts.head_count * 4


def runtime_cpu(facts: ModelFacts, context: int, parallel: int) -> int:
    """A child's host memory besides weights, KV cache and compute buffer: the process, the
    tokenizer (per vocabulary token and merge rule), the logits of one output per slot, each
    slot's state, the heap full-context requests leave (per KV cell), and the work buffer a
    quantized matrix product converts its input into."""
    vocab = facts.vocab_size or VOCAB_UNKNOWN
    merges = vocab if facts.vocab_merges is None else facts.vocab_merges  # unseen: one a token
    tokens = kv_cells(facts, context, parallel)  # the slots' prompts together fill the cells
    slots = parallel * (SLOT_CPU + vocab * SLOT_VOCAB_CPU)
    logits = parallel * vocab * 4
    tokenizer = vocab * VOCAB_CPU + merges * MERGE_CPU
    work = 0
    if (quantization(facts) or "").upper() not in ("F32", "F16", "BF16"):  # unknown: counted
        hidden = facts.embedding_length or 0
        widest = max(facts.feed_forward_length or FF_PER_HIDDEN_UNKNOWN * hidden, hidden)
        work = int(_ubatch_tokens(facts, tokens) * widest * DOT_BYTES_CPU)
    knee = TOKEN_CPU_KNEE
    heap = min(tokens, knee) * TOKEN_CPU + max(0, tokens - knee) * TOKEN_CPU_TAIL
    return RUNTIME_CPU + tokenizer + logits + slots + heap + work


def repack_bytes(facts: ModelFacts) -> int:
    """On CPU, the weights llama.cpp copies into its repacked layout (the mapped file stays
    resident beside them): read from the tensor table where the file is here; otherwise the
    whole file when its quantization is one some processor repacks (never under)."""
    if facts.cpu_repack_bytes is not None:
        return facts.cpu_repack_bytes
    kind = (quantization(facts) or "").upper()
    if kind.startswith(CPU_REPACKED_PREFIXES):
        return facts.size or facts.weights_bytes or 0
    return 0


def parts(
    facts: ModelFacts, context: int, parallel: int, *, accelerator: bool = True
) -> dict[str, int] | None:
    """The llama.cpp estimate's terms (weights, kv, compute, runtime); None without keys.

    The weights are the whole file: llama.cpp maps it, and the tokenizer's metadata is read
    from it besides the tensors (the tensor bytes alone are under by up to a few MiB).
    """
    weights = facts.size or facts.weights_bytes
    kv = kv_bytes(facts, kv_cells(facts, context, parallel))
    compute = compute_bytes(facts, context, parallel)
    if not weights or kv is None or compute is None:
        return None
    if accelerator:  # the slots' host memory is not the GPU's, nor the CPU's repacked copies
        runtime = RUNTIME_GPU + int(weights * RUNTIME_GPU_PER_WEIGHT)
        compute += _unfused_attention_bytes(facts, context, parallel)
        repack = 0
    else:
        runtime = runtime_cpu(facts, context, parallel)
        repack = repack_bytes(facts)
    return {"weights": weights, "repack": repack, "kv": kv, "compute": compute, "runtime": runtime}


def run_context(_spec: ModelSpec, facts: ModelFacts) -> int | None:
    """The router's ``-c`` (per slot): children run at it whatever the file says."""
    return facts.run_context


def default_context(facts: ModelFacts) -> int | None:
    """llama-server without ``-c`` allocates the trained context."""
    return facts.context_length
