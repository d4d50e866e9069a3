"""Opening ``state.db``: connection settings, integrity checks, and moving a bad file aside.

The store only remembers things (ownership, history, caches); losing it must never stop the
node. A damaged file is therefore kept for inspection under a new name and replaced by an
empty database, which makes every installed model look unmanaged: nothing gets pruned by
mistake.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reconciler.errors import StateError, one_line
from reconciler.limits import DETAIL_TEXT
from state import clock, schema
from state.location import narrow, open_private

DB_NAME = "state.db"
# Writers keep transactions short, so waiting this long means something is stuck.
BUSY_TIMEOUT_S = 10.0
_SIDECARS = ("-wal", "-shm")
# SQLite's primary result codes for a damaged file (a read may meet them long after opening).
CORRUPTION = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class _Damaged(Exception):
    """The file cannot serve as our database; ``str()`` says why, in a few words."""


def open_database(state_dir: Path) -> tuple[sqlite3.Connection, str | None]:
    """Opens (creating or rebuilding as needed) ``state_dir/state.db``.

    Returns the connection, in autocommit mode, and the one-line rebuild notice or ``None``.
    ``state_dir`` must already exist and be writable.
    """
    path = state_dir / DB_NAME
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StateError(
            f"state database {path} is not readable and writable by this user; "
            "fix its ownership or run infernet as the user that owns it"
        )
    try:
        return _open_checked(path), None
    except _Damaged:
        pass
    # Two processes may find the same damage at once; only one may move the file, and the
    # other must then use the fresh database rather than move it aside as well.
    with _recovery_lock(state_dir):
        try:
            return _open_checked(path), None
        except _Damaged as damage:
            aside = _move_aside(path)
            return _open_checked(path), _notice(path, str(damage), aside)


def rebuild_database(
    state_dir: Path, reason: str, *, damaged: tuple[int, int] | None
) -> tuple[sqlite3.Connection, str]:
    """Set aside the database a read found damaged (``reason``) and open an empty one.

    ``damaged`` is the (device, inode) the reader had open: when ``state.db`` is another file
    by now, a concurrent process already set that one aside, and the fresh file is used.
    The caller must have closed its connection to the damaged file.
    """
    path = state_dir / DB_NAME
    with _recovery_lock(state_dir):
        try:
            now = os.stat(path)
            same = damaged is None or (now.st_dev, now.st_ino) == damaged
        except FileNotFoundError:
            same = False
        if same:
            aside = _move_aside(path)
            return _open_checked(path), _notice(path, reason, aside)
        try:
            conn = _open_checked(path)
        except _Damaged as damage:
            aside = _move_aside(path)
            return _open_checked(path), _notice(path, str(damage), aside)
        notice = (
            f"state database {path} was unusable ({reason}); another infernet already set it "
            "aside and started an empty one, so no installed model counts as managed by infernet"
        )
        return conn, notice


def _notice(path: Path, reason: str, aside: Path) -> str:
    return (
        f"state database {path} was unusable ({reason}); moved it to {aside.name} and "
        "started an empty one, so no installed model counts as managed by infernet"
    )


def _open_checked(path: Path) -> sqlite3.Connection:
    # SQLite would create the file 0644 (and its -wal/-shm like the file): create it 0600
    # first, and narrow what an older version left wider, whatever the folder's mode.
    try:
        os.close(open_private(path, os.O_RDWR))
    except OSError as exc:
        raise StateError(f"state database {path} cannot be created ({exc.strerror})") from exc
    for sidecar in _SIDECARS:
        narrow(path.with_name(path.name + sidecar))
    try:
        conn = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT_S,
            # Autocommit: the store issues BEGIN IMMEDIATE itself so that a writer takes the
            # write lock up front and waits on busy_timeout instead of failing on upgrade.
            isolation_level=None,
            # The daemon may share one Store between threads; Store serialises access itself.
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise StateError(f"state database {path} cannot be opened ({exc})") from exc
    try:
        _configure(conn)
        schema.migrate(conn, path=str(path))
    except schema.SchemaMissing as exc:
        conn.close()
        raise _Damaged(str(exc)) from exc
    except sqlite3.DatabaseError as exc:
        conn.close()
        if exc.sqlite_errorcode & 0xFF in CORRUPTION:
            raise _Damaged(str(exc)) from exc
        raise StateError(f"state database {path} cannot be used ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # Reading every page costs well under a millisecond at this size, and catching damage
    # here beats failing halfway through an apply.
    verdict = conn.execute("PRAGMA quick_check").fetchone()
    if verdict is None or verdict[0] != "ok":
        detail = verdict[0] if verdict else "no answer"
        # Our own verdict, not an sqlite3 error: it has no sqlite_errorcode to classify.
        raise _Damaged(one_line(f"integrity check failed: {detail}", DETAIL_TEXT, mark=""))
    # WAL lets `infernet status` read while the daemon writes, and survives a crash mid-write.
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL, not NORMAL: the journal must still say an action began after a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def _move_aside(path: Path) -> Path:
    stamp = clock.compact(clock.now())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    suffix = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{suffix}")
        suffix += 1
    try:
        path.rename(aside)
        # A WAL from the old file must not be replayed into the new one.
        for sidecar in _SIDECARS:
            old = path.with_name(path.name + sidecar)
            if old.exists():
                old.rename(aside.with_name(aside.name + sidecar))
    except OSError as exc:
        raise StateError(
            f"state database {path} is damaged and cannot be moved aside ({exc.strerror}); "
            "move or delete it by hand"
        ) from exc
    return aside


@contextmanager
def _recovery_lock(state_dir: Path) -> Iterator[None]:
    # Separate from the node lock: the process opening the store may hold that one itself,
    # and flock locks of two descriptors conflict even within one process.
    lock_path = state_dir / f"{DB_NAME}.rebuild-lock"
    try:
        fd = open_private(lock_path, os.O_RDWR)
    except OSError as exc:
        raise StateError(f"cannot create {lock_path} ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
