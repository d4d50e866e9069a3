"""The node's accelerator memory, through NVML (``pynvml`` from ``nvidia-ml-py``).

No driver, no GPU or a failing NVML is an answer, not an exception: the budget then comes from
``budget.vram`` in the file, or the node is treated as CPU-only with a share of RAM (see
``CPU_RAM_SHARE``). NVML is initialised once per process.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from reconciler.model import GpuInfo, GpuState

CPU_RAM_SHARE = 0.6
"""Share of RAM a CPU-only node budgets for models: the real Infernet node's CPU fit rule, which
leaves the rest for the OS, the backend's runtime and the page cache that mmapped weights use."""

_lock = threading.Lock()
_nvml: Any = None
_nvml_error: str | None = None


def _init() -> Any:
    """Import and initialise NVML once; remember why it failed."""
    global _nvml, _nvml_error  # noqa: PLW0603 - NVML is process-global by design
    with _lock:
        if _nvml is not None or _nvml_error is not None:
            return _nvml
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError
            _nvml_error = f"NVML unavailable ({type(exc).__name__}: {exc})"
        return _nvml


def _memory(nvml: Any, handle: Any) -> tuple[int, int, int]:
    """(total, free, used); v2 info separates driver-reserved memory where the driver has it."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except Exception:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free), int(info.used)


def _devices(nvml: Any) -> list[GpuInfo]:
    """Every GPU, or its MIG instances when MIG is on (each is a separate budget slice)."""
    gpus: list[GpuInfo] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        migs: list[Any] = []
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
            if current == nvml.NVML_DEVICE_MIG_ENABLE:
                for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                    try:
                        migs.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
                    except nvml.NVMLError:
                        continue
        except Exception:  # MIG unsupported on this board
            migs = []
        for sub in migs or [handle]:
            total, free, used = _memory(nvml, sub)
            gpus.append(GpuInfo(len(gpus), name, total, free, used))
    return gpus


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def read_gpus(configured_vram: int | None) -> GpuState:
    """The VRAM budget's base: NVML totals, else the file's ``budget.vram``, else CPU RAM."""
    nvml = _init() if os.environ.get("INFERNET_NO_NVML") != "1" else None
    gpus: list[GpuInfo] = []
    note = _nvml_error
    if nvml is not None:
        try:
            gpus = _devices(nvml)
        except Exception as exc:
            note = f"NVML failed ({type(exc).__name__}: {exc})"
    if configured_vram is not None:
        free = sum(g.free_bytes for g in gpus) if gpus else None
        return GpuState("config", configured_vram, free, tuple(gpus), note)
    if gpus:
        total = sum(g.total_bytes for g in gpus)
        return GpuState("nvml", total, sum(g.free_bytes for g in gpus), tuple(gpus), None)
    ram = _ram_bytes()
    if ram is None:
        return GpuState("none", None, None, (), note or "no GPU and RAM size unknown")
    share = int(ram * CPU_RAM_SHARE)
    why = f"{note or 'no NVIDIA GPU'}; CPU node: budget is {CPU_RAM_SHARE:.0%} of RAM"
    return GpuState("cpu", share, None, (), why)
