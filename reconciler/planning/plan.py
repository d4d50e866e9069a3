"""The planner: ``plan(desired, observed, owned) -> Plan``, a pure function.

No I/O and no clock, so it is tested from data tables (``tests/unit/plans/*.yaml``). Actions come
out in execution order: pulls and updates first, then pins and unpins, removals last (make
before break, contract §4.1). Every desired or installed model that needs nothing is recorded as
a no-op with its reason, so ``plan -v`` can explain itself. Actions name a model as the file
writes it; an HF repository's revision is in ``canonical`` (``org/repo@revision``), never in
the name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from reconciler import backends
from reconciler.backends.gguf import quantization as quantization_names
from reconciler.backends.gguf.memory import quantization
from reconciler.model import (
    FOREVER,
    Action,
    BackendKind,
    BackendState,
    Check,
    Desired,
    DiskBudget,
    Estimate,
    InstalledModel,
    ModelFacts,
    ModelSpec,
    Noop,
    Observed,
    Op,
    Owned,
    Plan,
    Upstream,
)
from reconciler.names import key
from reconciler.planning import budget, prune, verified
from reconciler.planning.advertised import first as advertised_first
from reconciler.units import format_size

_ORDER = {Op.PULL: 0, Op.UPDATE: 0, Op.PIN: 1, Op.UNPIN: 2, Op.REMOVE: 3}


@dataclass
class _Draft:
    """The planner's inputs and what it has found so far; frozen into a ``Plan`` at the end."""

    desired: Desired
    observed: Observed
    owned: Owned
    actions: list[Action] = field(default_factory=list)
    noops: list[Noop] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)
    servable: list[ModelSpec] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    unserved: list[str] = field(default_factory=list)
    download: defaultdict[BackendKind, int] = field(default_factory=lambda: defaultdict(int))


def _short(digest: str | None) -> str:
    return (digest or "?")[:12]


def _quant_mismatch(spec: ModelSpec, facts: ModelFacts, where: str) -> str | None:
    actual = quantization(facts)  # the backend's string, else the GGUF file type
    if not spec.quantization or not actual:
        return None
    if quantization_names.matches(spec.quantization, actual):
        return None
    return (
        f"{spec.name}: {where} is {actual}, but the file asserts quantization "
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
    draft = _Draft(desired, observed, owned)
    for kind in sorted(desired.backends_used()):
        state = observed.backends.get(kind)
        if state is None:
            draft.errors.append(f"backend {kind.value} is not supported by this version yet")
        elif not state.reachable:
            draft.errors.append(state.error or f"can't reach {kind.value} at {state.url}")
        elif state.serving_error:
            draft.warnings.append(
                f"{state.serving_error}; its models stay installed but are not advertised"
            )
    for state in observed.backends.values():
        if state.reachable:
            draft.warnings.extend(state.warnings)

    for spec in desired.models:
        state = observed.backends.get(spec.backend)
        if state is None or not state.reachable:
            continue
        k = key(spec.backend, spec.canonical)
        installed = next((m for m in state.installed if m.canonical == spec.canonical), None)
        if installed is None:
            _plan_missing(draft, spec, observed.upstream.get(k))
        else:
            _plan_installed(draft, spec, installed, state)

    removals = prune.removals(
        desired, observed, owned, force_remove, noops=draft.noops, warnings=draft.warnings
    )
    if len(removals) > desired.policy.max_removals and not allow_destroy:
        names = ", ".join(a.model for a in removals)
        draft.errors.append(
            f"the plan removes {len(removals)} models ({names}), more than "
            f"policy.max_removals ({desired.policy.max_removals}); pass --allow-destroy "
            "if you mean it"
        )
    draft.actions.extend(removals)
    return _finish(draft)


def _plan_missing(draft: _Draft, spec: ModelSpec, up: Upstream | None) -> None:
    """A desired model that isn't installed: pull it (and pin it) if the registry has it."""
    if up is None:
        draft.errors.append(f"{spec.name}: nothing known upstream; can't plan its pull")
        return
    if up.error:
        draft.errors.append(f"{spec.name}: {up.error}")
        return
    if mismatch := _quant_mismatch(spec, up.facts, "the registry's artifact"):
        draft.errors.append(mismatch)
        return
    measured = draft.owned.measured_vram.get(key(spec.backend, spec.canonical))
    est = _estimate(draft, spec, up.facts, measured)
    draft.estimates.append(est)
    _serve(draft, spec, up.facts.digest, embedding="embedding" in up.facts.capabilities)
    draft.download[spec.backend] += up.download_bytes
    draft.actions.append(
        Action(
            Op.PULL,
            spec.name,
            spec.backend,
            spec.canonical,
            # Sizes as `ollama list` prints them; the exact bytes are download_bytes.
            f"in served_models, not installed ({format_size(up.total_bytes)}, "
            f"{format_size(up.download_bytes)} to download)",
            download_bytes=up.download_bytes,
            vram_bytes=est.bytes,
            digest=up.facts.digest,
            context=spec.context,
            embedding="embedding" in up.facts.capabilities,
            source=_source(spec),
        )
    )
    _warn_context(draft, spec, up.facts)
    if backends.driver(spec.backend).engine:
        draft.actions.append(_engine_start(spec, est.bytes, "start its engine once pulled"))
    elif spec.pinned:
        draft.actions.append(
            Action(
                Op.PIN,
                spec.name,
                spec.backend,
                spec.canonical,
                "keep_alive forever: load and pin once pulled",
                vram_bytes=est.bytes,
                keep_alive=FOREVER,
                context=spec.context,
            )
        )


def _plan_installed(
    draft: _Draft, spec: ModelSpec, installed: InstalledModel, state: BackendState
) -> None:
    """A desired model that is installed: check it, follow updates, fix its pin."""
    facts = installed.facts
    if installed.error is not None:
        _plan_broken(draft, spec, installed)
        return
    if mismatch := _quant_mismatch(spec, facts, "the installed artifact"):
        draft.errors.append(mismatch)
        return
    k = key(spec.backend, spec.canonical)
    measured = draft.owned.measured_vram.get(k)
    loaded = prune.find_loaded(state, installed)
    est = _estimate(draft, spec, facts, measured)
    if loaded is not None and loaded.rss_bytes is not None:
        # Observed, not computed: shown beside the claim so an operator can compare them.
        est = replace(est, rss_bytes=loaded.rss_bytes)
    draft.estimates.append(est)
    embedding = "embedding" in facts.capabilities
    _serve(draft, spec, facts.digest, embedding=embedding)
    _warn_context(draft, spec, facts)
    up = draft.observed.upstream.get(k)
    # An installed file of unknown checksum can't be compared with upstream: no false update.
    if (
        up is not None
        and not up.error
        and facts.digest
        and up.facts.digest not in (None, facts.digest)
    ):
        moved = f"({_short(facts.digest)} → {_short(up.facts.digest)})"
        if draft.desired.policy.updates == "follow":
            draft.download[spec.backend] += up.download_bytes
            draft.actions.append(
                Action(
                    Op.UPDATE,
                    spec.name,
                    spec.backend,
                    spec.canonical,
                    f"the tag now points at new weights upstream {moved}",
                    download_bytes=up.download_bytes,
                    vram_bytes=est.bytes,
                    digest=up.facts.digest,
                    embedding=embedding,
                    context=spec.context,
                )
            )
        else:
            draft.warnings.append(
                f"{spec.name}: the tag points at new weights upstream {moved}; set "
                "policy.updates: follow to pull them"
            )
    ours = draft.owned.models.get(k)
    if backends.driver(spec.backend).engine:
        if loaded is None:
            draft.actions.append(_engine_start(spec, est.bytes, "installed, no engine serves it"))
        else:
            who = "an engine infernet did not start" if loaded.foreign else "its engine"
            draft.noops.append(Noop(spec.name, spec.backend, f"installed, served by {who}"))
    elif spec.pinned and not (loaded and loaded.pinned):
        why = "not loaded" if loaded is None else "loaded but not pinned"
        draft.actions.append(
            Action(
                Op.PIN,
                spec.name,
                spec.backend,
                spec.canonical,
                f"keep_alive forever, {why}",
                vram_bytes=est.bytes,
                keep_alive=FOREVER,
                embedding=embedding,
                context=spec.context,
            )
        )
    elif not spec.pinned and loaded and loaded.pinned and ours and ours.pinned_by_us:
        draft.actions.append(
            Action(
                Op.UNPIN,
                spec.name,
                spec.backend,
                spec.canonical,
                "pinned by infernet, no longer keep_alive forever in the file",
                keep_alive=spec.keep_alive if spec.keep_alive is not None else 0.0,
                embedding=embedding,
                context=spec.context,
            )
        )
    else:
        pin = ", pinned" if spec.pinned else ""
        reason = f"installed (digest {_short(facts.digest)}){pin}"
        draft.noops.append(Noop(spec.name, spec.backend, reason))


def _source(spec: ModelSpec) -> str | None:
    """Where a pull comes from, as the plan shows it."""
    own = backends.driver(spec.backend).pull_source
    return own(spec) if own is not None else spec.source


def _estimate(draft: _Draft, spec: ModelSpec, facts: ModelFacts, measured: int | None) -> Estimate:
    gpu = draft.observed.gpu
    share = backends.driver(spec.backend).claim_share
    if share is None:
        return budget.estimate(spec, facts, measured, gpu.total_bytes, accelerator=bool(gpu.gpus))
    settings = backends.settings_of(draft.desired, spec.backend)
    return budget.estimate(
        spec,
        facts,
        measured,
        gpu.total_bytes,
        accelerator=bool(gpu.gpus),
        engine_share=share(settings),
    )


def _serve(draft: _Draft, spec: ModelSpec, digest: str | None, *, embedding: bool) -> None:
    """Count ``spec`` among what is advertised once applied, when its backend serves and its
    weights answered their canary (or will be tested by the apply: ``verified``)."""
    if not _can_serve(draft, spec):
        return
    found = verified.verdict(spec, digest, draft.owned, embedding=embedding)
    if isinstance(found, str):
        draft.unserved.append(found)
        draft.warnings.append(f"{found}; not advertised (tested again by a later apply)")
        return
    if found is not None:
        draft.checks.append(found)
    draft.servable.append(spec)


def _can_serve(draft: _Draft, spec: ModelSpec) -> bool:
    """Whether the backend can serve what it has (its server answers)."""
    state = draft.observed.backends.get(spec.backend)
    return state is not None and state.serving_error is None


def _engine_start(spec: ModelSpec, vram: int | None, why: str) -> Action:
    """A pin, for engine-served models: start the engine (it holds its claim while it runs)."""
    return Action(
        Op.PIN,
        spec.name,
        spec.backend,
        spec.canonical,
        why,
        vram_bytes=vram,
        keep_alive=FOREVER,
        context=spec.context,
        advertise_as=spec.advertise_as,
    )


def _plan_broken(draft: _Draft, spec: ModelSpec, installed: InstalledModel) -> None:
    """An installed artifact that can't be used: never advertised; fetched again when its
    own header is damaged and the file says where it comes from."""
    unreadable = installed.facts.family is None
    k = key(spec.backend, spec.canonical)
    up = draft.observed.upstream.get(k)
    if unreadable and spec.source and up is not None and not up.error:
        draft.download[spec.backend] += up.download_bytes
        draft.actions.append(
            Action(
                Op.PULL,
                spec.name,
                spec.backend,
                spec.canonical,
                f"installed file is damaged ({installed.error}); downloading it again",
                download_bytes=up.download_bytes,
                digest=up.facts.digest,
                context=spec.context,
                source=spec.source,
            )
        )
        return
    draft.warnings.append(f"{spec.name}: {installed.error}; not advertised until it is fixed")
    draft.noops.append(Noop(spec.name, spec.backend, f"installed but unusable: {installed.error}"))


def _warn_context(draft: _Draft, spec: ModelSpec, facts: ModelFacts) -> None:
    """What the file asks that the backend can't do: any keep_alive for an engine (it serves
    for as long as the model is in the file), and whatever the driver says of its own kind."""
    driver = backends.driver(spec.backend)
    if driver.engine and spec.keep_alive is not None:
        draft.warnings.append(
            f"{spec.name}: keep_alive has no effect on {spec.backend.value}: its engine serves "
            "it, holding its memory, for as long as it is in the file"
        )
    if driver.plan_warnings is None:
        return
    settings = backends.settings_of(draft.desired, spec.backend)
    for text in driver.plan_warnings(spec, facts, settings):
        if text not in draft.warnings:  # one server for every model says some things once
            draft.warnings.append(text)


def _finish(draft: _Draft) -> Plan:
    """Check the budget, order the actions, and freeze the plan."""
    desired, observed = draft.desired, draft.observed
    # The disks of the backends the file uses, and of any that downloads; a node whose file is
    # empty still shows its default backend's.
    used = desired.backends_used() | {k for k, n in draft.download.items() if n}
    first = [desired.default_backend] if desired.default_backend in used or not used else []
    kinds = first + sorted(used - {desired.default_backend})
    disks = []
    for kind in kinds:
        disk = observed.disks.get(kind)
        if disk is None and not draft.download.get(kind):
            continue
        disks.append(
            DiskBudget(
                kind,
                disk.path if disk else "?",
                disk.free_bytes if disk else None,
                draft.download.get(kind, 0),
            )
        )
        if disk and disk.error:
            draft.warnings.append(disk.error)
    # What the backends say their loaded models hold explains memory no process is named for.
    loaded = sum(m.size_vram for s in observed.backends.values() if s.reachable for m in s.loaded)
    fit = budget.check(
        draft.estimates,
        gpu=observed.gpu,
        settings=desired.budget,
        disks=disks,
        backend_loaded=loaded,
    )
    draft.errors.extend(fit.errors)
    draft.warnings.extend(fit.warnings)
    if observed.gpu.note and observed.gpu.source in ("cpu", "none"):
        draft.warnings.append(observed.gpu.note)
    draft.actions.sort(key=lambda a: _ORDER[a.op])
    advertised, left_out = advertised_first(
        [s.advertise_as for s in draft.servable if s.name not in fit.unfit]
    )
    if left_out:
        draft.warnings.append(left_out)
    return Plan(
        source=desired.source,
        fingerprint=observed.fingerprint,
        actions=tuple(draft.actions),
        noops=tuple(draft.noops),
        budget=fit.budget,
        advertised=advertised,
        errors=tuple(draft.errors),
        warnings=tuple(draft.warnings),
        checks=tuple(c for c in draft.checks if c.advertise_as in advertised),
        unserved=tuple(draft.unserved),
    )
