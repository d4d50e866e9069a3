"""One connection shared by the store's parts, and the short transactions they run on it.

Every write is one ``BEGIN IMMEDIATE`` transaction so that the daemon and a CLI can share the
file; reads are single statements and never wait for writers (WAL).

The store only remembers, so a read that meets damage — a row that does not decode as UTF-8,
a value that is not the JSON or the type we wrote, a page SQLite calls corrupt — is handled the
way opening a damaged file is: the file is set aside, an empty one takes its place (every model
counts as unmanaged, so nothing is pruned), and the read answers from the empty store. A
database another process set aside and replaced is followed on the next statement.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from reconciler.errors import StateError, one_line
from reconciler.limits import DETAIL_TEXT
from state import clock
from state.database import CORRUPTION, DB_NAME, open_database, rebuild_database

T = TypeVar("T")


class Unreadable(ValueError):
    """A stored value is not what this store writes there: the file is damaged."""


class Connection:
    """An open connection to ``state.db``; the store's parts build on it.

    ``rebuilt`` is a one-line notice once the database was found unusable, set aside and
    replaced by an empty one (when opened, or later by a read that met damage); else ``None``.
    """

    def __init__(
        self, conn: sqlite3.Connection, *, state_dir: Path, rebuilt: str | None = None
    ) -> None:
        # One connection may be shared by the daemon's threads; a transaction must not
        # interleave with another thread's statements.
        self._mutex = threading.RLock()
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.rebuilt = rebuilt
        self._closed = False
        self._use(conn)

    def _use(self, conn: sqlite3.Connection) -> None:
        conn.row_factory = sqlite3.Row
        # Strict decoding in Python, not sqlite3's OperationalError: a row that is not UTF-8
        # is then told apart from a database that cannot be used at all.
        conn.text_factory = _decode
        self._conn = conn
        self._file = _identity(self.path)

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            self._conn.close()

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """``query(conn)``: its statements and the decoding of their rows, answered from an
        empty store after setting a damaged file aside (see the module's docstring)."""
        with self._mutex:
            try:
                with self._reading() as conn:
                    return query(conn)
            except (Unreadable, UnicodeDecodeError) as exc:
                # Every value read is one this store wrote; one that doesn't decode or parse
                # as what was written means the file was damaged underneath us. (A query's
                # own bug, a KeyError say, is not taken for damage: it would wipe the store.)
                reason = f"a stored value is unreadable: {_brief(exc)}"
            except StateError as exc:
                if not _damage(exc.__cause__):
                    raise
                reason = _brief(exc.__cause__)
            self._recover(reason)
            with self._reading() as conn:
                return query(conn)

    def _recover(self, reason: str) -> None:
        with self._mutex:
            with suppress(sqlite3.Error):
                self._conn.close()
            conn, self.rebuilt = rebuild_database(self.state_dir, reason, damaged=self._file)
            self._use(conn)

    def _follow(self) -> None:
        """Reopen when another process set the file aside and started a fresh one: statements
        on the old file would be lost with it."""
        if self._closed:
            return  # using a closed store is a bug; sqlite3 says so on the next statement
        now = _identity(self.path)
        if now is None or now == self._file:
            return
        with suppress(sqlite3.Error):
            self._conn.close()
        conn, notice = open_database(self.state_dir)
        replaced = (
            f"state database {self.path} was replaced while in use (another infernet found it "
            "damaged, or it was deleted); no installed model counts as managed by infernet"
        )
        self.rebuilt = notice or self.rebuilt or replaced
        self._use(conn)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._mutex, self._translated():
            self._follow()
            yield self._conn

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._mutex, self._translated():
            self._follow()
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


def load_dict(text: object) -> dict[str, Any]:
    """A JSON object this store wrote; ``Unreadable`` when it is anything else."""
    value = load_json(text)
    if not isinstance(value, dict):
        raise Unreadable(f"expected a JSON object, found {type(value).__name__}")
    return cast(dict[str, Any], value)


def load_json(text: object) -> Any:
    """A JSON document this store wrote; ``Unreadable`` when it is not one."""
    if not isinstance(text, str):
        raise Unreadable(f"expected JSON text, found {type(text).__name__}")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise Unreadable(f"not JSON ({exc})") from exc


def text(row: sqlite3.Row, column: str) -> str:
    """A TEXT column we always fill."""
    value = row[column]
    if not isinstance(value, str):
        raise Unreadable(f"column {column!r} holds {type(value).__name__}, not text")
    return value


def text_or_none(row: sqlite3.Row, column: str) -> str | None:
    return None if row[column] is None else text(row, column)


def integer(row: sqlite3.Row, column: str) -> int:
    """An INTEGER column we always fill."""
    value = row[column]
    if not isinstance(value, int):
        raise Unreadable(f"column {column!r} holds {type(value).__name__}, not an integer")
    return value


def integer_or_none(row: sqlite3.Row, column: str) -> int | None:
    return None if row[column] is None else integer(row, column)


def timestamp(row: sqlite3.Row, column: str) -> datetime:
    """A timestamp column (see :mod:`state.clock`)."""
    value = text(row, column)
    try:
        return clock.parse(value)
    except ValueError as exc:
        raise Unreadable(f"column {column!r} holds no timestamp") from exc


def _decode(data: bytes) -> str:
    return data.decode("utf-8")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _damage(exc: BaseException | None) -> bool:
    """SQLite found a damaged page or a file that is no database."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in CORRUPTION


def _brief(exc: BaseException | None) -> str:
    return one_line(str(exc), DETAIL_TEXT, mark="") or type(exc).__name__
