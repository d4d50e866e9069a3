"""A loaded model's VRAM comes from NVML's per-process figure when its backend names the process."""

from __future__ import annotations

import os
import subprocess
import sys

from reconciler.converge.observe import _on_gpu
from reconciler.gpu import GpuUse, ProcessSeen, classify
from reconciler.model import BackendKind, LoadedModel

GiB = 1 << 30


def test_backend_memory_is_kept_per_process() -> None:
    seen = {
        10: ProcessSeen(10, "llama-server", ("llama-server", "--alias", "a"), True),
        11: ProcessSeen(11, "python", ("python", "train.py"), True),
    }
    uses = [GpuUse(0, 10, 3 * GiB), GpuUse(1, 10, 1 * GiB), GpuUse(0, 11, 5 * GiB)]
    acc = classify(uses, seen, {0: 8 * GiB, 1: 1 * GiB})
    assert acc.backend_by_pid == {10: 4 * GiB}  # summed over both GPUs; the trainer is foreign


def _loaded(pid: int | None, rss: int) -> LoadedModel:
    return LoadedModel(
        BackendKind.LLAMACPP, "a.gguf", "a.gguf", None, rss, rss, None, True, pid=pid
    )


def test_loaded_model_takes_its_process_trees_gpu_memory() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # the recorded PID is a parent (an engine's shell); the GPU memory is its child's
        got = _on_gpu(_loaded(os.getpid(), 123), {child.pid: 2 * GiB})
        assert got.size_vram == 2 * GiB
    finally:
        child.kill()
        child.wait()


def test_without_a_gpu_figure_the_resident_memory_stays() -> None:
    assert _on_gpu(_loaded(os.getpid(), 123), {}).size_vram == 123
    assert _on_gpu(_loaded(None, 123), {1: GiB}).size_vram == 123
    assert _on_gpu(_loaded(2**22 + 12345, 123), {1: GiB}).size_vram == 123  # gone


def test_hub_cache_is_walked_once_per_observation_and_again_after_a_change(
    tmp_path: os.PathLike[str],
) -> None:
    from pathlib import Path

    from reconciler.backends.hf.cache import CacheScanner

    assert CacheScanner(Path(tmp_path)).scan() is None  # no model folder: nothing to walk
    (Path(tmp_path) / "models--org--repo" / "snapshots").mkdir(parents=True)
    scanner = CacheScanner(Path(tmp_path), ttl=60)
    first = scanner.scan()
    assert first is not None
    assert scanner.scan() is first  # the three engine kinds share one walk
    scanner.forget()  # a download or removal changed the cache
    assert scanner.scan() is not first
    assert CacheScanner(Path(tmp_path) / "absent").scan() is None
