"""Available VRAM with other processes, per-backend disk, file_type, the llama.cpp estimate."""

from __future__ import annotations

import pytest

from reconciler.backends.gguf.header import FILE_TYPES, file_type_name
from reconciler.backends.llamacpp import estimate as llamacpp_estimate
from reconciler.model import (
    BackendKind,
    BudgetSettings,
    DiskBudget,
    Estimate,
    GpuInfo,
    GpuProcess,
    GpuState,
    ModelFacts,
    ModelSpec,
)
from reconciler.planning import budget

GiB = 1 << 30
MiB = 1 << 20
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 0, 0)


def _gpu(
    *,
    foreign: int = 0,
    unattributed: int = 0,
    backend: int = 0,
    total: int | None = None,
    source: str = "nvml",
) -> GpuState:
    procs = (GpuProcess(4242, "python", foreign),) if foreign else ()
    return GpuState(
        source,
        80 * GiB if total is None else total,
        None,
        (H100,),
        backend_bytes=backend,
        foreign_bytes=foreign,
        unattributed_bytes=unattributed,
        foreign_processes=procs,
    )


@pytest.mark.parametrize(
    ("state", "loaded", "expected"),
    [
        (_gpu(), 0, 80 * GiB),
        (_gpu(foreign=12 * GiB), 0, 68 * GiB),
        # a backend in a container: its runner's PID is unknown, but it reports 6 GiB loaded
        (_gpu(unattributed=6 * GiB), 6 * GiB, 80 * GiB),
        (_gpu(unattributed=10 * GiB), 6 * GiB, 76 * GiB),
        # the loaded 6 GiB is already seen in a visible backend process: it explains nothing
        (_gpu(unattributed=10 * GiB, backend=6 * GiB), 6 * GiB, 70 * GiB),
        (_gpu(foreign=12 * GiB, unattributed=GiB), 0, 67 * GiB),
        # budget.vram caps it; other processes count once they leave less than it
        (_gpu(total=40 * GiB, source="config"), 0, 40 * GiB),
        (_gpu(foreign=50 * GiB, total=40 * GiB, source="config"), 0, 30 * GiB),
        # without NVML nothing is known about other processes
        (GpuState("config", 40 * GiB, None), 0, 40 * GiB),
        (GpuState("none", None, None), 0, None),
    ],
)
def test_available_vram(state: GpuState, loaded: int, expected: int | None) -> None:
    assert budget.available_vram(state, loaded) == expected


def test_refusal_names_the_other_processes() -> None:
    model = Estimate("qwen2.5:32b", 60 * GiB, "metadata", False)
    state = _gpu(foreign=30 * GiB)
    fit = budget.check([model], gpu=state, settings=BudgetSettings(reserve=GiB))
    assert fit.unfit == frozenset({"qwen2.5:32b"})
    (error,) = fit.errors
    assert error == (
        "qwen2.5:32b needs 60.0 GiB (metadata) with the pinned models (0.0 GiB) and reserve "
        "(1.0 GiB) resident: 61.0 GiB > VRAM budget 50.0 GiB (80.0 GiB of GPU memory less "
        "other processes 30.0 GiB (python 30.0 GiB, pid 4242)); pick a smaller quantization or "
        "unpin something, or stop the other processes"
    )
    b = fit.budget
    assert (b.vram_total_bytes, b.vram_available_bytes, b.foreign_bytes) == (
        80 * GiB,
        50 * GiB,
        30 * GiB,
    )
    assert b.foreign_processes == (GpuProcess(4242, "python", 30 * GiB),)
    # the same model fits once the other process is gone
    assert budget.check([model], gpu=_gpu(), settings=BudgetSettings()).errors == ()


def test_pinned_refusal_says_what_is_unattributed() -> None:
    pinned = Estimate("a", 70 * GiB, "config", True)
    fit = budget.check([pinned], gpu=_gpu(unattributed=20 * GiB), settings=BudgetSettings())
    assert (
        "more than the VRAM budget 60.0 GiB (80.0 GiB of GPU memory less 20.0 GiB used by no "
        "process infernet can identify)"
    ) in fit.errors[0]
    assert fit.budget.unattributed_bytes == 20 * GiB


def test_each_backend_disk_is_checked_where_it_stores_models() -> None:
    disks = [
        DiskBudget(BackendKind.OLLAMA, "/srv/ollama", 500 * GiB, 9 * GiB),
        DiskBudget(BackendKind.LLAMACPP, "/var/lib/infernet/models", 15 * GiB, 9 * GiB),
    ]
    fit = budget.check([], gpu=_gpu(), settings=BudgetSettings(disk_reserve=10 * GiB), disks=disks)
    assert fit.errors == (
        "llamacpp downloads need 9.7 GB + disk_reserve 10 GB but only 16 GB is free at "
        "/var/lib/infernet/models; free space there or lower budget.disk_reserve",
    )
    b = fit.budget
    assert (b.disk_free_bytes, b.download_bytes, b.disks) == (500 * GiB, 18 * GiB, tuple(disks))


def test_a_disk_of_unknown_size_is_a_warning_only_when_something_downloads() -> None:
    unknown = DiskBudget(BackendKind.LLAMACPP, "?", None, 2 * GiB)
    fit = budget.check([], gpu=_gpu(), settings=BudgetSettings(), disks=[unknown])
    assert fit.errors == () and any("free space at ? unknown" in w for w in fit.warnings)
    idle = DiskBudget(BackendKind.OLLAMA, "/m", None, 0)
    assert budget.check([], gpu=_gpu(), settings=BudgetSettings(), disks=[idle]).warnings == ()


# --------------------------------------------------------------------------- file_type


def test_file_type_table_matches_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    expected = {
        int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        for t in gguf.LlamaFileType
        if t.name != "GUESSED"
    }
    assert expected == FILE_TYPES


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (0, "F32"),
        (1, "F16"),
        (7, "Q8_0"),
        (15, "Q4_K_M"),
        (32, "BF16"),
        (4, None),
        (1024, None),
        (None, None),
    ],
)
def test_file_type_names(value: int | None, name: str | None) -> None:
    assert file_type_name(value) == name


def test_file_type_fills_in_a_missing_quantization() -> None:
    assert budget.quantization(ModelFacts(file_type=15)) == "Q4_K_M"
    assert budget.quantization(ModelFacts(quantization="Q8_0", file_type=15)) == "Q8_0"
    spec = ModelSpec("m", BackendKind.LLAMACPP, "m.gguf", "m")
    est = budget.estimate(spec, ModelFacts(parameter_count=8_000_000_000, file_type=15), None, None)
    rough = int(8_000_000_000 * 0.61 * 1.25) + budget.GRAPH_BYTES
    assert est == Estimate("m", rough, "rough", False, rough, None)


# --------------------------------------------------------------------------- llama.cpp

# The bench's ~100M model (bench/accuracy.py "m100"): 12 layers, 768 wide, 4 KV heads of 64,
# a feed-forward of 2048, Llama 2's 32000-token SentencePiece vocabulary (no merges).
M100 = ModelFacts(
    size=201_000_000,
    weights_bytes=201_000_000,
    block_count=12,
    head_count=12,
    head_count_kv=4,
    embedding_length=768,
    context_length=16384,
    file_type=1,
    feed_forward_length=2048,
    vocab_size=32000,
    vocab_merges=0,
)
LLAMA = ModelSpec("m100.gguf", BackendKind.LLAMACPP, "m100.gguf", "m100")


def _kv(context: int) -> int:
    return 12 * context * 4 * (64 + 64) * 2  # layers × cells × KV heads × (K+V dims) × f16


def _with(**kw: object) -> ModelFacts:
    return ModelFacts(**{**M100.__dict__, **kw})


def test_llamacpp_estimate_runs_at_the_backends_context_and_parallel() -> None:
    one = budget.estimate(LLAMA, _with(run_context=2048), None, None)
    parts = llamacpp_estimate.parts(M100, 2048, 2, accelerator=True)
    assert parts is not None
    two = budget.estimate(LLAMA, _with(run_context=2048, parallel=2), None, None)
    assert two.bytes == sum(parts.values()) and two.source == "metadata"
    assert parts["weights"] == 201_000_000 and parts["kv"] == _kv(4096)
    assert parts["runtime"] == llamacpp_estimate.RUNTIME_GPU + int(
        201_000_000 * llamacpp_estimate.RUNTIME_GPU_PER_WEIGHT
    )
    assert one.bytes is not None and two.bytes is not None
    # a second sequence doubles the KV cache; the micro-batch was already full (512 tokens)
    assert two.bytes - one.bytes == _kv(2048)
    short = budget.estimate(LLAMA, _with(run_context=256), None, None)
    short2 = budget.estimate(LLAMA, _with(run_context=256, parallel=2), None, None)
    assert short.bytes is not None and short2.bytes is not None
    # at 256 tokens a sequence, two of them fill a micro-batch twice as long (the GGUF's own
    # feed-forward width, 2048)
    assert short2.bytes - short.bytes == _kv(256) + 256 * (3 * 2048 + 5 * 768) * 4 + (256 * 256 * 2)


def test_llamacpp_context_comes_from_the_router_then_the_file_then_the_gguf() -> None:
    def kv_of(spec: ModelSpec, facts: ModelFacts) -> int:
        parts = llamacpp_estimate.parts(facts, budget.run_context(spec, facts, None), 1)
        assert parts is not None
        return parts["kv"]

    with_ctx = ModelSpec("m100.gguf", BackendKind.LLAMACPP, "m100.gguf", "m100", context=1024)
    # the router's -c is what its children run, whatever the file says
    assert kv_of(with_ctx, _with(run_context=8192)) == _kv(8192)
    assert kv_of(LLAMA, _with(run_context=8192)) == _kv(8192)
    assert kv_of(with_ctx, M100) == _kv(1024)  # the router could not be asked
    # llama-server without -c allocates the trained context, not Ollama's default
    assert kv_of(LLAMA, M100) == _kv(16384)


def test_llamacpp_on_cpu_pays_no_cuda_context_but_its_slots_host_memory() -> None:
    gpu_parts = llamacpp_estimate.parts(M100, 2048, 2, accelerator=True)
    cpu_parts = llamacpp_estimate.parts(M100, 2048, 2, accelerator=False)
    assert gpu_parts is not None and cpu_parts is not None
    assert gpu_parts["runtime"] == llamacpp_estimate.RUNTIME_GPU + int(
        201_000_000 * llamacpp_estimate.RUNTIME_GPU_PER_WEIGHT
    )
    vocab = 32000
    slot = llamacpp_estimate.SLOT_CPU + vocab * (llamacpp_estimate.SLOT_VOCAB_CPU + 4)
    tokenizer = vocab * llamacpp_estimate.VOCAB_CPU  # SentencePiece: no merge rules
    heap = 4096 * llamacpp_estimate.TOKEN_CPU  # two slots of 2048 cells; F16: no work buffer
    assert cpu_parts["runtime"] == llamacpp_estimate.RUNTIME_CPU + tokenizer + 2 * slot + heap
    assert {k: v for k, v in gpu_parts.items() if k != "runtime"} == {
        k: v for k, v in cpu_parts.items() if k != "runtime"
    }
    cpu_est = budget.estimate(
        LLAMA, _with(run_context=2048, parallel=2), None, None, accelerator=False
    )
    assert cpu_est.bytes == sum(cpu_parts.values())


@pytest.mark.parametrize(
    ("hidden", "context", "parallel", "logged_mib"),
    [
        (64, 256, 1, 1.20),
        (64, 256, 2, 2.39),
        (64, 2048, 1, 4.14),
        (64, 2048, 2, 4.14),
        (64, 8192, 1, 10.14),
        (64, 8192, 2, 10.14),
    ],
)
def test_compute_buffer_matches_what_llama_server_logged(
    hidden: int, context: int, parallel: int, logged_mib: float
) -> None:
    # "CPU compute buffer size" logged by llama-server 11434.0.0 for a llama model 64 wide
    # with a feed-forward of 4 × 64, vocabularies of 259 and 32000 alike (bench/accuracy.py,
    # 2026-11-27).
    facts = ModelFacts(embedding_length=hidden, feed_forward_length=4 * hidden)
    got = llamacpp_estimate.compute_bytes(facts, context, parallel)
    assert got is not None and abs(got / MiB - logged_mib) < 0.1


def test_ollama_estimate_multiplies_kv_by_parallel_and_is_unchanged_without_it() -> None:
    spec = ModelSpec("m:1b", BackendKind.OLLAMA, "registry.ollama.ai/library/m:1b", "m:1b")
    base = budget.estimate(spec, M100, None, 8 * GiB)
    assert base.bytes == 201_000_000 + _kv(4096) + budget.GRAPH_BYTES  # Ollama's 4k default
    both = budget.estimate(spec, _with(parallel=4, run_context=2048), None, 8 * GiB)
    assert both.bytes == 201_000_000 + 4 * _kv(2048) + budget.GRAPH_BYTES


def test_gpu_estimate_adds_unfused_attention_only_for_head_sizes_without_flash_kernels() -> None:
    # 64-wide heads (M100): flash attention runs on the GPU, nothing extra
    assert llamacpp_estimate.parts(M100, 8192, 1, accelerator=True) is not None
    fused = llamacpp_estimate.parts(M100, 8192, 1, accelerator=True)
    plain = llamacpp_estimate.parts(M100, 8192, 1, accelerator=False)
    assert fused is not None and plain is not None and fused["compute"] == plain["compute"]
    # 16-wide heads (the H200 run's tiny model): one micro-batch's f32 scores over every cell
    tiny = ModelFacts(
        weights_bytes=9 << 20, block_count=2, head_count=4, head_count_kv=2, embedding_length=64
    )
    on_gpu = llamacpp_estimate.parts(tiny, 8192, 2, accelerator=True)
    on_cpu = llamacpp_estimate.parts(tiny, 8192, 2, accelerator=False)
    assert on_gpu is not None and on_cpu is not None
    assert on_gpu["compute"] - on_cpu["compute"] == 16384 * 512 * 4 * 4
