"""``infernet adopt`` and ``infernet state list | show | forget``: what infernet owns.

Ownership is what ``policy.prune: managed`` goes by: a model infernet installed is removed
when it leaves the file, any other is left alone. These commands edit that belief the way
Terraform's ``import`` and ``state rm`` do, and never touch a backend: ``adopt`` records models
that are installed and listed in the file (``converge.adoption`` decides which), ``forget``
drops a record and keeps the weights. Both write under the node lock, taken before the file
is read; ``list`` and ``show`` only read, like ``plan`` and ``status``.
"""

from __future__ import annotations

import argparse
from typing import Any

from reconciler.cli import terminal
from reconciler.cli.commands import EXIT_OK, _load, _lock, _session, state_dir
from reconciler.model import BackendKind
from state import OwnedRecord, StatusKey, Store


def cmd_adopt(args: argparse.Namespace) -> int:
    """adopt NAME…: every name is checked before any is recorded (all or nothing)."""
    from reconciler.config import desired
    from reconciler.converge import adoption

    only = BackendKind(args.backend) if args.backend else None
    where = str(desired.locate(args.config))
    with _lock(args, "adopt"):
        the_desired = _load(args)
        with _session(args, the_desired) as session:
            states = adoption.inventories(the_desired, session.backends, session.store)
            found = [
                adoption.adoptable(the_desired, states, name, only, where=where)
                for name in dict.fromkeys(args.names)
            ]
            owned = {(r.backend, r.canonical) for r in session.store.owned()}
            after = _AFTER_ADOPTION.get(the_desired.policy.prune, "").format(where=where)
            for item in found:
                spec = item.spec
                shown = f"{spec.name} ({spec.backend.value})"
                if (spec.backend.value, spec.canonical) in owned:
                    terminal.show(f"{shown}: already managed by infernet")
                    continue
                session.store.record_installed(
                    backend=spec.backend.value,
                    canonical=spec.canonical,
                    name=spec.name,
                    digest=item.installed.facts.digest,
                )
                terminal.show(f"{shown}: adopted; infernet now manages it{after}")
    return EXIT_OK


_AFTER_ADOPTION = {
    "managed": ", so dropping it from {where} removes it (policy.prune: managed)",
    "all": " (policy.prune: all removes whatever leaves {where}, managed or not)",
    "none": " (policy.prune: none keeps every model that leaves {where})",
}


def cmd_state(args: argparse.Namespace) -> int:
    """state list | show NAME | forget NAME."""
    from reconciler.cli import render

    if args.state_command == "forget":
        return _forget(args)
    with Store.open(state_dir(args)) as store:
        records = store.owned()
        protected = set(store.get_status(StatusKey.PROTECTED) or [])
    rows = [_row(r, protected) for r in records]
    if args.state_command == "list":
        if args.json:
            render.print_json({"models": rows})
        elif not rows:
            terminal.show(
                "infernet manages no models yet: it manages what it installs and what "
                "infernet adopt marks"
            )
        else:
            body = [
                [
                    r["model"],
                    r["backend"],
                    r["managed_since"],
                    "yes" if r["pinned_by_infernet"] else "",
                ]
                for r in rows
            ]
            terminal.show(render.table(body, ["MODEL", "BACKEND", "MANAGED SINCE", "PINNED"]))
        return EXIT_OK
    record = _record(args, records)
    row = _row(record, protected)
    if args.json:
        render.print_json(row)
        return EXIT_OK
    width = max(len(k) for k in row)
    lines = []
    for k, v in row.items():
        shown = "yes" if v is True else "no" if v is False else "-" if v is None else v
        lines.append(f"{k.replace('_', ' '):<{width}}  {shown}")
    terminal.show("\n".join(lines))
    return EXIT_OK


def _forget(args: argparse.Namespace) -> int:
    with _lock(args, "state forget"), Store.open(state_dir(args)) as store:
        record = _record(args, store.owned())
        store.forget_owned(backend=record.backend, canonical=record.canonical)
    terminal.show(
        f"{record.name} ({record.backend}): infernet no longer manages it; its weights stay, "
        "and policy.prune: managed will not remove it (infernet adopt takes it back)"
    )
    return EXIT_OK


def _record(args: argparse.Namespace, records: list[OwnedRecord]) -> OwnedRecord:
    from reconciler.converge.adoption import owned_record

    only = BackendKind(args.backend) if args.backend else None
    return owned_record(records, args.name, only)


def _row(record: OwnedRecord, protected: set[str]) -> dict[str, Any]:
    return {
        "model": record.name,
        "backend": record.backend,
        "canonical": record.canonical,
        "digest": record.digest,
        "managed_since": record.installed_at,
        "pinned_by_infernet": record.pinned_by_us,
        "measured_vram_bytes": record.measured_vram,
        "protected": f"{record.backend}:{record.canonical}" in protected,
    }
