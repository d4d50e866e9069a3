"""Which installed models leave the node: those the file no longer lists, as the prune policy
allows (``managed``: only what infernet installed; ``all``; ``none``), never one declared
``protect: true`` (until the operator removes it by name), never one an engine infernet did
not start is serving. Pure, like the rest of the planner."""

from __future__ import annotations

from reconciler import backends
from reconciler.model import (
    Action,
    BackendKind,
    BackendState,
    Desired,
    InstalledModel,
    LoadedModel,
    Noop,
    Observed,
    Op,
    Owned,
)
from reconciler.names import key


def find_loaded(state: BackendState, model: InstalledModel) -> LoadedModel | None:
    """The runner serving ``model``: same name, or same manifest (``ps`` shows the name
    that loaded the runner, not the alias we asked about)."""
    for loaded in state.loaded:
        if loaded.canonical == model.canonical:
            return loaded
    for loaded in state.loaded:
        if loaded.digest and loaded.digest == model.facts.digest:
            return loaded
    return None


def installed_name(kind: BackendKind, model: InstalledModel) -> str:
    """An installed model's name as a file would write it: a repository at a revision is
    listed as ``org/repo@revision``, and the revision is not part of the name."""
    return model.name.partition("@")[0] if backends.driver(kind).revisions else model.name


def removals(
    desired: Desired,
    observed: Observed,
    owned: Owned,
    force: frozenset[str],
    *,
    noops: list[Noop],
    warnings: list[str],
) -> list[Action]:
    """Installed models that left the file, filtered by the prune policy and ``protect``;
    what stays is added to ``noops`` (and said in ``warnings`` when it needs saying)."""
    desired_keys = {key(m.backend, m.canonical) for m in desired.models}
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
            name = installed_name(kind, model)
            if k not in force and k in owned.protected:
                warnings.append(
                    f"{model.name} left the file but was declared protect: true; it stays "
                    f"(to remove it, list it again without protect: true, then run: infernet "
                    f"model remove {name})"
                )
                noops.append(Noop(name, kind, "not in the file; protected"))
                continue
            if k not in force and prune == "none":
                why = "not in the file; kept (policy.prune: none)"
                noops.append(Noop(name, kind, why))
                continue
            if k not in force and prune == "managed" and not mine:
                why = "not installed by infernet; left alone (policy.prune: all would remove it)"
                noops.append(Noop(name, kind, why))
                continue
            if k in force:
                reason = "removed by name"
            else:
                why = "installed by infernet" if mine else "policy.prune: all"
                reason = f"not in served_models ({why})"
            running = find_loaded(state, model)
            if running is not None and running.foreign:
                warnings.append(
                    f"{model.name} left the file but an engine infernet did not start serves "
                    "it; not removed (stop that engine first)"
                )
                noops.append(Noop(name, kind, "served by a foreign engine; kept"))
                continue
            if running is not None:
                reason += "; loaded: unloaded first"
            embedding = "embedding" in model.facts.capabilities
            out.append(Action(Op.REMOVE, name, kind, model.canonical, reason, embedding=embedding))
    return out
