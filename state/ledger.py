"""The remote-command ledger.

A command id is entered once and only ever moves forward, so a redelivered command is never
run twice; a command stays "unreported" until its final answer was delivered, so none is left
unanswered across crashes.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from state.connection import (
    Connection,
    Unreadable,
    dump_json,
    load_dict,
    now_iso,
    text,
    text_or_none,
)
from state.records import CommandRecord

COMMAND_STATES = frozenset({"received", "running", "completed", "failed"})
KEEP_COMMANDS = 1000  # reported commands remembered (a redelivered id is refused by them)
MAX_PAYLOAD = 16 << 10  # bytes of a command's arguments kept in the ledger
MAX_VERB = 64
# A command may only move forward; going back to received/running would mean running it twice.
_COMMAND_NEXT = {
    "received": frozenset({"received", "running", "completed", "failed"}),
    "running": frozenset({"running", "completed", "failed"}),
    "completed": frozenset({"completed"}),
    "failed": frozenset({"failed"}),
}


class Ledger(Connection):
    """The store's control-plane part; see :class:`state.store.Store`."""

    def command_seen(self, command_id: str) -> CommandRecord | None:
        def query(conn: sqlite3.Connection) -> CommandRecord | None:
            row = conn.execute("SELECT * FROM commands WHERE id = ?", (command_id,)).fetchone()
            return None if row is None else _command(row)

        return self._read(query)

    def record_command(self, *, command_id: str, verb: str, payload: dict[str, Any]) -> bool:
        """Enters a command as ``received``; ``False`` when its id is known: do not run it.

        The table stays bounded whatever the control plane sends: a payload over
        ``MAX_PAYLOAD`` bytes is kept as its size only (the runner checks the arguments it
        was handed, not this copy), and reported commands beyond the newest ``KEEP_COMMANDS``
        are forgotten. Unreported ones are always kept: they are owed an answer.
        """
        now = now_iso()
        stored = dump_json(payload)
        if len(stored) > MAX_PAYLOAD:
            stored = dump_json({"_truncated": True, "bytes": len(stored)})
        with self._writing() as conn:
            cursor = conn.execute(
                """INSERT INTO commands (id, verb, payload, state, received_at, updated_at)
                   VALUES (?, ?, ?, 'received', ?, ?)
                   ON CONFLICT (id) DO NOTHING""",
                (command_id, verb[:MAX_VERB], stored, now, now),
            )
            conn.execute(
                """DELETE FROM commands
                   WHERE reported_at IS NOT NULL AND state IN ('completed', 'failed')
                     AND rowid <= (SELECT max(rowid) FROM commands) - ?""",
                (KEEP_COMMANDS,),
            )
        return cursor.rowcount == 1

    def set_command_state(
        self,
        command_id: str,
        *,
        state: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Moves a command forward (received → running → completed | failed).

        Any change makes it unreported again, so its new answer is delivered too.
        """
        if state not in COMMAND_STATES:
            raise ValueError(f"state must be one of {sorted(COMMAND_STATES)}, got {state!r}")
        with self._writing() as conn:
            row = conn.execute("SELECT state FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                raise ValueError(f"unknown command {command_id}")
            if state not in _COMMAND_NEXT[row["state"]]:
                raise ValueError(
                    f"command {command_id} is {row['state']}; it cannot become {state} "
                    "(a command is never run twice)"
                )
            conn.execute(
                """UPDATE commands SET state = ?, result = ?, error = ?, updated_at = ?,
                                       reported_at = NULL
                   WHERE id = ?""",
                (
                    state,
                    None if result is None else dump_json(result),
                    error,
                    now_iso(),
                    command_id,
                ),
            )

    def mark_command_reported(self, command_id: str) -> None:
        """The command's final answer reached the control plane."""
        with self._writing() as conn:
            cursor = conn.execute(
                "UPDATE commands SET reported_at = ? WHERE id = ?", (now_iso(), command_id)
            )
            if cursor.rowcount == 0:
                raise ValueError(f"unknown command {command_id}")

    def unreported_commands(self) -> list[CommandRecord]:
        """Commands still owed an answer: finished but unreported, or cut off mid-way."""

        def query(conn: sqlite3.Connection) -> list[CommandRecord]:
            rows = conn.execute(
                """SELECT * FROM commands
                   WHERE reported_at IS NULL OR state NOT IN ('completed', 'failed')
                   ORDER BY rowid"""
            ).fetchall()
            return [_command(row) for row in rows]

        return self._read(query)


def _command(row: sqlite3.Row) -> CommandRecord:
    state = text(row, "state")
    if state not in COMMAND_STATES:
        raise Unreadable(f"command state {state[:40]!r} is not one this store writes")
    return CommandRecord(
        command_id=text(row, "id"),
        verb=text(row, "verb"),
        payload=load_dict(row["payload"]),
        state=state,
        result=None if row["result"] is None else load_dict(row["result"]),
        error=text_or_none(row, "error"),
        received_at=text(row, "received_at"),
        updated_at=text(row, "updated_at"),
        reported_at=text_or_none(row, "reported_at"),
    )
