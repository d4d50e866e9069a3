"""Taking a remote install's file edit back: after a failure, a cancel, or a crash.

Before an install edits ``infernet.yaml``, the file's bytes are kept in the state store (with
a digest of what the edit writes), so an install cut off by a crash is taken back out of the
file by the next daemon instead of being pulled anyway.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Collection
from pathlib import Path

from reconciler.config import edit as configedit
from reconciler.errors import InfernetError
from reconciler.files import write_atomically
from reconciler.model import BackendKind
from state import Store

log = logging.getLogger("infernet.commands")

INTERRUPTED = "interrupted by a restart of infernet; issue it again"
# State-store status key: per command id, what undoes the file edit of an install still in
# flight (the file's bytes before it, a digest of them after it), so an install cut off by a
# crash is taken back out of the file by the next daemon instead of being pulled anyway.
UNDO = "command_undo"
_ERROR_MAX = 500


def keep_undo(
    store: Store, command_id: str, before: bytes, after: bytes, *, name: str, backend: BackendKind
) -> None:
    undo = dict(store.get_status(UNDO) or {})
    undo[command_id] = {
        "before": base64.b64encode(before).decode("ascii"),
        "after_sha256": hashlib.sha256(after).hexdigest(),
        "name": name,
        "backend": backend.value,
    }
    store.put_status(UNDO, undo)


def drop_undo(store: Store, command_id: str) -> None:
    undo = dict(store.get_status(UNDO) or {})
    if undo.pop(command_id, None) is not None:
        store.put_status(UNDO, undo)


def undo_edit(store: Store, config_path: Path, command_id: str) -> str:
    """Take the file edit of install ``command_id`` back; the caller holds the node lock.

    The file gets its bytes from before the edit back when it is exactly as the edit left it.
    When someone changed it since, their changes stay and only the added entry is removed.
    Returns "" when done (or there was nothing to undo), else a note for the answer.
    """
    undo = (store.get_status(UNDO) or {}).get(command_id)
    if not isinstance(undo, dict):
        return ""
    name = str(undo.get("name", ""))
    note = ""
    try:
        now = config_path.read_bytes()
        if hashlib.sha256(now).hexdigest() == undo.get("after_sha256"):
            write_atomically(config_path, base64.b64decode(undo.get("before", "")))
        elif name:
            configedit.remove_model(config_path, name, BackendKind(undo.get("backend", "ollama")))
    except (OSError, ValueError, InfernetError) as exc:
        log.error("could not take %s back out of %s: %s", name, config_path, exc)
        note = f"; infernet.yaml still lists {name} (could not revert: {_one_line(str(exc))})"
    drop_undo(store, command_id)
    return note


def settle_interrupted(store: Store, config_path: Path, *, busy: Collection[str] = ()) -> list[str]:
    """Settle commands a crash or kill cut off (still ``received``/``running`` in the ledger
    and not being run now): take back the file edit an install made and mark them failed, so
    the node and the answer agree: it is not installed. Running one again could do it twice;
    the owner decides whether to issue it again. Also takes back the edit of a failed install
    whose revert could not run then. The caller holds the node lock; returns the settled ids.
    """
    settled: list[str] = []
    for record in store.unreported_commands():
        if record.command_id in busy or record.state not in ("received", "running"):
            continue
        log.warning("command %s (%s) was interrupted; answering failed",
                    record.command_id, record.verb)  # fmt: skip
        note = undo_edit(store, config_path, record.command_id)
        store.set_command_state(record.command_id, state="failed", error=INTERRUPTED + note)
        settled.append(record.command_id)
    for command_id in list(store.get_status(UNDO) or {}):
        seen = store.command_seen(command_id)
        if command_id in busy or (seen is not None and seen.state in ("received", "running")):
            continue
        if seen is None or seen.state == "failed":  # failed, or its ledger row is gone
            undo_edit(store, config_path, command_id)
            settled.append(command_id)
        else:
            drop_undo(store, command_id)
    return settled


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _ERROR_MAX else flat[: _ERROR_MAX - 1] + "…"
