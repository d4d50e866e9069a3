"""VRAM and disk budget: per-model estimates with their source, and the fit rules.

Pure: the planner hands in what was observed. The estimate is layered, and the layer used is
reported so a fleet can see where estimates come from:

1. ``config``   – ``vram:`` in the file (the operator knows best);
2. ``measured`` – ``size_vram`` seen when the model was last loaded (state store);
3. ``metadata`` – weights + KV cache at the context the model runs at + compute graph,
                  from GGUF keys (Ollama ``show`` ``model_info`` / the registry);
4. ``rough``    – parameters × bytes per parameter for the quantization, flagged as rough.

Fit rules (contract §4.5): the pinned models together, plus ``reserve``, fit; every other model
fits alone with all pinned ones resident. Unpinned models that can't all be resident at once are
a warning: the backend swaps them.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.model import Budget, BudgetSettings, Estimate, GpuState, ModelFacts, ModelSpec

GiB = 1 << 30
MiB = 1 << 20
GRAPH_BYTES = 512 * MiB
"""Compute graph and batch buffers: Ollama's reference puts them at 0.3–2 GiB; 512 MiB covers
the default batch at contexts up to 8k for models up to ~14B."""

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


def estimate(
    spec: ModelSpec, facts: ModelFacts | None, measured: int | None, vram_total: int | None
) -> Estimate:
    """The model's VRAM need and which layer gave it."""
    if spec.vram is not None:
        return Estimate(spec.name, spec.vram, "config", spec.pinned)
    if measured:
        return Estimate(spec.name, measured, "measured", spec.pinned)
    if facts is None:
        return Estimate(spec.name, None, "unknown", spec.pinned)
    weights = facts.weights_bytes or facts.size
    ctx = spec.context or default_context(vram_total, facts.context_length)
    kv = kv_bytes(facts, ctx)
    if weights and kv is not None:
        return Estimate(spec.name, weights + kv + GRAPH_BYTES, "metadata", spec.pinned)
    per_param = BYTES_PER_PARAM.get((facts.quantization or "").upper())
    if facts.parameter_count and per_param:
        weights = weights or int(facts.parameter_count * per_param)
    if weights:
        # Without the GGUF keys the KV cache is unknown; a quarter of the weights covers
        # 4k–8k contexts for dense models of every size we have seen.
        return Estimate(spec.name, int(weights * 1.25) + GRAPH_BYTES, "rough", spec.pinned)
    return Estimate(spec.name, None, "unknown", spec.pinned)


@dataclass(frozen=True)
class Fit:
    """The budget figures plus the refusals (errors) and advice (warnings) they imply."""

    budget: Budget
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    unfit: frozenset[str]  # model names that can't be served within the budget


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def check(
    estimates: list[Estimate],
    *,
    gpu: GpuState,
    settings: BudgetSettings,
    disk_free: int | None,
    download_bytes: int,
    disk_path: str,
) -> Fit:
    """Apply the fit rules to the estimates; refusals name models and numbers in GiB."""
    errors: list[str] = []
    warnings: list[str] = []
    unfit: set[str] = set()
    total = gpu.total_bytes
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
        if gpu.source == "config" and gpu.gpus:
            real = sum(g.total_bytes for g in gpu.gpus)
            if total > real:
                warnings.append(
                    f"budget.vram {_gib(total)} is more than the GPUs have ({_gib(real)})"
                )
        if pinned and pinned_sum + reserve > total:
            names = ", ".join(f"{e.model} {_gib(e.bytes)}" for e in pinned)
            errors.append(
                f"pinned models need {_gib(pinned_sum)} + reserve {_gib(reserve)} = "
                f"{_gib(pinned_sum + reserve)}, more than the VRAM budget {_gib(total)} "
                f"({names}); unpin or drop one, or raise budget.vram"
            )
            unfit.update(e.model for e in pinned)
        for e in others:
            need = pinned_sum + (e.bytes or 0) + reserve
            if need > total:
                errors.append(
                    f"{e.model} needs {_gib(e.bytes)} ({e.source}) with the pinned models "
                    f"({_gib(pinned_sum)}) and reserve ({_gib(reserve)}) resident: "
                    f"{_gib(need)} > VRAM budget {_gib(total)}; pick a smaller quantization "
                    "or unpin something"
                )
                unfit.add(e.model)
        everything = pinned_sum + sum(e.bytes or 0 for e in others) + reserve
        if not errors and len(others) > 1 and everything > total:
            warnings.append(
                f"the unpinned models can't all be loaded at once ({_gib(everything)} > "
                f"{_gib(total)}); the backend will swap them"
            )
    if disk_free is not None and download_bytes + settings.disk_reserve > disk_free:
        errors.append(
            f"downloads need {_gib(download_bytes)} + disk_reserve "
            f"{_gib(settings.disk_reserve)} but only {_gib(disk_free)} is free at {disk_path}; "
            "free space or lower budget.disk_reserve"
        )
    budget = Budget(
        vram_total_bytes=total, vram_source=gpu.source, reserve_bytes=reserve,
        vram_pinned_bytes=pinned_sum, largest_swap_in_bytes=largest, fits=not errors,
        disk_free_bytes=disk_free, disk_reserve_bytes=settings.disk_reserve,
        download_bytes=download_bytes, estimates=tuple(estimates),
    )  # fmt: skip
    return Fit(budget, tuple(errors), tuple(warnings), frozenset(unfit))
