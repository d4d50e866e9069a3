"""The planner: ``plan(desired, observed, owned) -> Plan``, a pure function.

No I/O and no clock, so it is tested from data tables (``tests/unit/plans/*.yaml``). Actions come
out in execution order: pulls and updates first, then pins and unpins, removals last (make
before break, contract §4.1). Every desired or installed model that needs nothing is recorded as
a no-op with its reason, so ``plan -v`` can explain itself.
"""

from __future__ import annotations

from reconciler import budget
from reconciler.model import (
    FOREVER,
    Action,
    BackendKind,
    BackendState,
    Desired,
    Estimate,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    ModelSpec,
    Noop,
    Observed,
    Op,
    Owned,
    Plan,
)
from reconciler.names import key

_ORDER = {Op.PULL: 0, Op.UPDATE: 0, Op.PIN: 1, Op.UNPIN: 2, Op.REMOVE: 3}


def _short(digest: str | None) -> str:
    return (digest or "?")[:12]


def _find_loaded(state: BackendState, model: InstalledModel) -> LoadedModel | None:
    """The runner serving ``model``: same name, or same manifest (``ps`` shows the name
    that loaded the runner, not the alias we asked about)."""
    for loaded in state.loaded:
        if loaded.canonical == model.canonical:
            return loaded
    for loaded in state.loaded:
        if loaded.digest and loaded.digest == model.facts.digest:
            return loaded
    return None


def _quant_mismatch(spec: ModelSpec, facts: ModelFacts, where: str) -> str | None:
    if not spec.quantization or not facts.quantization:
        return None
    if spec.quantization.upper() == facts.quantization.upper():
        return None
    return (
        f"{spec.name}: {where} is {facts.quantization}, but the file asserts quantization "
        f"{spec.quantization}; pick the tag built with {spec.quantization} or change the assertion"
    )


def plan(
    desired: Desired,
    observed: Observed,
    owned: Owned,
    *,
    allow_destroy: bool = False,
    force_remove: frozenset[str] = frozenset(),
) -> Plan:
    """Diff the desired state against what was observed; refuse what breaks a safety rule.

    ``force_remove`` holds model keys the operator asked to remove by name (``model remove``):
    they go whatever the prune policy or ownership says.
    """
    actions: list[Action] = []
    noops: list[Noop] = []
    errors: list[str] = []
    warnings: list[str] = []
    estimates: list[Estimate] = []
    download = 0
    servable: list[ModelSpec] = []

    for kind in sorted(desired.backends_used()):
        state = observed.backends.get(kind)
        if state is None:
            errors.append(f"backend {kind.value} is not supported by this version of infernet")
        elif not state.reachable:
            errors.append(state.error or f"can't reach {kind.value} at {state.url}")

    desired_keys: set[str] = set()
    for spec in desired.models:
        k = key(spec.backend, spec.canonical)
        desired_keys.add(k)
        state = observed.backends.get(spec.backend)
        if state is None or not state.reachable:
            continue
        installed = next((m for m in state.installed if m.canonical == spec.canonical), None)
        up = observed.upstream.get(k)
        measured = owned.measured_vram.get(k)
        if installed is None:
            if up is None:
                errors.append(f"{spec.name}: nothing known upstream; can't plan its pull")
                continue
            if up.error:
                errors.append(f"{spec.name}: {up.error}")
                continue
            if mismatch := _quant_mismatch(spec, up.facts, "the registry's artifact"):
                errors.append(mismatch)
                continue
            est = budget.estimate(spec, up.facts, measured, observed.gpu.total_bytes)
            estimates.append(est)
            download += up.download_bytes
            actions.append(
                Action(
                    Op.PULL, spec.name, spec.backend, spec.canonical,
                    f"in served_models, not installed ({up.total_bytes} bytes, "
                    f"{up.download_bytes} to download)",
                    download_bytes=up.download_bytes, vram_bytes=est.bytes,
                    digest=up.facts.digest, context=spec.context,
                    embedding="embedding" in up.facts.capabilities,
                )
            )  # fmt: skip
            servable.append(spec)
            if spec.pinned:
                actions.append(
                    Action(
                        Op.PIN, spec.name, spec.backend, spec.canonical,
                        "keep_alive forever: load and pin once pulled", vram_bytes=est.bytes,
                        keep_alive=FOREVER, context=spec.context,
                    )
                )  # fmt: skip
            continue

        facts = installed.facts
        if mismatch := _quant_mismatch(spec, facts, "the installed artifact"):
            errors.append(mismatch)
            continue
        est = budget.estimate(spec, facts, measured, observed.gpu.total_bytes)
        estimates.append(est)
        servable.append(spec)
        embedding = "embedding" in facts.capabilities
        moved = up is not None and not up.error and up.facts.digest and facts.digest
        if up is not None and moved and up.facts.digest != facts.digest:
            if desired.policy.updates == "follow":
                download += up.download_bytes
                actions.append(
                        Action(
                            Op.UPDATE, spec.name, spec.backend, spec.canonical,
                            f"the tag now points at new weights upstream "
                            f"({_short(facts.digest)} → {_short(up.facts.digest)})",
                            download_bytes=up.download_bytes, vram_bytes=est.bytes,
                            digest=up.facts.digest, embedding=embedding, context=spec.context,
                        )
                    )  # fmt: skip
            else:
                warnings.append(
                    f"{spec.name}: the tag points at new weights upstream "
                    f"({_short(facts.digest)} → {_short(up.facts.digest)}); set "
                    "policy.updates: follow to pull them"
                )
        loaded = _find_loaded(state, installed)
        was_ours = owned.models.get(k)
        if spec.pinned and not (loaded and loaded.pinned):
            why = "not loaded" if loaded is None else "loaded but not pinned"
            actions.append(
                Action(
                    Op.PIN, spec.name, spec.backend, spec.canonical,
                    f"keep_alive forever, {why}", vram_bytes=est.bytes, keep_alive=FOREVER,
                    embedding=embedding, context=spec.context,
                )
            )  # fmt: skip
        elif not spec.pinned and loaded and loaded.pinned and was_ours and was_ours.pinned_by_us:
            keep = spec.keep_alive if spec.keep_alive is not None else 0.0
            actions.append(
                Action(
                    Op.UNPIN, spec.name, spec.backend, spec.canonical,
                    "pinned by infernet, no longer keep_alive forever in the file",
                    keep_alive=keep, embedding=embedding, context=spec.context,
                )
            )  # fmt: skip
        else:
            pin = ", pinned" if spec.pinned else ""
            noops.append(
                Noop(spec.name, spec.backend, f"installed (digest {_short(facts.digest)}){pin}")
            )

    removals = _removals(
        desired,
        observed,
        owned=owned,
        desired_keys=desired_keys,
        force=force_remove,
        noops=noops,
        warnings=warnings,
    )
    if len(removals) > desired.policy.max_removals and not allow_destroy:
        names = ", ".join(a.model for a in removals)
        errors.append(
            f"the plan removes {len(removals)} models ({names}), more than "
            f"policy.max_removals ({desired.policy.max_removals}); pass --allow-destroy "
            "if you mean it"
        )
    actions.extend(removals)

    disk = observed.disks.get(BackendKind.OLLAMA)
    fit = budget.check(
        estimates, gpu=observed.gpu, settings=desired.budget,
        disk_free=disk.free_bytes if disk else None, download_bytes=download,
        disk_path=disk.path if disk else "?",
    )  # fmt: skip
    errors.extend(fit.errors)
    warnings.extend(fit.warnings)
    if disk and disk.error:
        warnings.append(disk.error)
    if observed.gpu.note and observed.gpu.source in ("cpu", "none"):
        warnings.append(observed.gpu.note)

    actions.sort(key=lambda a: _ORDER[a.op])
    advertised = tuple(s.advertise_as for s in servable if s.name not in fit.unfit)
    return Plan(
        source=desired.source, fingerprint=observed.fingerprint, actions=tuple(actions),
        noops=tuple(noops), budget=fit.budget, advertised=advertised, errors=tuple(errors),
        warnings=tuple(warnings),
    )  # fmt: skip


def _removals(
    desired: Desired,
    observed: Observed,
    *,
    owned: Owned,
    desired_keys: set[str],
    force: frozenset[str],
    noops: list[Noop],
    warnings: list[str],
) -> list[Action]:
    """Installed models that left the file, filtered by the prune policy and ``protect``."""
    out: list[Action] = []
    prune = desired.policy.prune
    for kind, state in sorted(observed.backends.items()):
        if not state.reachable:
            continue
        for model in state.installed:
            k = key(kind, model.canonical)
            if k in desired_keys:
                continue
            mine = k in owned.models
            if k in force:
                out.append(
                    Action(
                        Op.REMOVE, model.name, kind, model.canonical, "removed by name",
                        embedding="embedding" in model.facts.capabilities,
                    )
                )  # fmt: skip
            elif k in owned.protected:
                warnings.append(
                    f"{model.name} left the file but was declared protect: true; "
                    "it stays (remove it with: infernet model remove " + model.name + ")"
                )
                noops.append(Noop(model.name, kind, "not in the file; protected"))
            elif prune == "none":
                noops.append(Noop(model.name, kind, "not in the file; kept (policy.prune: none)"))
            elif prune == "managed" and not mine:
                noops.append(
                    Noop(
                        model.name, kind,
                        "not installed by infernet; left alone (policy.prune: all would remove it)",
                    )
                )  # fmt: skip
            else:
                why = "installed by infernet" if mine else "policy.prune: all"
                loaded = _find_loaded(state, model)
                out.append(
                    Action(
                        Op.REMOVE, model.name, kind, model.canonical,
                        f"not in served_models ({why})"
                        + ("; loaded: unloaded first" if loaded else ""),
                        embedding="embedding" in model.facts.capabilities,
                    )
                )  # fmt: skip
    return out
