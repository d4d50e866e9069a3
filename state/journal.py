"""Applies and the action journal: what each apply did, and what a dead one left half-done.

The executor journals an action before it starts and finishes it after; whatever is still
open when the next apply starts was cut off, and that apply resumes or rolls it forward.
"""

from __future__ import annotations

import sqlite3
from typing import Any, cast

from state.connection import Connection, dump_json, integer, load_dict, now_iso, text, text_or_none
from state.records import ApplyRecord, JournalEntry

OUTCOMES = frozenset({"ok", "failed", "skipped"})
INTERRUPTED = "interrupted"
# History is for `status` and debugging, not an audit log; keep the file small.
KEEP_APPLIES = 100
KEEP_RUNS = 100


class Journal(Connection):
    """The store's history part; see :class:`state.store.Store`."""

    def record_apply(
        self,
        *,
        config_sha256: str,
        git_commit: str | None,
        converged: bool,
        actions: int,
        failed: int,
        summary: dict[str, Any],
    ) -> None:
        with self._writing() as conn:
            conn.execute(
                """INSERT INTO applies
                       (at, config_sha256, git_commit, converged, actions, failed, summary)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (
                    now_iso(),
                    config_sha256,
                    git_commit,
                    converged,
                    actions,
                    failed,
                    dump_json(summary),
                ),
            )
            conn.execute(
                "DELETE FROM applies WHERE id <= (SELECT max(id) FROM applies) - ?",
                (KEEP_APPLIES,),
            )

    def last_apply(self) -> ApplyRecord | None:
        def query(conn: sqlite3.Connection) -> ApplyRecord | None:
            row = conn.execute("SELECT * FROM applies ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                return None
            return ApplyRecord(
                at=text(row, "at"),
                config_sha256=text(row, "config_sha256"),
                git_commit=text_or_none(row, "git_commit"),
                converged=bool(integer(row, "converged")),
                actions=integer(row, "actions"),
                failed=integer(row, "failed"),
                summary=load_dict(row["summary"]),
            )

        return self._read(query)

    # -- action journal ---------------------------------------------------------------------

    def begin_run(self, *, config_sha256: str, plan: dict[str, Any]) -> str:
        """Opens a run of the executor; returns its id (uuid4 hex)."""
        # Imported here: uuid pulls in `platform`, which costs the CLI's start-up on every
        # command while only apply needs it.
        import uuid

        run_id = uuid.uuid4().hex
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO runs (id, config_sha256, plan, started_at) VALUES (?, ?, ?, ?)",
                (run_id, config_sha256, dump_json(plan), now_iso()),
            )
            # Only finished runs age out: an unfinished one is what the next apply resumes.
            conn.execute(
                """DELETE FROM runs WHERE finished_at IS NOT NULL
                     AND rowid <= (SELECT max(rowid) FROM runs) - ?""",
                (KEEP_RUNS,),
            )
        return run_id

    def begin_action(
        self, *, run_id: str, op: str, backend: str, canonical: str, model: str
    ) -> int:
        """Journals an action before it starts, so a crash leaves a trace; returns its id."""
        with self._writing() as conn:
            run = conn.execute("SELECT finished_at FROM runs WHERE id = ?", (run_id,)).fetchone()
            if run is None:
                raise ValueError(f"unknown run {run_id}")
            if run["finished_at"] is not None:
                raise ValueError(f"run {run_id} is already finished")
            cursor = conn.execute(
                """INSERT INTO actions (run_id, op, backend, canonical, model, started_at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (run_id, op, backend, canonical, model, now_iso()),
            )
        return cast(int, cursor.lastrowid)

    def finish_action(self, action_id: int, *, outcome: str, error: str | None = None) -> None:
        """Closes a journaled action; ``outcome`` is ``ok``, ``failed`` or ``skipped``."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        with self._writing() as conn:
            cursor = conn.execute(
                """UPDATE actions SET finished_at = ?, outcome = ?, error = ?
                   WHERE id = ? AND finished_at IS NULL""",
                (now_iso(), outcome, error, action_id),
            )
            if cursor.rowcount == 0:
                raise ValueError(f"action {action_id} is unknown or already finished")

    def finish_run(self, run_id: str, *, converged: bool) -> None:
        with self._writing() as conn:
            cursor = conn.execute(
                """UPDATE runs SET finished_at = ?, converged = ?
                   WHERE id = ? AND finished_at IS NULL""",
                (now_iso(), converged, run_id),
            )
            if cursor.rowcount == 0:
                raise ValueError(f"run {run_id} is unknown or already finished")

    def unfinished_actions(self) -> list[JournalEntry]:
        """Actions begun but never finished, across all runs, oldest first."""

        def query(conn: sqlite3.Connection) -> list[JournalEntry]:
            rows = conn.execute(
                """SELECT id, run_id, op, backend, canonical, model, started_at
                   FROM actions WHERE finished_at IS NULL ORDER BY id"""
            ).fetchall()
            return [
                JournalEntry(
                    id=integer(row, "id"),
                    run_id=text(row, "run_id"),
                    op=text(row, "op"),
                    backend=text(row, "backend"),
                    canonical=text(row, "canonical"),
                    model=text(row, "model"),
                    started_at=text(row, "started_at"),
                )
                for row in rows
            ]

        return self._read(query)

    def close_unfinished(self, *, note: str) -> int:
        """Marks every unfinished action ``interrupted`` with ``note``; returns how many.

        Their runs are closed as not converged, since nobody is left to finish them.
        """
        now = now_iso()
        with self._writing() as conn:
            conn.execute(
                """UPDATE runs SET finished_at = ?, converged = 0
                   WHERE finished_at IS NULL
                     AND id IN (SELECT run_id FROM actions WHERE finished_at IS NULL)""",
                (now,),
            )
            cursor = conn.execute(
                """UPDATE actions SET finished_at = ?, outcome = ?, error = ?
                   WHERE finished_at IS NULL""",
                (now, INTERRUPTED, note),
            )
        return cursor.rowcount
