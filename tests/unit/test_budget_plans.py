"""The budget through the planner: other processes' GPU memory, each backend's disk, the plan
text and the plan JSON (validated against the schema) that show them."""

from __future__ import annotations

import json

from reconciler.cli.render import render_plan
from reconciler.config import schemacheck
from reconciler.model import (
    BackendKind,
    BackendState,
    BudgetSettings,
    ConfigSource,
    Desired,
    DiskBudget,
    DiskState,
    GpuInfo,
    GpuProcess,
    GpuState,
    LoadedModel,
    ModelFacts,
    ModelSpec,
    Observed,
    Owned,
    Plan,
    Upstream,
)
from reconciler.names import canonical, key
from reconciler.planning import document as plandoc
from reconciler.planning.plan import plan

GiB = 1 << 30
OLLAMA, LLAMACPP = BackendKind.OLLAMA, BackendKind.LLAMACPP
# Qwen2.5-14B Q4_K_M as the registry describes it: 8.4 GiB of weights, 48 layers, 8 KV heads.
QWEN14 = ModelFacts(
    digest="sha256:q14",
    size=9_000_000_000,
    weights_bytes=9_000_000_000,
    block_count=48,
    head_count=40,
    head_count_kv=8,
    embedding_length=5120,
    context_length=32768,
    quantization="Q4_K_M",
)
TINY_GGUF = ModelFacts(
    digest="sha256:t",
    size=2 * GiB,
    weights_bytes=2 * GiB,
    block_count=16,
    head_count=32,
    head_count_kv=8,
    embedding_length=2048,
    context_length=8192,
    file_type=15,
)


def _spec(name: str, backend: BackendKind = OLLAMA, **kw: object) -> ModelSpec:
    return ModelSpec(name, backend, canonical(backend, name), name, **kw)  # type: ignore[arg-type]


def _desired(*specs: ModelSpec, budget: BudgetSettings | None = None) -> Desired:
    return Desired(
        ConfigSource("infernet.yaml", "ab" * 32),
        specs,
        budget=budget or BudgetSettings(reserve=GiB, disk_reserve=10 * GiB),
    )


def _observed(
    specs: list[tuple[ModelSpec, ModelFacts, int]],
    gpu: GpuState,
    disks: dict[BackendKind, DiskState],
    loaded: tuple[LoadedModel, ...] = (),
) -> Observed:
    """Every spec not installed; the registry offers it with ``download`` bytes to fetch."""
    backends = {
        kind: BackendState(
            kind,
            f"http://127.0.0.1/{kind.value}",
            True,
            loaded=tuple(m for m in loaded if m.backend is kind),
        )
        for kind in (OLLAMA, LLAMACPP)
    }
    upstream = {
        key(s.backend, s.canonical): Upstream(s.backend, s.canonical, facts, download, download)
        for s, facts, download in specs
    }
    return Observed(backends, upstream, gpu, disks, fingerprint="sha256:test")


H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 30 * GiB, 50 * GiB, 48 * GiB, 0)
TRAINER = GpuProcess(4242, "python", 48 * GiB)
DISKS = {OLLAMA: DiskState("/srv/ollama", 500 * GiB)}


def _plan_with_trainer(*specs: tuple[ModelSpec, ModelFacts, int]) -> Plan:
    gpu = GpuState(
        "nvml", 80 * GiB, 30 * GiB, (H100,), foreign_bytes=48 * GiB, foreign_processes=(TRAINER,)
    )
    return plan(_desired(*(s for s, _, _ in specs)), _observed(list(specs), gpu, DISKS), Owned())


def test_memory_held_by_another_process_refuses_a_model_that_fits_the_bare_gpu() -> None:
    big = _spec("qwen2.5:32b", context=32768)
    facts = ModelFacts(**{**QWEN14.__dict__, "size": 30 * GiB, "weights_bytes": 30 * GiB})
    result = _plan_with_trainer((big, facts, 30 * GiB))
    assert not result.budget.fits and result.advertised == ()
    (error,) = result.errors
    assert error.startswith("qwen2.5:32b needs 36.5 GiB (metadata)")
    assert (
        "37.5 GiB > VRAM budget 32.0 GiB (80.0 GiB of GPU memory less other processes "
        "48.0 GiB (python 48.0 GiB, pid 4242)); pick a smaller quantization"
    ) in error
    lines = render_plan(result).splitlines()
    vram = next(i for i, line in enumerate(lines) if line.startswith("VRAM ["))
    held = "of 32.0 GiB available (80.0 GiB nvml, less memory held outside the backends)"
    assert held in lines[vram]
    assert lines[vram + 1] == (
        "VRAM held outside the backends: other processes 48.0 GiB (python 48.0 GiB, pid 4242)"
    )
    # the same plan without the other process fits
    bare = GpuState("nvml", 80 * GiB, 80 * GiB, (H100,))
    alone = plan(_desired(big), _observed([(big, facts, 30 * GiB)], bare, DISKS), Owned())
    assert alone.errors == () and alone.advertised == ("qwen2.5:32b",)


def test_unattributed_memory_explained_by_the_backends_loaded_models_is_not_lost() -> None:
    spec = _spec("qwen2.5:14b", context=8192)
    hidden = GpuState("nvml", 80 * GiB, 10 * GiB, (H100,), unattributed_bytes=66 * GiB)
    runner = LoadedModel(
        OLLAMA,
        "llama3.3:70b",
        canonical(OLLAMA, "llama3.3:70b"),
        "sha256:l",
        60 * GiB,
        60 * GiB,
        None,
        False,
    )
    observed = _observed([(spec, QWEN14, 9_000_000_000)], hidden, DISKS, loaded=(runner,))
    result = plan(_desired(spec), observed, Owned())
    # 66 GiB no process accounts for, 60 GiB of it the backend's loaded 70b: 74 GiB left
    assert result.budget.vram_available_bytes == 74 * GiB
    assert result.budget.unattributed_bytes == 6 * GiB and result.errors == ()
    assert "6.0 GiB used by no identifiable process" in render_plan(result)


def test_each_backend_downloads_against_its_own_disk() -> None:
    qwen = _spec("qwen2.5:14b")
    gguf = _spec("tiny.gguf", LLAMACPP)
    disks = {
        OLLAMA: DiskState("/srv/ollama", 500 * GiB),
        LLAMACPP: DiskState("/var/lib/infernet/models", 11 * GiB),
    }
    gpu = GpuState("nvml", 80 * GiB, 80 * GiB, (H100,))
    observed = _observed([(qwen, QWEN14, 9_000_000_000), (gguf, TINY_GGUF, 2 * GiB)], gpu, disks)
    result = plan(_desired(qwen, gguf), observed, Owned())
    assert result.errors == (
        "llamacpp downloads need 2.1 GB + disk_reserve 10 GB but only 11 GB is free at "
        "/var/lib/infernet/models; free space there or lower budget.disk_reserve",
    )
    assert result.budget.disks == (
        DiskBudget(OLLAMA, "/srv/ollama", 500 * GiB, 9_000_000_000),
        DiskBudget(LLAMACPP, "/var/lib/infernet/models", 11 * GiB, 2 * GiB),
    )
    assert result.budget.download_bytes == 9_000_000_000 + 2 * GiB
    assert result.budget.disk_free_bytes == 500 * GiB  # the default backend's
    assert "Disk: ollama 9 GB to download, 536 GB free at /srv/ollama; llamacpp 2.1 GB " in (
        render_plan(result)
    )
    # the same download fits when the llama.cpp disk has room, whatever Ollama's has
    roomy = {**disks, LLAMACPP: DiskState("/var/lib/infernet/models", 13 * GiB)}
    both = [(qwen, QWEN14, 9_000_000_000), (gguf, TINY_GGUF, 2 * GiB)]
    ok = plan(_desired(qwen, gguf), _observed(both, gpu, roomy), Owned())
    assert ok.errors == ()


def test_plan_json_carries_the_new_figures_and_validates() -> None:
    result = _plan_with_trainer((_spec("qwen2.5:14b", context=8192), QWEN14, 9_000_000_000))
    doc = json.loads(json.dumps(plandoc.to_document(result)))
    assert schemacheck.check(doc, plandoc.schema_text()) == []
    b = doc["budget"]
    assert (b["vram_total_bytes"], b["vram_available_bytes"], b["foreign_bytes"]) == (
        80 * GiB,
        32 * GiB,
        48 * GiB,
    )
    assert b["foreign_processes"] == [{"pid": 4242, "name": "python", "bytes": 48 * GiB}]
    assert b["disks"] == [
        {
            "backend": "ollama",
            "path": "/srv/ollama",
            "free_bytes": 500 * GiB,
            "download_bytes": 9_000_000_000,
        }
    ]
    assert plandoc.from_document(doc, path="plan.json") == result
    doc["budget"]["foreign_processes"][0]["pid"] = "4242"
    assert schemacheck.check(doc, plandoc.schema_text()) != []
