"""The state store: one SQLite database that outlives every run of infernet.

It remembers what the tool owns (and so may prune), what each apply did, which actions an
interrupted apply left half-done (:mod:`state.journal`), small caches, the daemon's status, and
the remote-command ledger (:mod:`state.ledger`) and the jobs taken from the control plane
(:mod:`state.jobs`).

Caller mistakes (an unknown id, a bad outcome) raise ``ValueError``: they are bugs. A database
that cannot be used raises :class:`reconciler.errors.StateError`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from state import clock
from state.connection import (
    dump_json,
    integer,
    integer_or_none,
    load_json,
    now_iso,
    text,
    text_or_none,
    timestamp,
)
from state.database import open_database
from state.jobs import JobBook
from state.journal import Journal
from state.keys import StatusKey
from state.ledger import Ledger
from state.location import ensure_state_dir
from state.records import OwnedRecord


class Store(Journal, Ledger, JobBook):
    """An open state database; use :meth:`open`, then :meth:`close` or a ``with`` block.

    ``rebuilt`` is a one-line notice when the database was unusable, moved aside and
    replaced by an empty one (during :meth:`open`, or by a later read that met damage, see
    :mod:`state.connection`); otherwise ``None``.
    """

    def __init__(self, conn: sqlite3.Connection, *, state_dir: Path, rebuilt: str | None) -> None:
        super().__init__(conn, state_dir=state_dir, rebuilt=rebuilt)

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Opens ``state_dir/state.db``, creating the directory (0700) and database if needed."""
        ensure_state_dir(state_dir)
        conn, rebuilt = open_database(state_dir)
        return cls(conn, state_dir=state_dir, rebuilt=rebuilt)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- ownership --------------------------------------------------------------------------

    def owned(self) -> list[OwnedRecord]:
        """Every model this tool installed, by backend then canonical name."""
        return self._read(_owned)

    def record_installed(
        self, *, backend: str, canonical: str, name: str, digest: str | None
    ) -> None:
        """Marks a model as installed by us; ``installed_at`` moves only when the digest does."""
        with self._writing() as conn:
            conn.execute(
                """INSERT INTO owned (backend, canonical, name, digest, installed_at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (backend, canonical) DO UPDATE SET
                       name = excluded.name,
                       digest = excluded.digest,
                       installed_at = CASE WHEN owned.digest IS excluded.digest
                                           THEN owned.installed_at
                                           ELSE excluded.installed_at END""",
                (backend, canonical, name, digest, now_iso()),
            )
            if digest is not None:
                # New weights under the same name: the old VRAM measurement no longer applies.
                conn.execute(
                    """DELETE FROM measured_vram
                       WHERE backend = ? AND canonical = ? AND digest IS NOT NULL
                         AND digest != ?""",
                    (backend, canonical, digest),
                )

    def record_removed(self, *, backend: str, canonical: str) -> None:
        """Forgets ownership (and our pin) of a model whose weights were deleted."""
        with self._writing() as conn:
            conn.execute(
                "DELETE FROM owned WHERE backend = ? AND canonical = ?", (backend, canonical)
            )
            conn.execute(
                "DELETE FROM pins WHERE backend = ? AND canonical = ?", (backend, canonical)
            )

    def forget_owned(self, *, backend: str, canonical: str) -> bool:
        """Stop owning a model without touching it (``infernet state forget``): prune then
        treats it as any model infernet did not install. Only the ownership row goes: a pin
        or a protection stays what it is. False when it was not owned."""
        with self._writing() as conn:
            gone = conn.execute(
                "DELETE FROM owned WHERE backend = ? AND canonical = ?", (backend, canonical)
            ).rowcount
        return bool(gone)

    def set_pinned(self, *, backend: str, canonical: str, pinned: bool) -> None:
        """Records that we pinned (or unpinned) a model; it need not be one we own."""
        with self._writing() as conn:
            if pinned:
                conn.execute(
                    """INSERT INTO pins (backend, canonical, pinned_at) VALUES (?, ?, ?)
                       ON CONFLICT (backend, canonical) DO NOTHING""",
                    (backend, canonical, now_iso()),
                )
            else:
                conn.execute(
                    "DELETE FROM pins WHERE backend = ? AND canonical = ?", (backend, canonical)
                )

    def record_measured_vram(
        self, *, backend: str, canonical: str, size_vram: int, digest: str | None = None
    ) -> None:
        """Keeps the VRAM a loaded model really used, for any model, owned or not.

        Pass the digest when known: a later :meth:`record_installed` with other weights then
        drops the measurement instead of trusting it for a different file.
        """
        if size_vram < 0:
            raise ValueError(f"size_vram must be >= 0, got {size_vram}")
        with self._writing() as conn:
            conn.execute(
                """INSERT INTO measured_vram (backend, canonical, digest, size_vram, measured_at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (backend, canonical) DO UPDATE SET
                       digest = excluded.digest,
                       size_vram = excluded.size_vram,
                       measured_at = excluded.measured_at""",
                (backend, canonical, digest, size_vram, now_iso()),
            )

    def measured_vram(self) -> dict[tuple[str, str], int]:
        """Last measured VRAM in bytes by ``(backend, canonical)``."""

        def query(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            rows = conn.execute(
                "SELECT backend, canonical, size_vram FROM measured_vram"
            ).fetchall()
            return {
                (text(row, "backend"), text(row, "canonical")): integer(row, "size_vram")
                for row in rows
            }

        return self._read(query)

    # -- caches -----------------------------------------------------------------------------

    def cache_get(self, kind: str, key: str, *, max_age: float | None = None) -> Any | None:
        """The cached JSON value, or ``None`` when absent or older than ``max_age`` seconds.

        A stored JSON ``null`` reads as absent too.
        """

        def query(conn: sqlite3.Connection) -> Any | None:
            row = conn.execute(
                "SELECT value, stored_at FROM cache WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
            if row is None:
                return None
            value = load_json(row["value"])
            stored_at = timestamp(row, "stored_at")
            if max_age is not None:
                age = (clock.now() - stored_at).total_seconds()
                # A negative age means the clock went back; the entry's age is then unknown.
                if age < 0 or age > max_age:
                    return None
            return value

        return self._read(query)

    def cache_put(self, kind: str, key: str, value: Any) -> None:
        with self._writing() as conn:
            conn.execute(
                """INSERT INTO cache (kind, key, value, stored_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (kind, key) DO UPDATE SET
                       value = excluded.value, stored_at = excluded.stored_at""",
                (kind, key, dump_json(value), clock.iso(clock.now(), precise=True)),
            )

    # -- status -----------------------------------------------------------------------------

    def put_status(self, key: StatusKey, value: Any) -> None:
        """Remember ``value`` (JSON) under ``key`` (a ``StatusKey``), replacing what was there."""
        with self._writing() as conn:
            conn.execute(
                """INSERT INTO status (key, value, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET
                       value = excluded.value, updated_at = excluded.updated_at""",
                (str(key), dump_json(value), now_iso()),
            )

    def get_status(self, key: StatusKey) -> Any | None:
        """What ``key`` holds, or None."""

        def query(conn: sqlite3.Connection) -> Any | None:
            row = conn.execute("SELECT value FROM status WHERE key = ?", (str(key),)).fetchone()
            return None if row is None else load_json(row["value"])

        return self._read(query)


def _owned(conn: sqlite3.Connection) -> list[OwnedRecord]:
    rows = conn.execute(
        """SELECT o.backend, o.canonical, o.name, o.digest, o.installed_at,
                  p.backend IS NOT NULL AS pinned, m.size_vram
           FROM owned AS o
           LEFT JOIN pins AS p ON p.backend = o.backend AND p.canonical = o.canonical
           LEFT JOIN measured_vram AS m
                  ON m.backend = o.backend AND m.canonical = o.canonical
           ORDER BY o.backend, o.canonical"""
    ).fetchall()
    return [
        OwnedRecord(
            backend=text(row, "backend"),
            canonical=text(row, "canonical"),
            name=text(row, "name"),
            digest=text_or_none(row, "digest"),
            installed_at=text(row, "installed_at"),
            pinned_by_us=bool(integer(row, "pinned")),
            measured_vram=integer_or_none(row, "size_vram"),
        )
        for row in rows
    ]
