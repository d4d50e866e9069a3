"""One connection shared by the store's parts, and the short transactions they run on it.

Every write is one ``BEGIN IMMEDIATE`` transaction so that the daemon and a CLI can share the
file; reads are single statements and never wait for writers (WAL).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

from reconciler.errors import StateError
from state import clock
from state.database import DB_NAME


class Session:
    """An open connection to ``state.db``; the store's parts build on it."""

    def __init__(self, conn: sqlite3.Connection, *, state_dir: Path) -> None:
        conn.row_factory = sqlite3.Row
        self._conn = conn
        # One connection may be shared by the daemon's threads; a transaction must not
        # interleave with another thread's statements.
        self._mutex = threading.RLock()
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._mutex, self._translated():
            yield self._conn

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._mutex, self._translated():
            # IMMEDIATE takes the write lock now, so a busy database is waited for
            # (busy_timeout) instead of failing when a read would turn into a write.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (disk full): a transaction left open would make
                # every later write fail with "cannot start a transaction within a transaction".
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.IntegrityError):
            # Misuse of the API (a closed store, a broken constraint) is a bug, not a state
            # problem the user could fix.
            raise
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"state database {self.path} failed ({exc}); check the disk and its "
                "permissions, or stop other infernet processes that may be stuck writing"
            ) from exc


def now_iso() -> str:
    return clock.iso(clock.now())


def dump_json(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and the control plane would reject it later.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def load_dict(text: str) -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(text))
