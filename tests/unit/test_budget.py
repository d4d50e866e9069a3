"""VRAM estimates by layer, and the fit rules' arithmetic."""

from __future__ import annotations

import pytest

from reconciler.model import (
    FOREVER,
    BackendKind,
    BudgetSettings,
    Estimate,
    GpuInfo,
    GpuState,
    ModelFacts,
    ModelSpec,
)
from reconciler.planning import budget

GiB = 1 << 30
LLAMA8B = ModelFacts(
    size=4_920_000_000,
    weights_bytes=4_920_000_000,
    block_count=32,
    head_count=32,
    head_count_kv=8,
    embedding_length=4096,
    context_length=131072,
    quantization="Q4_K_M",
    parameter_count=8_030_000_000,
)


def _spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = {
        "name": "m:1b",
        "backend": BackendKind.OLLAMA,
        "canonical": "registry.ollama.ai/library/m:1b",
        "advertise_as": "m:1b",
    }
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


def test_config_beats_measured_beats_metadata() -> None:
    assert budget.estimate(_spec(vram=7 * GiB), LLAMA8B, 5 * GiB, 24 * GiB).source == "config"
    computed = budget.estimate(_spec(), LLAMA8B, None, 24 * GiB)
    assert computed.source == "metadata" and computed.measured_bytes is None
    assert computed.estimated_bytes == computed.bytes
    # measured wins, and the plan still says what the metadata alone would have given
    assert budget.estimate(_spec(), LLAMA8B, 5 * GiB, 24 * GiB) == Estimate(
        "m:1b", 5 * GiB, "measured", False, computed.bytes, 5 * GiB
    )


def test_kv_cache_is_128k_per_token_for_llama31_8b() -> None:
    assert budget.kv_bytes(LLAMA8B, 4096) == 512 * (1 << 20)
    assert budget.kv_bytes(LLAMA8B, 32768) == 4 * GiB


@pytest.mark.parametrize(
    ("vram", "trained", "expected"),
    [
        (8 * GiB, None, 4096),
        (24 * GiB, None, 32768),
        (48 * GiB, None, 262144),
        (48 * GiB, 8192, 8192),
        (None, None, 4096),
    ],
)
def test_default_context_follows_ollama_tiers(
    vram: int | None, trained: int | None, expected: int
) -> None:
    assert budget.default_context(vram, trained) == expected


def test_context_in_file_drives_the_kv_estimate() -> None:
    small = budget.estimate(_spec(context=2048), LLAMA8B, None, 24 * GiB)
    big = budget.estimate(_spec(context=32768), LLAMA8B, None, 24 * GiB)
    assert big.bytes is not None and small.bytes is not None
    assert big.bytes - small.bytes == budget.kv_bytes(LLAMA8B, 32768) - (  # type: ignore[operator]
        budget.kv_bytes(LLAMA8B, 2048)
    )


def test_rough_layer_from_parameters_and_quantization() -> None:
    facts = ModelFacts(parameter_count=7_000_000_000, quantization="Q8_0")
    est = budget.estimate(_spec(), facts, None, 24 * GiB)
    assert est.source == "rough"
    assert est.bytes == int(7_000_000_000 * 1.07 * 1.25) + budget.GRAPH_BYTES


def test_no_information_is_unknown_and_warned() -> None:
    est = budget.estimate(_spec(), ModelFacts(), None, 24 * GiB)
    assert est == Estimate("m:1b", None, "unknown", False)
    fit = budget.check([est], gpu=GpuState("nvml", 24 * GiB, None), settings=BudgetSettings())
    assert fit.budget.fits
    assert any("no size information anywhere" in w for w in fit.warnings)


def test_pinned_plus_each_swap_in() -> None:
    pinned = Estimate("p", 10 * GiB, "config", True)
    swap_ok = Estimate("a", 12 * GiB, "config", False)
    swap_bad = Estimate("b", 14 * GiB, "config", False)
    fit = budget.check(
        [pinned, swap_ok, swap_bad],
        gpu=GpuState("nvml", 24 * GiB, None),
        settings=BudgetSettings(reserve=1 * GiB),
    )
    assert fit.unfit == frozenset({"b"})
    assert fit.budget.vram_pinned_bytes == 10 * GiB
    assert fit.budget.largest_swap_in_bytes == 14 * GiB
    assert "b needs 14.0 GiB (config)" in fit.errors[0]


def test_budget_bigger_than_the_gpus_is_a_warning() -> None:
    gpu = GpuState("config", 80 * GiB, None, (GpuInfo(0, "RTX 4090", 24 * GiB, 20 * GiB, 4 * GiB),))
    fit = budget.check([], gpu=gpu, settings=BudgetSettings())
    assert any("more than the GPUs have (24.0 GiB)" in w for w in fit.warnings)


def test_pinned_spec_is_pinned() -> None:
    assert _spec(keep_alive=FOREVER).pinned
    assert not _spec(keep_alive=600.0).pinned
    assert not _spec().pinned
