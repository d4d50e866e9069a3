"""VRAM and disk budget: per-model estimates with their source, and the fit rules.

Pure: the planner hands in what was observed. The estimate is layered, and the layer used is
reported so a fleet can see where estimates come from:

1. ``config``   – ``vram:`` in the file (the operator knows best);
2. ``measured`` – ``size_vram`` seen when the model was last loaded (state store);
3. ``metadata`` – weights + KV cache at the context the model runs at + compute buffers,
                  from GGUF keys (Ollama ``show`` ``model_info`` / the registry / the file);
4. ``rough``    – parameters × bytes per parameter for the quantization, flagged as rough.

The context is per sequence: the file's ``context``, else the one the backend runs the model
at (``ModelFacts.run_context``), else Ollama's default (or the backend's own, from its driver).
A backend serving ``parallel`` sequences at once holds that many KV caches. A backend whose
driver says it runs a model at its own context (llama.cpp's router flags) wins over the file:
the estimate is of what will really run.

The metadata layer keeps its parts (``EstimateParts``: weights, KV cache, runtime) beside the
bytes-per-parameter rule of thumb, for ``plan -v`` and for refusals that are mostly KV cache,
which say so and suggest a ``context:`` that fits (``kv_advice``).

A driver may bring its own metadata layer (``Driver.estimate_parts``: llama.cpp's, calibrated
against a real ``llama-server`` in ``reconciler.backends.llamacpp.estimate``); an engine's
estimate is its claim on the VRAM (``Driver.engine``).

Fit rules (contract §4.5): the pinned models together, plus ``reserve``, fit; every other model
fits alone with all pinned ones resident. Unpinned models that can't all be resident at once are
a warning: the backend swaps them. The VRAM they must fit in is the budget less what other
processes hold (``available_vram``). Each backend's downloads plus ``disk_reserve`` must fit
the free space where that backend stores models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reconciler import backends
from reconciler.backends.gguf import quantization as quantization_names
from reconciler.backends.gguf.memory import kv_bytes, quantization
from reconciler.model import (
    Budget,
    BudgetSettings,
    DiskBudget,
    Estimate,
    EstimateParts,
    GpuProcess,
    GpuState,
    ModelFacts,
    ModelSpec,
)
from reconciler.units import format_size

GiB = 1 << 30
MiB = 1 << 20
GRAPH_BYTES = 512 * MiB
"""Compute graph and batch buffers: Ollama's reference puts them at 0.3–2 GiB; 512 MiB covers
the default batch at contexts up to 8k for models up to ~14B."""

BYTES_PER_PARAM = {
    "F32": 4.0,
    "F16": 2.0,
    "BF16": 2.0,
    "Q8_0": 1.07,
    "Q6_K": 0.82,
    "Q5_K_M": 0.71,
    "Q5_K_S": 0.69,
    "Q5_0": 0.69,
    "Q5_1": 0.75,
    "Q4_K_M": 0.61,
    "Q4_K_S": 0.57,
    "Q4_0": 0.56,
    "Q4_1": 0.62,
    "Q3_K_L": 0.54,
    "Q3_K_M": 0.49,
    "Q3_K_S": 0.44,
    "Q2_K": 0.41,
}
"""GGUF bytes per weight by file type (block scales included), for the rough layer."""

RULE_OF_THUMB_OVERHEAD = 1.15
"""The seed's sizing table (the real node's ``hf-model.js``, shared/reference/
infernet-protocol.md §7): VRAM per billion parameters ~2 × 1.15 GB at FP16, 1 × 1.15 at INT8,
0.5 × 1.15 at INT4, i.e. the width's bytes per parameter + 15 %. It has no KV cache at the
context the model runs at, which is what ``plan -v`` shows beside it."""


def default_context(vram_total: int | None, trained: int | None) -> int:
    """Ollama's automatic num_ctx (≥0.15.5): tiered by total VRAM, capped at the trained one."""
    ctx = 4096
    if vram_total is not None and vram_total >= 47 * GiB:
        ctx = 262144
    elif vram_total is not None and vram_total >= 23 * GiB:
        ctx = 32768
    return min(ctx, trained) if trained else ctx


def run_context(spec: ModelSpec, facts: ModelFacts, vram_total: int | None) -> int:
    """Tokens per sequence the model runs at (see the module docstring)."""
    if ctx := backend_context(spec, facts):
        return ctx  # the backend runs it at its own context whatever the file says
    driver = backends.driver(spec.backend)
    if spec.context:
        return spec.context
    if facts.run_context:
        return facts.run_context
    if driver.default_context is not None and (ctx := driver.default_context(facts)):
        return ctx
    return default_context(vram_total, facts.context_length)


def backend_context(spec: ModelSpec, facts: ModelFacts) -> int | None:
    """The context the backend's own flags impose (llama.cpp's router ``-c``), which the
    file's ``context:`` can't change; None when the file (or a default) decides."""
    driver = backends.driver(spec.backend)
    return driver.run_context(spec, facts) if driver.run_context is not None else None


def rule_of_thumb(facts: ModelFacts) -> int | None:
    """The seed's sizing rule: parameters × bytes per parameter of the quantization's width
    (FP16 2, INT8 1, INT4 0.5) + ``RULE_OF_THUMB_OVERHEAD``; None without both."""
    bits = quantization_names.nominal_bits(quantization(facts))
    if not facts.parameter_count or not bits:
        return None
    return round(facts.parameter_count * bits / 8 * RULE_OF_THUMB_OVERHEAD)


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

    ``accelerator`` is False on a CPU-only node (a llama.cpp child has no CUDA context there).
    An engine (vLLM, SGLang, MAX) pre-allocates ``engine_share`` of the total VRAM whatever
    the model needs, and holds it while it runs: it counts that claim, resident like a pinned
    model (``vram:`` in the file still wins).
    """
    if backends.driver(spec.backend).engine:
        if spec.vram is not None:
            return Estimate(spec.name, spec.vram, "config", True)
        claim = int(vram_total * engine_share) if vram_total else None
        return Estimate(spec.name, claim, "claim", True)
    source, computed, parts = _computed(spec, facts, vram_total, accelerator=accelerator)
    if spec.vram is not None:
        return Estimate(spec.name, spec.vram, "config", spec.pinned, computed, measured, parts)
    if measured:
        return Estimate(spec.name, measured, "measured", spec.pinned, computed, measured, parts)
    return Estimate(spec.name, computed, source, spec.pinned, computed, None, parts)


def _computed(
    spec: ModelSpec, facts: ModelFacts | None, vram_total: int | None, *, accelerator: bool
) -> tuple[str, int | None, EstimateParts | None]:
    """The metadata or rough layer: ``(source, bytes, what the metadata bytes are made of)``."""
    if facts is None:
        return "unknown", None, None
    weights = facts.weights_bytes or facts.size
    ctx = run_context(spec, facts, vram_total)
    parallel = max(1, facts.parallel or 1)
    own = backends.driver(spec.backend).estimate_parts
    terms: Mapping[str, int] | None = None
    if own is not None:
        terms = own(facts, ctx, parallel, accelerator)
    elif weights and (kv := kv_bytes(facts, ctx)) is not None:
        terms = {"weights": weights, "kv": kv * parallel, "compute": GRAPH_BYTES}
    if terms is not None:
        parts = EstimateParts(
            weights=terms["weights"],
            kv=terms["kv"],
            runtime=sum(terms.values()) - terms["weights"] - terms["kv"],
            context=ctx,
            parallel=parallel,
            context_from_backend=bool(backend_context(spec, facts)),
            rule_of_thumb=rule_of_thumb(facts),
            quantization=quantization(facts),
        )
        return "metadata", sum(terms.values()), parts
    per_param = BYTES_PER_PARAM.get((quantization(facts) or "").upper())
    if facts.parameter_count and per_param:
        weights = weights or int(facts.parameter_count * per_param)
    if weights:
        # Without the GGUF keys the KV cache is unknown; a quarter of the weights covers
        # 4k–8k contexts for dense models of every size we have seen.
        return "rough", int(weights * 1.25) + GRAPH_BYTES, None
    return "unknown", None, None


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


def kv_advice(e: Estimate, room: int) -> str:
    """For a refusal that is mostly KV cache, say so and how to shrink it ('' otherwise).

    ``room`` is the VRAM the model may use. The KV cache grows with the context per token, so
    the suggested ``context:`` is the largest power of two (from 1024) whose KV cache, with
    the rest of the estimate, fits ``room``.
    """
    p = e.parts
    if p is None or e.bytes is None or e.source == "config":  # vram: is the operator's figure
        return ""
    if 2 * p.kv <= (e.estimated_bytes or e.bytes):
        return ""
    sequences = f" × {p.parallel} sequences" if p.parallel > 1 else ""
    said = f"{_gib(p.kv)} of it is KV cache for {p.context} tokens of context{sequences}: "
    kv_room = room - (e.bytes - p.kv)
    tokens = max(0, kv_room) * p.context // p.kv
    fitting = 1 << (tokens.bit_length() - 1) if tokens else 0
    fits = f" ({fitting} would fit)" if 1024 <= fitting < p.context else ""
    if p.context_from_backend:  # the router's flags win over the file's context:
        return said + f"lower llama-server's -c{fits}, or "
    if fits:
        return said + f"set context: {fitting} on this model, or "
    return said + "set a smaller context: on this model, or "


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
            explained = [e.parts for e in pinned if e.parts is not None and e.source != "config"]
            kv = sum(p.kv for p in explained)
            mostly_kv = ""
            if 2 * kv > pinned_sum:
                mostly_kv = f"; {_gib(kv)} of it is KV cache: set a smaller context: on them"
                if any(p.context_from_backend for p in explained):
                    mostly_kv += " (llama-server's -c for llama.cpp models)"
            errors.append(
                f"pinned models need {_gib(pinned_sum)} + reserve {_gib(reserve)} = "
                f"{_gib(pinned_sum + reserve)}, more than the {budget_text} "
                f"({names}){mostly_kv}; unpin or drop one, or raise budget.vram"
                + ("" if not held else ", or stop the other processes")
            )
            unfit.update(e.model for e in pinned)
        for e in others:
            need = pinned_sum + (e.bytes or 0) + reserve
            if need > total:
                advice = kv_advice(e, total - pinned_sum - reserve)
                errors.append(
                    f"{e.model} needs {_gib(e.bytes)} ({e.source}) with the pinned models "
                    f"({_gib(pinned_sum)}) and reserve ({_gib(reserve)}) resident: "
                    f"{_gib(need)} > {budget_text}; {advice}pick a smaller quantization "
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
                    f"({format_size(disk.download_bytes)}) are not checked against the disk"
                )
            continue
        if disk.download_bytes + settings.disk_reserve > disk.free_bytes:
            errors.append(
                f"{disk.backend.value} downloads need {format_size(disk.download_bytes)} + "
                f"disk_reserve {format_size(settings.disk_reserve)} but only "
                f"{format_size(disk.free_bytes)} "
                f"is free at {disk.path}; free space there or lower budget.disk_reserve"
            )
    first = disks[0] if disks else None
    budget = Budget(
        vram_total_bytes=base,
        vram_source=gpu.source,
        reserve_bytes=reserve,
        vram_pinned_bytes=pinned_sum,
        largest_swap_in_bytes=largest,
        fits=not errors,
        disk_free_bytes=first.free_bytes if first else None,
        disk_reserve_bytes=settings.disk_reserve,
        download_bytes=sum(d.download_bytes for d in disks),
        estimates=tuple(estimates),
        vram_available_bytes=total,
        foreign_bytes=gpu.foreign_bytes,
        unattributed_bytes=unexplained,
        foreign_processes=gpu.foreign_processes,
        disks=tuple(disks),
    )
    return Fit(budget, tuple(errors), tuple(warnings), frozenset(unfit))
