"""VRAM and disk budget: per-model estimates with their source, and the fit rules.

Pure: the planner hands in what was observed. The estimate is layered, and the layer used is
reported so a fleet can see where estimates come from:

1. ``config``   – ``vram:`` in the file (the operator knows best);
2. ``measured`` – ``size_vram`` seen when the model was last loaded (state store);
3. ``metadata`` – weights + KV cache at the context the model runs at + compute buffers,
                  from GGUF keys (Ollama ``show`` ``model_info`` / the registry / the file);
4. ``rough``    – parameters × bytes per parameter for the quantization, flagged as rough.

The context is per sequence: the file's ``context``, else the one the backend runs the model
at (``ModelFacts.run_context``), else Ollama's default (llama.cpp's: the trained context). A
backend serving ``parallel`` sequences at once holds that many KV caches. For llama.cpp the
router's own flags win over the file (its children run at the router's ``-c`` and ``-np``
whatever the file says): the estimate is of what will really run.

llama.cpp (``backend: llamacpp``) gets its own metadata layer, calibrated against a real
``llama-server`` by ``bench/accuracy.py`` (results in ``bench/RESULTS.md``): every model runs
in its own router child process, so besides weights and the f16 KV cache each one pays its
compute buffer (see ``llamacpp_compute_bytes``) and a process runtime (``LLAMACPP_RUNTIME_*``).

Fit rules (contract §4.5): the pinned models together, plus ``reserve``, fit; every other model
fits alone with all pinned ones resident. Unpinned models that can't all be resident at once are
a warning: the backend swaps them. The VRAM they must fit in is the budget less what other
processes hold (``available_vram``). Each backend's downloads plus ``disk_reserve`` must fit
the free space where that backend stores models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.backends.gguf.header import file_type_name
from reconciler.model import (
    ENGINE_KINDS,
    BackendKind,
    Budget,
    BudgetSettings,
    DiskBudget,
    Estimate,
    GpuProcess,
    GpuState,
    ModelFacts,
    ModelSpec,
)

GiB = 1 << 30
MiB = 1 << 20
GRAPH_BYTES = 512 * MiB
"""Compute graph and batch buffers: Ollama's reference puts them at 0.3–2 GiB; 512 MiB covers
the default batch at contexts up to 8k for models up to ~14B."""

LLAMACPP_UBATCH = 512
"""llama-server's default physical batch (``-ub``): the compute buffer is sized for it."""
LLAMACPP_BATCH = 2048
"""llama-server's default logical batch (``-b``), which caps the physical one."""
LLAMACPP_FF_PER_HIDDEN_UNKNOWN = 8
"""Feed-forward width over hidden size taken when the GGUF has no ``feed_forward_length``:
the widest dense models seen (Gemma 7B: 8; Qwen 2.5: up to 5.4; Llama 3: 3.5)."""
LLAMACPP_VOCAB_UNKNOWN = 262144
"""Vocabulary size taken when the GGUF's token list was not seen: the largest in use."""
# The CPU terms below were fitted (least squares) to 46 rows of bench/accuracy.py
# (bench/RESULTS.md, issue 13: vocabularies 32k-256k, SPM and BPE, 1-4 slots, 256-16384
# cells), then rounded up so that no row is under: the fit's worst row was 1.6 MiB off.
LLAMACPP_RUNTIME_CPU = 17 * MiB
"""A llama-server child's own memory on CPU besides its buffers and its vocabulary: the static
binary's resident text, libc/libstdc++ and the HTTP server's threads (fitted: 15.2 MiB)."""
LLAMACPP_VOCAB_CPU = 128
"""Bytes per vocabulary token on CPU: the tokenizer's tables (token text, scores, the lookup
maps) and the metadata copy it is built from (fitted: 122)."""
LLAMACPP_MERGE_CPU = 104
"""Bytes per BPE merge rule on CPU: the tokenizer's rank map, a pair of strings per rule
(fitted: 98; Llama 3's 280k rules are 28 MiB)."""
LLAMACPP_SLOT_CPU = 256 * 1024
"""Each server slot's own state on CPU besides its vocabulary-sized arrays (fitted: ~0)."""
LLAMACPP_SLOT_VOCAB_CPU = 14
"""…plus, per slot and vocabulary token, its sampler's candidate arrays (with the 4-byte logit
of its one output: 16.3 fitted)."""
LLAMACPP_TOKEN_CPU = 768
"""Heap per KV cell on CPU while the slots serve full contexts (the prompts as requested,
tokenized and cached), for the first ``LLAMACPP_TOKEN_CPU_KNEE`` cells (fitted: 759)…"""
LLAMACPP_TOKEN_CPU_KNEE = 4096
LLAMACPP_TOKEN_CPU_TAIL = 256
"""…and per cell beyond them: the heap grows slower than the context (fitted: 141 over
4096-16384 cells; 256 keeps longer contexts, unmeasured here, on the safe side)."""
LLAMACPP_DOT_BYTES_CPU = 1.25
"""Bytes per activation that a quantized matrix product converts to its dot type first (Q8_0:
1.06, Q8_K: 1.14), in the CPU backend's work buffer: one micro-batch of the widest matrix's
input (fitted: 0.94 of it). F32 and F16 weights multiply without it."""
LLAMACPP_RUNTIME_GPU = 680 * MiB
"""A llama-server child's GPU memory besides its buffers: the CUDA context, the kernels the
driver loads for it and cuBLAS's handles (every child is a process of its own, so each model
pays it). Measured 622–689 MiB on an H200 (CUDA 13, driver 580; bench/RESULTS.md)."""
LLAMACPP_RUNTIME_GPU_PER_WEIGHT = 0.07
"""…plus this share of the weights: staging and scratch that grow with the tensors (the same
run: 686 MiB beside 192 MiB of weights, 689 MiB beside 959 MiB, 622 MiB beside 9 MiB). 6 % was
fitted while the compute term assumed a feed-forward 4 × hidden; with the GGUF's own (narrower)
width, CUDA's compute buffer, larger than the CPU's, left the 192 MiB model 0.7 MiB of margin:
7 % gives it 2.6 MiB (issue 13's rescore, bench/RESULTS.md)."""
CPU_REPACKED_PREFIXES = ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K", "Q5_K", "Q6_K", "Q8_0", "Q1_0")
"""Quantizations whose matrices llama.cpp's CPU backend repacks on some processor (x86 or
Arm; ``ggufmeta.CPU_REPACKED``), for facts without a tensor table."""
CUDA_FLASH_HEAD_DIMS = frozenset({64, 80, 96, 112, 128, 256, 576})
"""Head sizes llama.cpp's CUDA flash attention has kernels for; for others attention runs
unfused and its score matrix is a compute buffer of its own."""

BYTES_PER_PARAM = {
    "F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.07, "Q6_K": 0.82, "Q5_K_M": 0.71,
    "Q5_K_S": 0.69, "Q5_0": 0.69, "Q5_1": 0.75, "Q4_K_M": 0.61, "Q4_K_S": 0.57, "Q4_0": 0.56,
    "Q4_1": 0.62, "Q3_K_L": 0.54, "Q3_K_M": 0.49, "Q3_K_S": 0.44, "Q2_K": 0.41,
}  # fmt: skip
"""GGUF bytes per weight by file type (block scales included), for the rough layer."""


def default_context(vram_total: int | None, trained: int | None) -> int:
    """Ollama's automatic num_ctx (≥0.15.5): tiered by total VRAM, capped at the trained one."""
    ctx = 4096
    if vram_total is not None and vram_total >= 47 * GiB:
        ctx = 262144
    elif vram_total is not None and vram_total >= 23 * GiB:
        ctx = 32768
    return min(ctx, trained) if trained else ctx


def quantization(facts: ModelFacts) -> str | None:
    """The artifact's quantization: the backend's string, else the GGUF ``general.file_type``."""
    return facts.quantization or file_type_name(facts.file_type)


def run_context(spec: ModelSpec, facts: ModelFacts, vram_total: int | None) -> int:
    """Tokens per sequence the model runs at (see the module docstring)."""
    if spec.backend is BackendKind.LLAMACPP and facts.run_context:
        return facts.run_context  # the router's -c: children run at it whatever the file says
    if spec.context:
        return spec.context
    if facts.run_context:
        return facts.run_context
    if spec.backend is BackendKind.LLAMACPP and facts.context_length:
        return facts.context_length  # llama-server without -c allocates the trained context
    return default_context(vram_total, facts.context_length)


def kv_bytes(facts: ModelFacts, context: int) -> int | None:
    """f16 K and V for every layer at ``context`` tokens; None without the GGUF keys."""
    if not (facts.block_count and facts.head_count_kv):
        return None
    head_dim = None
    if facts.embedding_length and facts.head_count:
        head_dim = facts.embedding_length // facts.head_count
    k_len = facts.key_length or head_dim
    v_len = facts.value_length or head_dim
    if not (k_len and v_len):
        return None
    return facts.block_count * context * facts.head_count_kv * (k_len + v_len) * 2


def kv_cells(facts: ModelFacts, context: int, parallel: int) -> int:
    """KV cells llama.cpp allocates: one pool of ``context`` shared by the sequences when the
    cache is unified (llama-server's default ``-np`` auto), else ``context`` per sequence."""
    return context if facts.kv_unified else context * parallel


def _ubatch_tokens(facts: ModelFacts, cells: int) -> int:
    """Tokens in the micro-batch ggml sizes the compute buffer for: ``-ub`` (default 512),
    capped by ``-b`` and by the context (llama.cpp caps the batch at ``n_ctx``)."""
    return min(cells, facts.ubatch or LLAMACPP_UBATCH, LLAMACPP_BATCH)


def llamacpp_compute_bytes(facts: ModelFacts, context: int, parallel: int) -> int | None:
    """llama.cpp's compute buffer, sized by ggml for its largest graph: one micro-batch.

    A micro-batch is ``min(cells, 512)`` tokens. Per token it keeps ``3 × feed_forward + 5 ×
    hidden`` f32 activations alive at the peak (the feed-forward gate, up and product beside
    the residual stream and attention rows), plus the f16 attention mask over one sequence's
    ``context`` cells. The feed-forward width is the GGUF's ``feed_forward_length``
    (``LLAMACPP_FF_PER_HIDDEN_UNKNOWN`` × hidden without it). Checked against llama-server's
    logged "CPU compute buffer size" (bench/RESULTS.md).
    """
    if not facts.embedding_length:
        return None
    tokens = _ubatch_tokens(facts, kv_cells(facts, context, parallel))
    hidden = facts.embedding_length
    feed_forward = facts.feed_forward_length or LLAMACPP_FF_PER_HIDDEN_UNKNOWN * hidden
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


def llamacpp_runtime_cpu(facts: ModelFacts, context: int, parallel: int) -> int:
    """A child's host memory besides weights, KV cache and compute buffer: the process, the
    tokenizer (per vocabulary token and merge rule), the logits of one output per slot, each
    slot's state, the heap full-context requests leave (per KV cell), and the work buffer a
    quantized matrix product converts its input into."""
    vocab = facts.vocab_size or LLAMACPP_VOCAB_UNKNOWN
    merges = vocab if facts.vocab_merges is None else facts.vocab_merges  # unseen: one a token
    tokens = kv_cells(facts, context, parallel)  # the slots' prompts together fill the cells
    slots = parallel * (LLAMACPP_SLOT_CPU + vocab * LLAMACPP_SLOT_VOCAB_CPU)
    logits = parallel * vocab * 4
    tokenizer = vocab * LLAMACPP_VOCAB_CPU + merges * LLAMACPP_MERGE_CPU
    work = 0
    if (quantization(facts) or "").upper() not in ("F32", "F16", "BF16"):  # unknown: counted
        hidden = facts.embedding_length or 0
        widest = max(facts.feed_forward_length or LLAMACPP_FF_PER_HIDDEN_UNKNOWN * hidden, hidden)
        work = int(_ubatch_tokens(facts, tokens) * widest * LLAMACPP_DOT_BYTES_CPU)
    knee = LLAMACPP_TOKEN_CPU_KNEE
    heap = min(tokens, knee) * LLAMACPP_TOKEN_CPU + max(0, tokens - knee) * LLAMACPP_TOKEN_CPU_TAIL
    return LLAMACPP_RUNTIME_CPU + tokenizer + logits + slots + heap + work


def llamacpp_repack_bytes(facts: ModelFacts) -> int:
    """On CPU, the weights llama.cpp copies into its repacked layout (the mapped file stays
    resident beside them): read from the tensor table where the file is here; otherwise the
    whole file when its quantization is one some processor repacks (never under)."""
    if facts.cpu_repack_bytes is not None:
        return facts.cpu_repack_bytes
    kind = (quantization(facts) or "").upper()
    if kind.startswith(CPU_REPACKED_PREFIXES):
        return facts.size or facts.weights_bytes or 0
    return 0


def llamacpp_parts(
    facts: ModelFacts, context: int, parallel: int, *, accelerator: bool = True
) -> dict[str, int] | None:
    """The llama.cpp estimate's terms (weights, kv, compute, runtime); None without keys.

    The weights are the whole file: llama.cpp maps it, and the tokenizer's metadata is read
    from it besides the tensors (the tensor bytes alone are under by up to a few MiB).
    """
    weights = facts.size or facts.weights_bytes
    kv = kv_bytes(facts, kv_cells(facts, context, parallel))
    compute = llamacpp_compute_bytes(facts, context, parallel)
    if not weights or kv is None or compute is None:
        return None
    if accelerator:  # the slots' host memory is not the GPU's, nor the CPU's repacked copies
        runtime = LLAMACPP_RUNTIME_GPU + int(weights * LLAMACPP_RUNTIME_GPU_PER_WEIGHT)
        compute += _unfused_attention_bytes(facts, context, parallel)
        repack = 0
    else:
        runtime = llamacpp_runtime_cpu(facts, context, parallel)
        repack = llamacpp_repack_bytes(facts)
    return {"weights": weights, "repack": repack, "kv": kv, "compute": compute, "runtime": runtime}


def estimate(
    spec: ModelSpec,
    facts: ModelFacts | None,
    measured: int | None,
    vram_total: int | None,
    *,
    accelerator: bool = True,
    engine_share: float = 0.9,
) -> Estimate:
    """The model's VRAM need and which layer gave it, with what the model's metadata says
    (``estimated_bytes``) and what was measured beside it, so a fleet can see estimates drift.

    ``accelerator`` is False on a CPU-only node, where a llama.cpp child has no CUDA context.
    An engine (vLLM, SGLang, MAX) pre-allocates ``engine_share`` of the total VRAM whatever
    the model needs, and holds it while it runs: it counts that claim, resident like a pinned
    model (``vram:`` in the file still wins).
    """
    if spec.backend in ENGINE_KINDS:
        if spec.vram is not None:
            return Estimate(spec.name, spec.vram, "config", True)
        claim = int(vram_total * engine_share) if vram_total else None
        return Estimate(spec.name, claim, "claim", True)
    source, computed = _computed(spec, facts, vram_total, accelerator=accelerator)
    if spec.vram is not None:
        return Estimate(spec.name, spec.vram, "config", spec.pinned, computed, measured)
    if measured:
        return Estimate(spec.name, measured, "measured", spec.pinned, computed, measured)
    return Estimate(spec.name, computed, source, spec.pinned, computed, None)


def _computed(
    spec: ModelSpec, facts: ModelFacts | None, vram_total: int | None, *, accelerator: bool
) -> tuple[str, int | None]:
    """The metadata or rough layer: ``(source, bytes)``."""
    if facts is None:
        return "unknown", None
    weights = facts.weights_bytes or facts.size
    ctx = run_context(spec, facts, vram_total)
    parallel = max(1, facts.parallel or 1)
    if spec.backend is BackendKind.LLAMACPP:
        parts = llamacpp_parts(facts, ctx, parallel, accelerator=accelerator)
        if parts is not None:
            return "metadata", sum(parts.values())
    else:
        kv = kv_bytes(facts, ctx)
        if weights and kv is not None:
            return "metadata", weights + kv * parallel + GRAPH_BYTES
    per_param = BYTES_PER_PARAM.get((quantization(facts) or "").upper())
    if facts.parameter_count and per_param:
        weights = weights or int(facts.parameter_count * per_param)
    if weights:
        # Without the GGUF keys the KV cache is unknown; a quarter of the weights covers
        # 4k–8k contexts for dense models of every size we have seen.
        return "rough", int(weights * 1.25) + GRAPH_BYTES
    return "unknown", None


@dataclass(frozen=True)
class Fit:
    """The budget figures plus the refusals (errors) and advice (warnings) they imply."""

    budget: Budget
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    unfit: frozenset[str]  # model names that can't be served within the budget


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def unexplained_bytes(gpu: GpuState, backend_loaded: int) -> int:
    """Unattributed GPU memory that the backends' loaded models do not account for.

    Memory no process could be named for may be a backend's own (a container in another PID
    namespace): the part of what the backends report loaded that no visible backend process
    holds explains up to that much of it.
    """
    hidden_backend = max(0, backend_loaded - gpu.backend_bytes)
    return max(0, gpu.unattributed_bytes - hidden_backend)


def available_vram(gpu: GpuState, backend_loaded: int) -> int | None:
    """The VRAM the fit uses: the budget's base less memory other processes hold.

    With NVML, the GPUs' total less foreign and unexplained memory, capped at ``budget.vram``
    when the file sets it; without NVML nothing is known about other processes.
    """
    total = gpu.total_bytes
    if total is None or not gpu.gpus:
        return total
    physical = sum(g.total_bytes for g in gpu.gpus)
    left = max(0, physical - gpu.foreign_bytes - unexplained_bytes(gpu, backend_loaded))
    return min(total, left)


def describe_foreign(foreign: Sequence[GpuProcess], total: int) -> str:
    """``other processes 12.0 GiB (python 12.0 GiB, pid 4242)``."""
    shown = ", ".join(f"{p.name} {_gib(p.bytes)}, pid {p.pid}" for p in foreign[:3])
    more = f", {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return f"other processes {_gib(total)}" + (f" ({shown}{more})" if shown else "")


def _held(gpu: GpuState, unexplained: int) -> str:
    """Why the available VRAM is less than the GPUs have, for refusals."""
    parts = []
    if gpu.foreign_bytes:
        parts.append(describe_foreign(gpu.foreign_processes, gpu.foreign_bytes))
    if unexplained:
        parts.append(f"{_gib(unexplained)} used by no process infernet can identify")
    return "; ".join(parts)


def check(
    estimates: list[Estimate],
    *,
    gpu: GpuState,
    settings: BudgetSettings,
    disks: Sequence[DiskBudget] = (),
    backend_loaded: int = 0,
) -> Fit:
    """Apply the fit rules to the estimates; refusals name models and numbers in GiB.

    ``disks`` has one entry per backend with downloads (the default backend's first);
    ``backend_loaded`` is the VRAM the backends report their loaded models use.
    """
    errors: list[str] = []
    warnings: list[str] = []
    unfit: set[str] = set()
    base = gpu.total_bytes
    total = available_vram(gpu, backend_loaded)
    unexplained = unexplained_bytes(gpu, backend_loaded) if gpu.gpus else 0
    held = _held(gpu, unexplained) if total is not None and base is not None else ""
    budget_text = f"VRAM budget {_gib(total)}"
    if held and total is not None and base is not None and total < base:
        physical = sum(g.total_bytes for g in gpu.gpus)
        budget_text += f" ({_gib(physical)} of GPU memory less {held})"
    reserve = settings.reserve
    pinned = [e for e in estimates if e.pinned and e.bytes is not None]
    pinned_sum = sum(e.bytes or 0 for e in pinned)
    others = [e for e in estimates if not e.pinned and e.bytes is not None]
    largest = max((e.bytes or 0 for e in others), default=0)
    for e in estimates:
        if e.bytes is None:
            warnings.append(f"{e.model}: no size information anywhere; not counted in the budget")
    if total is None:
        warnings.append("VRAM budget unknown (no GPU found, no budget.vram): fit not checked")
    else:
        if gpu.source == "config" and gpu.gpus and base is not None:
            real = sum(g.total_bytes for g in gpu.gpus)
            if base > real:
                warnings.append(
                    f"budget.vram {_gib(base)} is more than the GPUs have ({_gib(real)})"
                )
        if pinned and pinned_sum + reserve > total:
            names = ", ".join(f"{e.model} {_gib(e.bytes)}" for e in pinned)
            errors.append(
                f"pinned models need {_gib(pinned_sum)} + reserve {_gib(reserve)} = "
                f"{_gib(pinned_sum + reserve)}, more than the {budget_text} "
                f"({names}); unpin or drop one, or raise budget.vram"
                + ("" if not held else ", or stop the other processes")
            )
            unfit.update(e.model for e in pinned)
        for e in others:
            need = pinned_sum + (e.bytes or 0) + reserve
            if need > total:
                errors.append(
                    f"{e.model} needs {_gib(e.bytes)} ({e.source}) with the pinned models "
                    f"({_gib(pinned_sum)}) and reserve ({_gib(reserve)}) resident: "
                    f"{_gib(need)} > {budget_text}; pick a smaller quantization "
                    "or unpin something" + ("" if not held else ", or stop the other processes")
                )
                unfit.add(e.model)
        everything = pinned_sum + sum(e.bytes or 0 for e in others) + reserve
        if not errors and len(others) > 1 and everything > total:
            warnings.append(
                f"the unpinned models can't all be loaded at once ({_gib(everything)} > "
                f"{_gib(total)}); the backend will swap them"
            )
    for disk in disks:
        if disk.free_bytes is None:
            if disk.download_bytes:
                warnings.append(
                    f"{disk.backend.value}: free space at {disk.path} unknown; its downloads "
                    f"({_gib(disk.download_bytes)}) are not checked against the disk"
                )
            continue
        if disk.download_bytes + settings.disk_reserve > disk.free_bytes:
            errors.append(
                f"{disk.backend.value} downloads need {_gib(disk.download_bytes)} + "
                f"disk_reserve {_gib(settings.disk_reserve)} but only {_gib(disk.free_bytes)} "
                f"is free at {disk.path}; free space there or lower budget.disk_reserve"
            )
    first = disks[0] if disks else None
    budget = Budget(
        vram_total_bytes=base, vram_source=gpu.source, reserve_bytes=reserve,
        vram_pinned_bytes=pinned_sum, largest_swap_in_bytes=largest, fits=not errors,
        disk_free_bytes=first.free_bytes if first else None,
        disk_reserve_bytes=settings.disk_reserve,
        download_bytes=sum(d.download_bytes for d in disks), estimates=tuple(estimates),
        vram_available_bytes=total, foreign_bytes=gpu.foreign_bytes,
        unattributed_bytes=unexplained, foreign_processes=gpu.foreign_processes, disks=tuple(disks),
    )  # fmt: skip
    return Fit(budget, tuple(errors), tuple(warnings), frozenset(unfit))
