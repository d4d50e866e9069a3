"""Which model a name means for ``infernet adopt`` and ``infernet state show | forget``.

Ownership decides what prune may delete (``policy.prune: managed`` removes only what
infernet owns), so these rules are strict, the way Terraform's ``import`` is: a model is
adopted only when the file lists it (adopting one it doesn't would make the next apply delete
it) and the backend that holds it answered and lists it now. A name that could mean more than
one model is refused, asking for ``--backend``. Nothing here writes: the CLI records what
these functions found, under the node lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reconciler import backends, names
from reconciler.backends.base import Backend
from reconciler.converge.observe import share_states
from reconciler.converge.session import read_owned
from reconciler.errors import InvalidModelName, PlanError, listed
from reconciler.model import BackendKind, BackendState, Desired, InstalledModel, ModelSpec
from reconciler.redact import redact
from state import OwnedRecord, Store


@dataclass(frozen=True)
class Adoptable:
    """A file entry and the installed model it is: what ``adopt`` records as owned."""

    spec: ModelSpec
    installed: InstalledModel


def inventories(
    desired: Desired, adapters: dict[BackendKind, Backend], store: Store
) -> dict[BackendKind, BackendState]:
    """What every backend holds now (the inventory alone: no registry, no details)."""
    states = {kind: adapter.inventory() for kind, adapter in adapters.items()}
    owners = {m.canonical: m.backend for m in read_owned(store).models.values()}
    share_states(states, desired, owners)
    return states


def adoptable(
    desired: Desired,
    states: dict[BackendKind, BackendState],
    name: str,
    backend: BackendKind | None,
    *,
    where: str,
) -> Adoptable:
    """The entry ``name`` refers to and its installed model; ``PlanError`` (one line, what to
    do) when the file doesn't list it, it is listed for several backends, or its backend did
    not answer or doesn't hold it."""
    entries = [m for m in desired.models if names.refers_to(m, name, backend)]
    if not entries:
        raise PlanError(
            f"{name} is not in {where}; add it there first (adopting a model the file doesn't "
            "list would make the next apply remove it)"
        )
    if len(entries) > 1:
        kinds = listed(sorted({m.backend.value for m in entries}))
        raise PlanError(f"{name} is listed for {kinds} in {where}; add --backend KIND")
    spec = entries[0]
    state = states.get(spec.backend)
    if state is None or not state.reachable:
        url = redact(state.url) if state is not None else spec.backend.value
        why = f": {state.error}" if state is not None and state.error else ""
        raise PlanError(
            f"{spec.backend.value} at {url} did not answer{why}; nothing adopted (start it and "
            "run adopt again)"
        )
    found = next((m for m in state.installed if m.canonical == spec.canonical), None)
    if found is None:
        raise PlanError(
            f"{name} is not installed on {spec.backend.value}; nothing adopted (infernet "
            "apply installs it, and then manages it anyway)"
        )
    return Adoptable(spec, found)


def owned_record(
    records: Sequence[OwnedRecord], name: str, backend: BackendKind | None
) -> OwnedRecord:
    """The ownership record ``name`` means: its name as recorded, its canonical form, or (for
    a repository at a revision, named without one) its repository; ``PlanError`` when none or
    several match."""
    found = [r for r in records if _means(r, name, backend)]
    if not found:
        raise PlanError(
            f"infernet does not manage {name}; nothing changed (infernet state list shows "
            "what it manages)"
        )
    if len(found) > 1:
        shown = listed([f"{r.canonical} ({r.backend})" for r in found])
        raise PlanError(f"{name} could mean {shown}; add --backend KIND or name@revision")
    return found[0]


def _means(record: OwnedRecord, name: str, backend: BackendKind | None) -> bool:
    if backend is not None and record.backend != backend.value:
        return False
    if name in (record.name, record.canonical):
        return True
    if not backends.known(record.backend):
        return False
    try:
        wanted = names.canonical(record.backend, name)
    except InvalidModelName:
        return False
    if wanted == record.canonical:
        return True
    # org/repo means every revision of it (the file's entries are compared the same way).
    revisions = backends.driver(record.backend).revisions
    same_repo = record.canonical.partition("@")[0] == wanted.partition("@")[0]
    return revisions and "@" not in name and same_repo
