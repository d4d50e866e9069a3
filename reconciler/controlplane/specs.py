"""The heartbeat's ``specs`` object, shaped as the real Infernet node sends it.

The control plane replaces a node's ``specs`` wholesale on every heartbeat and routes on
``served_models`` by exact string match, so the whole object goes out on every beat. The base
part follows ``gatherCoarseSpecs`` (``apps/cli/commands/register.js``) and the fresh part
``liveLoad`` (``apps/cli/commands/start.js``) in Infernet Protocol; the reconciler's own report
rides along under ``reconciler``, a key the control plane stores and ignores.

Standard library only (and the store's clock): ``status`` and ``plan`` can build specs without
loading an HTTP client.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Mapping
from typing import Any

from reconciler import __version__, limits
from reconciler.model import GpuState
from state import clock

CLI_VERSION = f"infernet-{__version__}"
"""``cli_version``: the register sanitizer keeps only ``^[0-9A-Za-z._+-]{1,32}$`` (it would
null ``infernet 0.1.0``, space included), so the tool's name is joined with a hyphen."""

_MIB = 1 << 20
_GIB = 1 << 30
# (upper bound in MiB, tier): the real node's ``vramTier(vram_mb)``, where ``vram_mb`` is
# nvidia-smi's ``memory.total`` in MiB and every bound is exclusive: 8191 MiB is ``<8gb``,
# 8192 MiB (8 GiB) is ``8-16gb``. Both register.js and the server's sanitizer use these.
_TIERS = ((8 * 1024, "<8gb"), (16 * 1024, "8-16gb"), (24 * 1024, "16-24gb"), (48 * 1024, "24-48gb"))
# Node's process.arch names for the machine types Python reports.
_ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64", "i686": "ia32"}


def vram_tier(total_bytes: int | None) -> str:
    """The coarse tier the control plane stores instead of exact VRAM."""
    if total_bytes is None or total_bytes <= 0:
        return "unknown"
    mib = total_bytes // _MIB  # nvidia-smi prints whole MiB
    for bound, tier in _TIERS:
        if mib < bound:
            return tier
    return ">=48gb"


def specs_for(
    advertised: list[str],
    gpu: GpuState,
    *,
    extension: dict[str, Any],
    jobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The full ``specs`` for one heartbeat or register.

    ``advertised`` must already be what clients will request, byte for byte. More than 50
    names, or a name outside 1–200 characters, is a ``ValueError``: the control plane would
    silently drop them, and a model that is served but not advertised is invisible.

    ``jobs`` is what the job runner says (``serving.load``): ``active_jobs``,
    ``concurrency_cap`` and ``gpu_utilization_max`` go into ``load`` (the router's saturation
    filter reads them), ``bench`` (tokens per second from real jobs) into ``bench``.
    """
    served = _served_models(advertised)
    model_name = limits.GPU_MODEL_NAME
    gpus = [
        {"vendor": "nvidia", "vram_tier": vram_tier(g.total_bytes), "model": g.name[:model_name]}
        for g in gpu.gpus
    ]
    specs: dict[str, Any] = {
        "gpu_count": len(gpus),
        "gpus": gpus,
        "served_models": served,
        "load": _load(gpu),
        "cli_version": CLI_VERSION,
    }
    if jobs is not None:
        for name in ("active_jobs", "concurrency_cap", "gpu_utilization_max"):
            if jobs.get(name) is not None:
                specs["load"][name] = jobs[name]
        if jobs.get("bench"):
            specs["bench"] = dict(jobs["bench"])
    cpu = _cpu()
    if cpu is not None:
        specs["cpu"] = cpu
    specs["reconciler"] = dict(extension)
    return specs


def offline_body(role: str) -> dict[str, Any]:
    """The last heartbeat on shutdown: the daemon sends exactly this."""
    return {"role": role, "status": "offline"}


def _served_models(advertised: list[str]) -> list[str]:
    served = list(dict.fromkeys(advertised))  # exact duplicates are one name; order kept
    longest = limits.MAX_MODEL_NAME
    for name in served:
        if not isinstance(name, str) or not 1 <= len(name) <= longest:
            raise ValueError(
                f"advertised name {name!r} must be a string of 1-{longest} characters; "
                "the control plane drops any other, so the model could never be routed to"
            )
    if len(served) > limits.MAX_ADVERTISED:
        raise ValueError(
            f"{len(served)} models to advertise, but the control plane keeps at most "
            f"{limits.MAX_ADVERTISED}; serve fewer or set advertise_as to share names"
        )
    return served


def _load(gpu: GpuState) -> dict[str, Any]:
    """``load`` as ``liveLoad`` reports it, minus what only the job runner knows (added by
    ``specs_for`` from ``jobs``; never guessed: the router's saturation filter skips a missing
    value but would act on a wrong one)."""
    total_vram = sum(g.total_bytes for g in gpu.gpus)
    free_vram = sum(g.free_bytes for g in gpu.gpus)
    ram_total, ram_free = _ram()
    load: dict[str, Any] = {
        "vram": {"total_gb": _gb(total_vram), "free_gb": _gb(free_vram)},
        "ram": {"total_gb": _gb(ram_total), "free_gb": _gb(ram_free)},
        "measured_at": clock.now().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    with contextlib.suppress(OSError):  # no load average on this platform
        load["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return load


def _gb(value: int) -> float:
    return round(value / _GIB, 2)


def _ram() -> tuple[int, int]:
    """(total, available) bytes: MemAvailable, like Node's ``os.freemem()`` on Linux."""
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, ValueError, KeyError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0, 0


def _cpu() -> dict[str, Any] | None:
    """``cpu`` as ``{vendor, arch, cores, groups, ram_gb}``; None where it isn't cheap to know."""
    cores = os.cpu_count()
    if not cores:
        return None
    models = _cpu_models()
    machine = platform.machine().lower()
    return {
        "vendor": _cpu_vendor(models[0]) if models else None,
        "arch": _ARCH.get(machine, machine or None),
        "cores": cores,
        "groups": max(1, len(set(models))),
        "ram_gb": _gb(_ram()[0]),
    }


def _cpu_models() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return [
                line.split(":", 1)[1].strip()
                for line in cpuinfo
                if line.startswith("model name") and ":" in line
            ]
    except OSError:
        return []


def _cpu_vendor(model: str) -> str | None:
    """The real node's ``vendorOfModel``: a guess from the model string."""
    m = model.lower()
    for vendor, marks in (
        ("intel", ("intel",)),
        ("amd", ("amd", "ryzen", "epyc", "threadripper")),
        ("apple", ("apple",)),
        ("aws", ("graviton", "aws")),
        ("ampere", ("ampere",)),
    ):
        if any(mark in m for mark in marks):
            return vendor
    return None
