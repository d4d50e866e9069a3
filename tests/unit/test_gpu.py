"""``read_gpus`` with a fake ``pynvml``: a failing NVML is a note, never an exception."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler import gpu

GiB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801 - pynvml's own spelling
    pass


def _fake_nvml(*, init_error: Exception | None = None, totals: tuple[int, ...] = ()) -> Any:
    mod: Any = types.ModuleType("pynvml")
    mod.NVMLError = NVMLError
    mod.NVML_DEVICE_MIG_ENABLE = 1
    mod.nvmlMemory_v2 = 2

    def nvml_init() -> None:
        if init_error is not None:
            raise init_error

    def memory(handle: int, version: int | None = None) -> Any:
        total = totals[handle]
        return types.SimpleNamespace(total=total, free=total - GiB, used=GiB)

    def mig_mode(_handle: int) -> tuple[int, int]:
        raise NVMLError("Not Supported")

    mod.nvmlInit = nvml_init
    mod.nvmlDeviceGetCount = lambda: len(totals)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda i: b"NVIDIA H100 80GB HBM3" if i == 0 else "NVIDIA L4"
    mod.nvmlDeviceGetMigMode = mig_mode
    mod.nvmlDeviceGetMemoryInfo = memory
    return mod


@pytest.fixture(autouse=True)
def _fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("INFERNET_NO_NVML", raising=False)
    monkeypatch.setattr(gpu, "_nvml", None)
    monkeypatch.setattr(gpu, "_nvml_error", None)
    yield


def test_nvml_present_but_failing_falls_back_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml(init_error=NVMLError_DriverNotLoaded("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = gpu.read_gpus(None)
    assert state.source in ("cpu", "none") and state.gpus == ()
    assert state.note and "NVMLError_DriverNotLoaded" in state.note
    configured = gpu.read_gpus(24 * GiB)
    assert (configured.source, configured.total_bytes, configured.free_bytes) == (
        "config",
        24 * GiB,
        None,
    )
    assert configured.note and "Driver Not Loaded" in configured.note


def test_nvml_failing_after_init_is_a_note_too(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml(totals=(80 * GiB,))

    def broken() -> int:
        raise NVMLError("GPU is lost")

    fake.nvmlDeviceGetCount = broken
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    state = gpu.read_gpus(None)
    assert state.source in ("cpu", "none") and state.note and "GPU is lost" in state.note


def test_two_gpus_sum_their_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(totals=(80 * GiB, 24 * GiB)))
    state = gpu.read_gpus(None)
    assert (state.source, state.total_bytes, state.free_bytes) == ("nvml", 104 * GiB, 102 * GiB)
    assert [(g.index, g.name, g.total_bytes) for g in state.gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 80 * GiB),
        (1, "NVIDIA L4", 24 * GiB),
    ]
    assert state.note is None
    configured = gpu.read_gpus(40 * GiB)
    assert (configured.source, configured.total_bytes, configured.free_bytes) == (
        "config",
        40 * GiB,
        102 * GiB,
    )


def test_no_nvml_env_skips_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(totals=(80 * GiB,)))
    monkeypatch.setenv("INFERNET_NO_NVML", "1")
    assert gpu.read_gpus(None).source in ("cpu", "none")
