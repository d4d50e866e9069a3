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

from collections.abc import Sequence
from dataclasses import dataclass

from reconciler import backends
from reconciler.backends.gguf.memory import kv_bytes, quantization
from reconciler.model import (
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
    driver = backends.driver(spec.backend)
    if driver.run_context is not None and (ctx := driver.run_context(spec, facts)):
        return ctx  # the backend runs it at its own context whatever the file says
    if spec.context:
        return spec.context
    if facts.run_context:
        return facts.run_context
    if driver.default_context is not None and (ctx := driver.default_context(facts)):
        return ctx
    return default_context(vram_total, facts.context_length)


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
    own = backends.driver(spec.backend).estimate_parts
    if own is not None:
        parts = own(facts, ctx, parallel, accelerator)
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
