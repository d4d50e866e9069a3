"""Observation: ask every backend, the registry, the GPUs and the disk; return ``Observed``.

The expensive parts are asked only for models the file mentions: ``show`` details for desired
models that are installed (cached by digest), registry manifests for desired models that are
not (exact bytes to download), and update checks at most every ``UPDATE_CHECK_TTL`` unless
forced. Backends are asked in parallel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reconciler import backends
from reconciler.backends.base import Backend, Cache
from reconciler.errors import BackendError
from reconciler.gpu import read_gpus
from reconciler.model import (
    BackendKind,
    BackendState,
    Desired,
    DiskState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    ModelKey,
    ModelSpec,
    Observed,
    Upstream,
)
from reconciler.names import key

UPDATE_CHECK_TTL = 6 * 3600.0
"""How long an upstream digest is trusted before ``policy.updates`` asks the registry again."""


def share_states(
    states: dict[BackendKind, BackendState],
    desired: Desired,
    owners: Mapping[str, BackendKind],
) -> None:
    """Let each family share what its kinds see together (``Family.merge_states``: the HF
    engine kinds' one hub cache)."""
    for family in backends.families():
        if family.merge_states is not None:
            family.merge_states(states, desired, owners)


def models_dir(desired: Desired, kind: BackendKind) -> str:
    """Where ``kind`` keeps its weights (for the disk check)."""
    return backends.family_of(kind).models_dir(backends.settings_of(desired, kind))


def read_disk(path: str) -> DiskState:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    target = Path(path).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return DiskState(str(target), None, f"can't read free space at {target}: {exc}")
    note = None if probe == target else f"{target} does not exist yet; free space read at {probe}"
    return DiskState(str(target), free, note)


def fingerprint(
    backends: dict[BackendKind, BackendState], upstream: Mapping[ModelKey, Upstream]
) -> str:
    """A digest of what the plan depends on: installed and loaded sets, upstream digests.

    Free VRAM and disk are left out on purpose: they move all the time, and the budget is
    checked again when the plan is applied.
    """
    doc = {
        kind.value: {
            "reachable": state.reachable,
            "installed": sorted((m.canonical, m.facts.digest or "") for m in state.installed),
            "loaded": sorted((m.canonical, m.digest or "", m.pinned) for m in state.loaded),
        }
        for kind, state in sorted(backends.items())
    }
    ups = sorted((k, u.facts.digest or "", u.error is None) for k, u in upstream.items())
    raw = json.dumps({"backends": doc, "upstream": ups}, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


RUN_FACTS = ("run_context", "parallel", "kv_unified", "ubatch")
"""How the backend runs a model (a llama.cpp router's ``-c``, ``-np``…): the inventory's, which
asked the server; the details describe the artifact alone and never replace them."""


def _merge(installed: InstalledModel, shown: ModelFacts) -> InstalledModel:
    """Show's GGUF keys on top of the tags entry (which has size and digest) and on top of
    how the backend runs the model (``RUN_FACTS``)."""
    run = {
        name: getattr(installed.facts, name)
        for name in RUN_FACTS
        if getattr(installed.facts, name) is not None
    }
    facts = dataclasses.replace(
        shown,
        digest=installed.facts.digest,
        size=installed.facts.size,
        weights_bytes=installed.facts.weights_bytes,
        quantization=shown.quantization or installed.facts.quantization,
        **run,
    )
    return dataclasses.replace(installed, facts=facts)


def observe(
    desired: Desired,
    backends: dict[BackendKind, Backend],
    *,
    cache: Cache | None = None,
    refresh_upstream: bool = False,
    owners: Mapping[str, BackendKind] | None = None,
) -> Observed:
    """Everything the planner needs, gathered with parallel requests (``owners``: which kind
    installed each HuggingFace revision, from the state store)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        states = dict(
            zip(backends, pool.map(lambda b: b.inventory(), backends.values()), strict=True)
        )
        share_states(states, desired, owners or {})
        detail_jobs = []
        upstream_jobs = []
        for spec in desired.models:
            state = states.get(spec.backend)
            backend = backends.get(spec.backend)
            if state is None or backend is None or not state.reachable:
                continue
            found = next((m for m in state.installed if m.canonical == spec.canonical), None)
            if found is None:
                upstream_jobs.append((spec, pool.submit(backend.upstream, spec)))
                continue
            detail_jobs.append(
                (spec, found, pool.submit(backend.details, found.name, found.facts.digest))
            )
            damaged = found.error is not None and spec.source is not None
            if damaged or _update_due(spec, found.facts.digest, cache, refresh_upstream):
                upstream_jobs.append((spec, pool.submit(backend.upstream, spec)))
        enriched: dict[ModelKey, InstalledModel] = {}
        for spec, found, job in detail_jobs:
            try:
                enriched[key(spec.backend, found.canonical)] = _merge(found, job.result())
            except BackendError:
                continue  # keep the tags facts; the estimate falls back to a rougher layer
        upstream: dict[ModelKey, Upstream] = {}
        for spec, pending in upstream_jobs:
            up = pending.result()
            upstream[key(spec.backend, spec.canonical)] = up
            if cache is not None and up.error is None:
                cache.put("upstream.digest", key(spec.backend, spec.canonical), up.facts.digest)
    for kind, state in states.items():
        installed = tuple(enriched.get(key(kind, m.canonical), m) for m in state.installed)
        states[kind] = dataclasses.replace(state, installed=installed)
    # An installed model's update check that failed is not a plan error: only a warning later.
    upstream = {k: u for k, u in upstream.items() if u.error is None or not _installed(states, k)}
    gpu = read_gpus(desired.budget.vram)
    for kind, state in states.items():
        if any(m.pid for m in state.loaded) and gpu.backend_processes:
            loaded = tuple(_on_gpu(m, gpu.backend_processes) for m in state.loaded)
            states[kind] = dataclasses.replace(state, loaded=loaded)
    return Observed(
        backends=states,
        upstream=upstream,
        gpu=gpu,
        disks={kind: read_disk(models_dir(desired, kind)) for kind in backends},
        fingerprint=fingerprint(states, upstream),
    )


def _on_gpu(model: LoadedModel, by_pid: Mapping[int, int]) -> LoadedModel:
    """A loaded model's VRAM from NVML, where its backend told us the process: that process
    and its children (an engine's shell, its workers), in place of the resident memory."""
    if model.pid is None:
        return model
    import psutil

    try:
        root = psutil.Process(model.pid)
        pids = [model.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return model
    held = sum(by_pid.get(pid, 0) for pid in pids)
    return dataclasses.replace(model, size_vram=held) if held else model


def _installed(states: dict[BackendKind, BackendState], k: str) -> bool:
    kind, _, canonical = k.partition(":")
    state = states.get(BackendKind(kind))
    return bool(state and any(m.canonical == canonical for m in state.installed))


def _update_due(spec: ModelSpec, digest: str | None, cache: Cache | None, refresh: bool) -> bool:
    """Check an installed model upstream when forced, when the last check is stale, or when
    it last saw other weights (so an update stays in the plan until it is pulled)."""
    if refresh:
        return True
    if cache is None:
        return False
    seen = cache.get("upstream.digest", key(spec.backend, spec.canonical), UPDATE_CHECK_TTL)
    return seen is None or seen != digest
