"""The jobs this node took from the control plane, so each is run once and answered once.

The control plane returns an assigned job on every poll until it is completed, and its
``complete`` is not idempotent (a second call overwrites the first). So a job id is entered
(``running``) before the job runs; its answer (the ``complete`` body) is written here
(``finished``) before it is sent, and the job is marked reported only after a 2xx. A job found
``running`` after a restart was cut off: it is answered ``failed``, never run again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
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
from state.records import JobRecord

JOB_STATES = frozenset({"running", "finished"})
KEEP_JOBS = 1000  # reported jobs remembered (a job polled again after its answer is not rerun)


class JobBook(Connection):
    """The store's job part; see :class:`state.store.Store`."""

    def job_begin(self, job_id: str, *, model: str | None) -> bool:
        """Enter a job as ``running``; False when its id is known: do not run it again."""
        return job_id in self.jobs_begin([(job_id, model)])

    def jobs_begin(self, jobs: Sequence[tuple[str, str | None]]) -> set[str]:
        """Enter a poll's jobs (id, model) as ``running`` in one transaction, so a poll of 8
        costs one commit, not 8; returns the ids entered now (the others: do not run again)."""
        now = now_iso()
        entered: set[str] = set()
        with self._writing() as conn:
            for job_id, model in jobs:
                cursor = conn.execute(
                    """INSERT INTO jobs (id, model, state, received_at, updated_at)
                       VALUES (?, ?, 'running', ?, ?)
                       ON CONFLICT (id) DO NOTHING""",
                    (job_id, model, now, now),
                )
                if cursor.rowcount == 1:
                    entered.add(job_id)
            conn.execute(
                """DELETE FROM jobs WHERE reported_at IS NOT NULL
                     AND rowid <= (SELECT max(rowid) FROM jobs) - ?""",
                (KEEP_JOBS,),
            )
        return entered

    def job_seen(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when this node never took it (or forgot it)."""

        def query(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _job(row)

        return self._read(query)

    def job_finish(self, job_id: str, answer: dict[str, Any]) -> None:
        """Keep the job's answer until it is reported (``job_reported``)."""
        with self._writing() as conn:
            cursor = conn.execute(
                """UPDATE jobs SET state = 'finished', answer = ?, updated_at = ?,
                                   reported_at = NULL
                   WHERE id = ? AND reported_at IS NULL""",
                (dump_json(answer), now_iso(), job_id),
            )
            if cursor.rowcount == 0:
                raise ValueError(f"job {job_id} is unknown or already answered")

    def job_reported(self, job_id: str) -> None:
        """The job's answer reached the control plane (or nobody there awaits it)."""
        with self._writing() as conn:
            conn.execute("UPDATE jobs SET reported_at = ? WHERE id = ?", (now_iso(), job_id))

    def jobs_unreported(self) -> list[JobRecord]:
        """Jobs still owed an answer, oldest first: running (or cut off), or finished."""

        def query(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE reported_at IS NULL ORDER BY rowid"
            ).fetchall()
            return [_job(row) for row in rows]

        return self._read(query)


def _job(row: sqlite3.Row) -> JobRecord:
    state = text(row, "state")
    if state not in JOB_STATES:
        raise Unreadable(f"job state {state[:40]!r} is not one this store writes")
    return JobRecord(
        job_id=text(row, "id"),
        model=text_or_none(row, "model"),
        state=state,
        answer=None if row["answer"] is None else load_dict(row["answer"]),
        received_at=text(row, "received_at"),
        reported_at=text_or_none(row, "reported_at"),
    )
