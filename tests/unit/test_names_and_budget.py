"""Quantization names as people write them; budget refusals that are mostly KV cache; the
estimate's parts beside the seed's bytes-per-parameter rule of thumb (issue 16, items 3 and 6)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from reconciler.backends.gguf import quantization
from reconciler.config import schemacheck
from reconciler.model import (
    BackendKind,
    BudgetSettings,
    Estimate,
    EstimateParts,
    GpuState,
    ModelFacts,
    ModelSpec,
)
from reconciler.planning import budget
from reconciler.planning import document as plandoc
from tests.unit.test_plandoc import FULL

GiB = 1 << 30
MiB = 1 << 20


@pytest.mark.parametrize(
    ("asserted", "actual", "meets"),
    [
        ("FP16", "F16", True),
        ("fp16", "F16", True),
        ("f16", "F16", True),
        ("FP32", "F32", True),
        ("BF16", "BF16", True),
        ("bf16", "F16", False),  # another 16-bit format, not the same artifact
        ("FP16", "BF16", False),
        ("INT8", "Q8_0", True),
        ("int8", "Q4_K_M", False),
        ("Q8", "Q8_0", True),
        ("Q4", "Q4_K_M", True),
        ("q4", "Q4_K_S", True),
        ("Q4", "Q4_0", True),
        ("Q4", "Q4_1", True),
        ("INT4", "Q4_K_M", True),
        ("Q4", "IQ4_XS", False),  # an i-quant is not a K- or legacy quant
        ("Q4", "MXFP4", False),
        ("Q4", "Q5_K_M", False),
        ("Q5", "Q5_K_M", True),
        ("Q3", "Q3_K_L", True),
        ("q4_k_m", "Q4_K_M", True),
        ("Q4_K_M", "Q4_K_S", False),
        ("Q4_K_M", "q4_k_m", True),  # Ollama's tag spelling on the artifact side too
        ("Q4_0", "Q4", False),  # a family is what an assertion says, not what an artifact is
    ],
)
def test_quantization_assertion_is_met_by_the_artifacts_people_mean(
    asserted: str, actual: str, meets: bool
) -> None:
    assert quantization.matches(asserted, actual) is meets


@pytest.mark.parametrize(
    "name",
    ["Q4_K_M", "q4_k_m", "F16", "FP16", "fp16", "BF16", "INT8", "int4", "Q4", "IQ4_XS", "MXFP4"],
)
def test_known_quantization_names_are_accepted(name: str) -> None:
    assert quantization.problem(name) is None


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("BOGUS", "did you mean one of Q4_K_M"),
        ("Q4_K_N", "did you mean 'Q4_K_M'?"),
        ("fp61", "did you mean 'FP16'?"),
        ("Q7", "unknown quantization 'Q7'"),  # no 7-bit quant exists
        ("INT16", "unknown quantization 'INT16'"),
    ],
)
def test_unknown_quantization_names_are_refused_with_a_suggestion(
    name: str, suggested: str
) -> None:
    problem = quantization.problem(name)
    assert problem is not None and suggested in problem and "did you mean" in problem


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        *[("F16", 16), ("FP16", 16), ("BF16", 16), ("F32", 32), ("INT8", 8), ("Q8_0", 8)],
        *[("Q4_K_M", 4), ("Q4", 4), ("IQ4_XS", 4), ("MXFP4", 4), ("Q6_K", 6), ("TQ1_0", 1)],
        *[(None, None), ("BOGUS", None)],
    ],
)
def test_nominal_bits_are_the_width_the_name_says(name: str | None, bits: int | None) -> None:
    assert quantization.nominal_bits(name) == bits


@pytest.mark.parametrize(
    ("params", "quant", "expected"),
    [
        # the seed's table: ~2 × 1.15 GB per billion at FP16, 1 × 1.15 at INT8, 0.5 × at INT4
        (1_000_000_000, "F16", 2_300_000_000),
        (1_000_000_000, "Q8_0", 1_150_000_000),
        (1_000_000_000, "Q4_K_M", 575_000_000),
        (14_000_000_000, "Q4_0", 8_050_000_000),
        (None, "Q4_K_M", None),
        (1_000_000_000, None, None),
    ],
)
def test_rule_of_thumb_is_the_seeds_bytes_per_parameter(
    params: int | None, quant: str | None, expected: int | None
) -> None:
    facts = ModelFacts(parameter_count=params, quantization=quant)
    assert budget.rule_of_thumb(facts) == expected


# llama3.2:1b's shape: 16 layers × 8 KV heads × (64 + 64) × f16 = 32 KiB of KV per token.
LLAMA1B = ModelFacts(
    size=800_000_000,
    weights_bytes=800_000_000,
    parameter_count=1_235_814_432,
    quantization="Q4_K_M",
    context_length=131072,
    block_count=16,
    head_count=32,
    head_count_kv=8,
    embedding_length=2048,
    feed_forward_length=8192,
)


def _spec(backend: BackendKind = BackendKind.OLLAMA, context: int | None = None) -> ModelSpec:
    return ModelSpec("llama3.2:1b", backend, "llama3.2:1b", "llama3.2:1b", context=context)


@pytest.mark.parametrize(
    ("backend", "facts", "context"),
    [
        (BackendKind.OLLAMA, LLAMA1B, 131072),
        (BackendKind.OLLAMA, replace(LLAMA1B, parallel=4), 131072),
        (BackendKind.LLAMACPP, LLAMA1B, 131072),
        (BackendKind.LLAMACPP, replace(LLAMA1B, run_context=4096), 4096),  # router's -c
    ],
)
def test_metadata_estimate_is_the_sum_of_its_parts(
    backend: BackendKind, facts: ModelFacts, context: int
) -> None:
    est = budget.estimate(_spec(backend, 131072), facts, None, 24 * GiB)
    p = est.parts
    assert est.source == "metadata" and p is not None
    assert p.weights + p.kv + p.runtime == est.bytes
    assert p.context == context and p.context_from_backend is (facts.run_context is not None)
    assert p.rule_of_thumb == 710_593_298  # 1.24 B parameters × 0.5 byte + 15 %
    if backend is BackendKind.OLLAMA:
        assert p.kv == 32 * 1024 * context * p.parallel


def _parts(kv: int, *, backend: bool = False) -> EstimateParts:
    return EstimateParts(GiB, kv, 512 * MiB, 131072, 1, backend, None, "Q4_K_M")


def _est(kv: int, *, backend: bool = False) -> Estimate:
    """1 GiB of weights + ``kv`` at 128k tokens + 512 MiB of runtime."""
    total = GiB + kv + 512 * MiB
    return Estimate("m:1b", total, "metadata", False, total, None, _parts(kv, backend=backend))


@pytest.mark.parametrize(
    ("estimate", "vram", "says"),
    [
        # 5.5 GiB, 4 GiB of it KV at 128k tokens; 6 GiB less the 1 GiB reserve and the
        # 1.5 GiB of weights and runtime leaves 3.5 GiB of KV: 65536 tokens' worth
        (_est(4 * GiB), 6 * GiB, "4.0 GiB of it is KV cache for 131072 tokens of context: "),
        (_est(4 * GiB), 6 * GiB, "set context: 65536 on this model, or pick a smaller"),
        # the router's -c sets the context: the file's context: would change nothing
        (_est(4 * GiB, backend=True), 6 * GiB, "lower llama-server's -c (65536 would fit), or"),
        # the weights and runtime fill the room: say it is KV, suggest no number
        (_est(4 * GiB), 2 * GiB + 512 * MiB, "set a smaller context: on this model, or pick"),
    ],
)
def test_refusal_that_is_mostly_kv_cache_says_so_and_suggests_context(
    estimate: Estimate, vram: int, says: str
) -> None:
    fit = budget.check(
        [estimate],
        gpu=GpuState("config", vram, None, ()),
        settings=BudgetSettings(vram=vram, reserve=GiB),
    )
    assert len(fit.errors) == 1 and says in fit.errors[0], fit.errors


@pytest.mark.parametrize(
    "estimate",
    [
        _est(GiB),  # KV is a third of it: the weights are what does not fit
        Estimate("m:1b", 10 * GiB, "rough", False, 10 * GiB, None),  # no parts to judge by
    ],
)
def test_refusal_that_is_not_mostly_kv_cache_does_not_mention_context(
    estimate: Estimate,
) -> None:
    fit = budget.check(
        [estimate],
        gpu=GpuState("config", 2 * GiB, None, ()),
        settings=BudgetSettings(vram=2 * GiB, reserve=GiB),
    )
    assert len(fit.errors) == 1 and "KV cache" not in fit.errors[0]
    assert "context" not in fit.errors[0]


def test_pinned_refusal_that_is_mostly_kv_cache_says_so() -> None:
    pinned = replace(_est(4 * GiB), pinned=True)
    fit = budget.check(
        [pinned],
        gpu=GpuState("config", 4 * GiB, None, ()),
        settings=BudgetSettings(vram=4 * GiB, reserve=GiB),
    )
    assert "4.0 GiB of it is KV cache: set a smaller context: on them" in fit.errors[0]


def test_estimate_parts_survive_the_plan_document_and_old_documents_still_load() -> None:
    parts = _parts(4 * GiB)
    estimates = (replace(FULL.budget.estimates[0], parts=parts), *FULL.budget.estimates[1:])
    plan = replace(FULL, budget=replace(FULL.budget, estimates=estimates))
    doc = json.loads(json.dumps(plandoc.to_document(plan)))
    assert schemacheck.check(doc, plandoc.schema_text()) == []
    again = plandoc.from_document(doc, path="plan.json")
    assert [e.parts for e in again.budget.estimates] == [parts, None]
    for e in doc["budget"]["estimates"]:
        del e["parts"]  # a plan saved before parts existed
    old = plandoc.from_document(doc, path="plan.json")
    assert [e.parts for e in old.budget.estimates] == [None, None]
