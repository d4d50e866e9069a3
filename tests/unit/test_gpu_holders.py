"""Who holds GPU memory: backend, foreign or unattributed, from already-read process lists."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from reconciler import gpu
from reconciler.gpu import GpuUse, ProcessSeen, backend_of, classify
from reconciler.model import GpuProcess

GiB = 1 << 30
MiB = 1 << 20
READ_PROCESS = gpu.read_process  # the real one; the fixture below swaps in a table


@pytest.mark.parametrize(
    ("name", "cmdline", "expected"),
    [
        ("ollama", ["/usr/local/bin/ollama", "serve"], "ollama"),
        ("ollama", ["/usr/local/bin/ollama", "runner", "--model", "/m/blobs/sha256-1"], "ollama"),
        ("ollama_llama_se", ["/tmp/ollama123/runners/cuda_v12/ollama_llama_server"], "ollama"),
        ("llama-server", ["./llama-server", "--port", "8080", "--alias", "a"], "llamacpp"),
        ("llama-server-11", [".cache/llama/llama-server-11434.0.0-23677f2990dd"], "llamacpp"),
        ("python3", ["python3", "-m", "vllm.entrypoints.openai.api_server"], "vllm"),
        ("vllm", ["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "Qwen/Qwen2.5"], "vllm"),
        ("VLLM::EngineCor", ["VLLM::EngineCore"], "vllm"),
        ("python", ["python", "-m", "sglang.launch_server", "--model", "x"], "sglang"),
        ("sglang::schedul", ["sglang::scheduler_TP0"], "sglang"),
        ("max", ["/opt/modular/bin/max", "serve", "--model-path", "x"], "max"),
        ("python3", ["python3", "-m", "max.entrypoints.pipelines", "serve"], "max"),
        ("python3", ["python3", "train.py", "--model", "vllm-like-name"], None),
        ("python3", ["python3", "-c", "import torch"], None),
        ("maxima", ["/usr/bin/maxima"], None),
        ("Xorg", ["/usr/lib/xorg/Xorg", ":0"], None),
    ],
)
def test_backend_processes_are_told_from_others(
    name: str, cmdline: list[str], expected: str | None
) -> None:
    assert backend_of(name, cmdline) == expected


OLLAMA = ProcessSeen(10, "ollama", ("/usr/bin/ollama", "runner"), True)
TRAINER = ProcessSeen(4242, "python", ("python", "train.py"), True)
NOTEBOOK = ProcessSeen(77, "jupyter-lab", ("jupyter-lab",), True)


def test_visible_processes_split_into_backend_and_foreign() -> None:
    uses = [GpuUse(0, 10, 6 * GiB), GpuUse(0, 4242, 12 * GiB), GpuUse(0, 77, 1 * GiB)]
    seen = {10: OLLAMA, 4242: TRAINER, 77: NOTEBOOK}
    acc = classify(uses, seen, {0: 19 * GiB + 300 * MiB})
    assert acc.backend == {0: 6 * GiB}
    assert acc.foreign == {0: 13 * GiB}
    # used memory no listed process accounts for (driver, unlisted contexts) is unattributed
    assert acc.unattributed == {0: 300 * MiB}
    assert acc.foreign_processes == (
        GpuProcess(4242, "python", 12 * GiB),
        GpuProcess(77, "jupyter-lab", 1 * GiB),
    )


def test_pids_we_cannot_see_or_measure_are_unattributed() -> None:
    uses = [
        GpuUse(0, 999_999, 8 * GiB),  # another PID namespace: not visible here
        GpuUse(0, 4242, None),  # NVML has no per-process figure (e.g. MIG, WDDM)
        GpuUse(0, 55, 2 * GiB),  # visible PID without /dev/nvidia open: number reused
    ]
    seen = {999_999: None, 4242: TRAINER, 55: ProcessSeen(55, "bash", ("bash",), False)}
    acc = classify(uses, seen, {0: 13 * GiB})
    assert (acc.backend, acc.foreign, acc.unattributed) == ({0: 0}, {0: 0}, {0: 13 * GiB})
    assert acc.foreign_processes == ()


def test_descriptors_we_cannot_read_do_not_hide_a_process() -> None:
    other_user = ProcessSeen(4242, "python", (), None)
    acc = classify([GpuUse(0, 4242, 3 * GiB)], {4242: other_user}, {0: 3 * GiB})
    assert acc.foreign == {0: 3 * GiB} and acc.unattributed == {0: 0}


def test_a_process_in_both_lists_counts_once_and_gpus_add_up() -> None:
    uses = [
        GpuUse(0, 4242, 4 * GiB),
        GpuUse(0, 4242, 4 * GiB),  # compute and graphics lists
        GpuUse(1, 4242, 2 * GiB),
        GpuUse(1, 10, 5 * GiB),
    ]
    acc = classify(uses, {10: OLLAMA, 4242: TRAINER}, {0: 4 * GiB, 1: 7 * GiB})
    assert acc.foreign == {0: 4 * GiB, 1: 2 * GiB}
    assert acc.backend == {0: 0, 1: 5 * GiB}
    assert acc.unattributed == {0: 0, 1: 0}
    assert acc.foreign_processes == (GpuProcess(4242, "python", 6 * GiB),)


def test_a_gpu_whose_process_list_is_unreadable_is_all_unattributed() -> None:
    acc = classify([GpuUse(1, 4242, GiB)], {4242: TRAINER}, {0: GiB, 1: 5 * GiB}, unlisted=[0])
    assert acc.unattributed == {0: GiB, 1: 4 * GiB}
    assert acc.foreign == {0: 0, 1: GiB}


def test_read_process_sees_this_process_and_not_a_missing_one() -> None:
    me = READ_PROCESS(os.getpid())
    assert me is not None and me.pid == os.getpid()
    assert me.cmdline and "python" in me.cmdline[0]
    assert me.opens_gpu is False  # the test run has no /dev/nvidia* open
    assert READ_PROCESS(2**22 + 12345) is None  # above Linux's pid_max


# --------------------------------------------------------------------------- read_gpus


def _fake_nvml(
    procs: Mapping[int, Sequence[tuple[int, int | None]]],
    *,
    used: tuple[int, ...],
    mig: bool = False,
) -> Any:
    """A fake pynvml: handles are ints; with ``mig`` GPU 0 has two MIG instances 100 and 101."""
    mod: Any = types.ModuleType("pynvml")
    mod.NVMLError = type("NVMLError", (Exception,), {})
    mod.NVML_DEVICE_MIG_ENABLE = 1
    mod.nvmlMemory_v2 = 2
    total = 80 * GiB

    def memory(handle: int, version: int | None = None) -> Any:
        i = handle - 100 if handle >= 100 else handle
        return types.SimpleNamespace(total=total, free=total - used[i], used=used[i])

    def listing(handle: int) -> list[Any]:
        if handle not in procs:
            raise mod.NVMLError("Not Supported")
        return [types.SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in procs[handle]]

    mod.nvmlInit = lambda: None
    mod.nvmlDeviceGetCount = lambda: 1 if mig else len(used)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda i: b"NVIDIA H100 80GB HBM3"
    mod.nvmlDeviceGetMigMode = lambda h: (1 if mig else 0, 0)
    mod.nvmlDeviceGetMaxMigDeviceCount = lambda h: 2
    mod.nvmlDeviceGetMigDeviceHandleByIndex = lambda h, slot: 100 + slot
    mod.nvmlDeviceGetMemoryInfo = memory
    mod.nvmlDeviceGetComputeRunningProcesses = listing
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    return mod


@pytest.fixture(autouse=True)
def _fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("INFERNET_NO_NVML", raising=False)
    monkeypatch.setattr(gpu, "_nvml", None)
    monkeypatch.setattr(gpu, "_nvml_error", None)
    table = {10: OLLAMA, 4242: TRAINER, 77: NOTEBOOK}
    monkeypatch.setattr(gpu, "read_process", table.get)
    yield


def test_read_gpus_reports_foreign_and_unattributed_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    procs = {0: [(10, 6 * GiB), (4242, 12 * GiB)], 1: [(77, GiB), (31337, 2 * GiB)]}
    fake = _fake_nvml(procs, used=(18 * GiB, 3 * GiB))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = gpu.read_gpus(None)
    assert (state.source, state.total_bytes) == ("nvml", 160 * GiB)
    assert (state.backend_bytes, state.foreign_bytes, state.unattributed_bytes) == (
        6 * GiB,
        13 * GiB,
        2 * GiB,
    )
    assert [(g.foreign_bytes, g.unattributed_bytes) for g in state.gpus] == [
        (12 * GiB, 0),
        (GiB, 2 * GiB),
    ]
    assert state.foreign_processes == (
        GpuProcess(4242, "python", 12 * GiB),
        GpuProcess(77, "jupyter-lab", GiB),
    )
    configured = gpu.read_gpus(40 * GiB)
    assert (configured.source, configured.foreign_bytes) == ("config", 13 * GiB)


def test_mig_instances_are_read_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # Instance 101's list is unreadable (not supported without privileges): all unattributed.
    fake = _fake_nvml({100: [(4242, 5 * GiB)]}, used=(5 * GiB, 7 * GiB), mig=True)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = gpu.read_gpus(None)
    assert len(state.gpus) == 2
    assert [(g.foreign_bytes, g.unattributed_bytes) for g in state.gpus] == [
        (5 * GiB, 0),
        (0, 7 * GiB),
    ]


def test_the_biggest_foreign_processes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    many = {pid: ProcessSeen(pid, f"job{pid}", (f"job{pid}",), True) for pid in range(1, 9)}
    monkeypatch.setattr(gpu, "read_process", many.get)
    fake = _fake_nvml({0: [(pid, pid * GiB) for pid in many]}, used=(36 * GiB,))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = gpu.read_gpus(None)
    assert state.foreign_bytes == 36 * GiB
    assert [p.pid for p in state.foreign_processes] == [8, 7, 6, 5, 4][: gpu.FOREIGN_SHOWN]
