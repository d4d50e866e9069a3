"""HuggingFace repositories: the name rules, and the one hub cache the three engine kinds share.

A model is ``org/repo`` at a revision (a branch, tag or commit; ``main`` by default), compared
as ``org/repo@revision``. The three kinds read the same cache, so each cached revision is given
to one kind (``share``), and switching a model from vLLM to SGLang never deletes its files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from reconciler.backends.driver import plain_name
from reconciler.errors import InvalidModelName
from reconciler.model import BackendKind, BackendState, Desired, InstalledModel, ModelSpec

KINDS = (BackendKind.VLLM, BackendKind.SGLANG, BackendKind.MAX)
"""HuggingFace repositories in the hub cache, each served by an engine process of its own."""

_HF_REPO = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def canonical(name: str, revision: str | None = None) -> str:
    """``org/repo@revision`` (``main`` by default); ``InvalidModelName`` for another name."""
    if not plain_name(_HF_REPO, name):
        raise InvalidModelName(
            f"'{name}' is not a valid HuggingFace repo id: use 'org/repo' "
            "(letters, digits, '_', '-', '.')"
        )
    return f"{name}@{revision or 'main'}"


def pull_source(spec: ModelSpec) -> str:
    """Where a pull comes from, as plans show it."""
    return f"hf://{spec.canonical}"


def share(
    states: dict[BackendKind, BackendState],
    desired: Desired,
    owners: Mapping[str, BackendKind],
) -> None:
    """Give each cached revision to one engine kind: the one the file names, else the one that
    installed it (``owners``: canonical → kind, from the state store), else vLLM. A revision
    the file pins by commit is shown under the file's name for it."""
    wanted = {m.canonical: m for m in desired.models if m.backend in KINDS}
    by_commit = {m.revision: m for m in wanted.values() if m.revision and len(m.revision) == 40}
    claimed: dict[str, list[InstalledModel]] = {kind.value: [] for kind in sorted(KINDS)}
    seen_commits: set[str] = set()
    pool = next((s.installed for k, s in states.items() if k in KINDS and s.reachable), ())
    for cached in pool:
        spec = wanted.get(cached.canonical) or by_commit.get(cached.facts.digest or "")
        model = cached
        if spec is not None:
            model = dataclasses.replace(cached, canonical=spec.canonical, name=spec.canonical)
            seen_commits.add(cached.facts.digest or "")
        kind = spec.backend if spec else owners.get(model.canonical, BackendKind.VLLM)
        claimed[kind.value].append(model)
    served_as = {m.advertise_as: m for m in wanted.values()} | {m.name: m for m in wanted.values()}
    for kind in sorted(KINDS):
        state = states.get(kind)
        if state is None or not state.reachable:
            continue
        # Another ref of a revision the file wants is the same files: never a removal.
        mine = tuple(
            m
            for m in claimed[kind.value]
            if m.canonical in wanted or (m.facts.digest or "") not in seen_commits
        )
        loaded = []
        for run in state.loaded:
            if not run.foreign:
                loaded.append(run)
                continue
            # Every kind sees an engine it didn't start at the same URL: keep it once, under
            # the entry it serves (by served name), and call it by that entry's name.
            spec = served_as.get(run.name)
            if spec is not None and spec.backend is kind:
                loaded.append(dataclasses.replace(run, canonical=spec.canonical))
            elif spec is None:
                # Serving a model that left the file: name it after the cached revision of
                # that repo, so the planner sees it is in use and leaves it alone.
                held = next((m for m in mine if m.canonical.partition("@")[0] == run.name), None)
                if held is not None:
                    loaded.append(dataclasses.replace(run, canonical=held.canonical))
                elif kind is BackendKind.VLLM:
                    loaded.append(run)
        states[kind] = dataclasses.replace(state, installed=mine, loaded=tuple(loaded))
