"""The node's accelerator memory, and who holds it, through NVML (``pynvml`` from ``nvidia-ml-py``).

No driver, no GPU or a failing NVML is an answer, not an exception: the budget then comes from
``budget.vram`` in the file, or the node is treated as CPU-only with a share of RAM (see
``CPU_RAM_SHARE``). NVML is initialised once per process.

Who holds the memory: NVML lists the processes running on each GPU (or MIG instance) with the
memory each uses. Each PID is looked up in our PID namespace (``psutil``) and sorted into

* **backend** – an inference backend (Ollama and its runners, llama-server, vLLM, SGLang,
  MAX: the registry's ``Driver.processes``; see ``backend_of``);
* **foreign** – any other process we can see: a training job, a notebook, another server;
* **unattributed** – memory in use that no visible process accounts for: PIDs from another
  namespace (a container), processes NVML gives no figure for, or not listed at all.

Why the fit uses total − foreign rather than raw free memory: "used" includes the backends'
own resident models, and the plan accounts for those itself (pinned models are in the
estimates, unpinned ones are swapped out by the backend when another one loads). Counting them
again through "free" would refuse a plan that only keeps what is already running. Memory held
by anything else is really gone, so it comes off the total. Unattributed memory counts as
gone too, except as much of it as the backends report their loaded models use (a backend in a
container shows up as an unknown PID); ``budget.available_vram`` does that arithmetic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reconciler.model import GpuInfo, GpuProcess, GpuState

CPU_RAM_SHARE = 0.6
"""Share of RAM a CPU-only node budgets for models: the real Infernet node's CPU fit rule, which
leaves the rest for the OS, the backend's runtime and the page cache that mmapped weights use."""
FOREIGN_SHOWN = 5
"""How many of the biggest foreign processes a plan names."""

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


# --------------------------------------------------------------------------- classifying


@dataclass(frozen=True)
class ProcessSeen:
    """What our PID namespace shows for a PID NVML listed."""

    pid: int
    name: str
    cmdline: tuple[str, ...] = ()
    opens_gpu: bool | None = None  # a /dev/nvidia* descriptor open; None when we can't look


@dataclass(frozen=True)
class GpuUse:
    """One row of a GPU's process list: ``used`` is None when NVML has no figure."""

    gpu: int
    pid: int
    used: int | None


@dataclass
class Accounting:
    """GPU memory by holder, per GPU index and summed."""

    backend: dict[int, int] = field(default_factory=dict)
    foreign: dict[int, int] = field(default_factory=dict)
    unattributed: dict[int, int] = field(default_factory=dict)
    foreign_processes: tuple[GpuProcess, ...] = ()  # biggest first, summed over GPUs
    backend_by_pid: dict[int, int] = field(default_factory=dict)  # summed over GPUs


def _basename(word: str) -> str:
    return word.rstrip("/").rsplit("/", 1)[-1].lower()


def backend_of(name: str, cmdline: Sequence[str]) -> str | None:
    """The inference backend a process belongs to, or None for any other process.

    The process names come from the backend registry (``Driver.processes``): executable or
    module names (lower case), matched as prefixes of a process's name, of its first two
    command-line words' basenames, and of a ``-m`` module; ``Driver.processes_exact`` only as
    the whole executable name (a name too common to be a prefix)."""
    from reconciler import backends

    drivers = backends.drivers()
    first = _basename(cmdline[0]) if cmdline else None
    for driver in drivers:
        if name.lower() in driver.processes_exact or first in driver.processes_exact:
            return driver.kind.value
    words = [name.lower(), *(_basename(w) for w in cmdline[:2])]
    words += [cmdline[i + 1].lower() for i, w in enumerate(cmdline[:-1]) if w == "-m"]
    for word in words:
        for driver in drivers:
            if word.startswith(driver.processes):
                return driver.kind.value
    return None


def classify(
    uses: Iterable[GpuUse],
    seen: Mapping[int, ProcessSeen | None],
    used_by_gpu: Mapping[int, int],
    unlisted: Iterable[int] = (),
) -> Accounting:
    """Sort each GPU's used memory into backend, foreign and unattributed bytes.

    ``seen`` maps every listed PID to what our namespace shows (None: not visible);
    ``used_by_gpu`` is each GPU's used memory; ``unlisted`` names GPUs whose process lists
    could not be read, all of whose used memory is then unattributed. A visible PID without
    a /dev/nvidia* descriptor open is a different process that reuses the number (the GPU's
    is in another namespace), so its memory is unattributed too.
    """
    per_gpu: dict[int, dict[int, int | None]] = {}
    for use in uses:  # a process in both the compute and graphics lists counts once
        rows = per_gpu.setdefault(use.gpu, {})
        old = rows.get(use.pid)
        rows[use.pid] = use.used if old is None else max(old, use.used or 0)
    out = Accounting()
    foreign_by_pid: dict[int, int] = {}
    names: dict[int, str] = {}
    skip = set(unlisted)
    for gpu, used in sorted(used_by_gpu.items()):
        known = backend = foreign = 0
        for pid, nbytes in per_gpu.get(gpu, {}).items() if gpu not in skip else ():
            proc = seen.get(pid)
            if nbytes is None or proc is None or proc.opens_gpu is False:
                continue  # left in the residual: unattributed
            known += nbytes
            if backend_of(proc.name, proc.cmdline):
                backend += nbytes
                out.backend_by_pid[pid] = out.backend_by_pid.get(pid, 0) + nbytes
            else:
                foreign += nbytes
                foreign_by_pid[pid] = foreign_by_pid.get(pid, 0) + nbytes
                names[pid] = proc.name or "?"
        out.backend[gpu] = backend
        out.foreign[gpu] = foreign
        out.unattributed[gpu] = max(0, used - known)
    ranked = sorted(foreign_by_pid.items(), key=lambda item: (-item[1], item[0]))
    out.foreign_processes = tuple(GpuProcess(pid, names[pid], n) for pid, n in ranked)
    return out


# --------------------------------------------------------------------------- reading


def _opens_gpu(pid: int) -> bool | None:
    """Whether ``pid`` has a /dev/nvidia* file open; None when its descriptors are hidden."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith("/dev/nvidia"):
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def read_process(pid: int) -> ProcessSeen | None:
    """What our namespace shows for ``pid``; None when no such process is visible."""
    import psutil

    try:
        proc = psutil.Process(pid)
        name = proc.name()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return ProcessSeen(pid, "?", (), None)
    try:
        cmdline = tuple(proc.cmdline())
    except psutil.Error:  # another user's process: the name still tells a backend apart
        cmdline = ()
    return ProcessSeen(pid, name, cmdline, _opens_gpu(pid))


def _memory(nvml: Any, handle: Any) -> tuple[int, int, int]:
    """(total, free, used); v2 info separates driver-reserved memory where the driver has it."""
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except Exception:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free), int(info.used)


def _processes(nvml: Any, handle: Any) -> list[tuple[int, int | None]] | None:
    """(pid, used bytes) of every compute and graphics process; None when NVML can't say."""
    rows: list[tuple[int, int | None]] = []
    listed = False
    for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, query)(handle)
        except Exception:  # NotSupported (some vGPUs, MIG without privileges), old library
            continue
        listed = True
        for proc in procs:
            used = getattr(proc, "usedGpuMemory", None)
            rows.append((int(proc.pid), None if used is None else int(used)))
    return rows if listed else None


def _handles(nvml: Any) -> list[tuple[str, Any]]:
    """Every GPU, or its MIG instances when MIG is on (each is a separate budget slice)."""
    out: list[tuple[str, Any]] = []
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
        out.extend((name, sub) for sub in migs or [handle])
    return out


@dataclass(frozen=True)
class _Reading:
    gpus: tuple[GpuInfo, ...]
    backend: int
    foreign: tuple[GpuProcess, ...]
    by_pid: Mapping[int, int] = field(default_factory=dict)


def _devices(nvml: Any) -> _Reading:
    """Memory and holders of every GPU / MIG instance."""
    memories: list[tuple[str, int, int, int]] = []
    uses: list[GpuUse] = []
    unlisted: list[int] = []
    for index, (name, handle) in enumerate(_handles(nvml)):
        memories.append((name, *_memory(nvml, handle)))
        rows = _processes(nvml, handle)
        if rows is None:
            unlisted.append(index)
        else:
            uses.extend(GpuUse(index, pid, used) for pid, used in rows)
    seen = {pid: read_process(pid) for pid in sorted({u.pid for u in uses})}
    used = {i: m[3] for i, m in enumerate(memories)}
    acc = classify(uses, seen, used, unlisted)
    gpus = tuple(
        GpuInfo(i, name, total, free, used_bytes, acc.foreign[i], acc.unattributed[i])
        for i, (name, total, free, used_bytes) in enumerate(memories)
    )
    foreign = acc.foreign_processes[:FOREIGN_SHOWN]
    return _Reading(gpus, sum(acc.backend.values()), foreign, acc.backend_by_pid)


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def utilization_max() -> int | None:
    """The busiest GPU's utilization in percent (``load.gpu_utilization_max``, which the
    job router skips a node at 95 or more for); None on a node without NVML."""
    nvml = _init() if os.environ.get("INFERNET_NO_NVML") != "1" else None
    if nvml is None:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        rates = [
            int(nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i)).gpu)
            for i in range(count)
        ]
    except Exception:  # not supported on this board (some vGPUs): better unsaid than wrong
        return None
    return max(rates) if rates else None


def read_gpus(configured_vram: int | None) -> GpuState:
    """The VRAM budget's base: NVML totals, else the file's ``budget.vram``, else CPU RAM;
    with NVML, also who holds the memory in use."""
    nvml = _init() if os.environ.get("INFERNET_NO_NVML") != "1" else None
    reading = _Reading((), 0, ())
    note = _nvml_error
    if nvml is not None:
        try:
            reading = _devices(nvml)
        except Exception as exc:
            note = f"NVML failed ({type(exc).__name__}: {exc})"
    if configured_vram is not None:
        free = sum(g.free_bytes for g in reading.gpus) if reading.gpus else None
        return _state("config", configured_vram, free, note, reading)
    if reading.gpus:
        total = sum(g.total_bytes for g in reading.gpus)
        return _state("nvml", total, sum(g.free_bytes for g in reading.gpus), None, reading)
    ram = _ram_bytes()
    if ram is None:
        return GpuState("none", None, None, (), note or "no GPU and RAM size unknown")
    share = int(ram * CPU_RAM_SHARE)
    why = f"{note or 'no NVIDIA GPU'}; CPU node: budget is {CPU_RAM_SHARE:.0%} of RAM"
    return GpuState("cpu", share, None, (), why)


def _state(source: str, total: int, free: int | None, note: str | None, r: _Reading) -> GpuState:
    return GpuState(
        source,
        total,
        free,
        r.gpus,
        note,
        backend_bytes=r.backend,
        foreign_bytes=sum(g.foreign_bytes for g in r.gpus),
        unattributed_bytes=sum(g.unattributed_bytes for g in r.gpus),
        foreign_processes=r.foreign,
        backend_processes=dict(r.by_pid),
    )
