"""The node lock: one writer per node (contract §4 rule 6).

``fcntl.flock`` on ``<state dir>/lock``. The kernel drops the lock when its holder dies,
however it dies, so a lock file left behind by a killed process never blocks anyone; the
file's content (who holds it) is only trusted while the lock is actually held.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from reconciler.errors import LockError, StateError
from state import clock
from state.location import ensure_state_dir, open_private
from state.records import LockHolder

LOCK_NAME = "lock"
_POLL_S = 0.1
# The holder writes its details right after taking the lock; give it that long to finish.
_DETAILS_WAIT_S = 0.5
_WATCH_HINT = (
    "the daemon is running: edit infernet.yaml and it will reconcile, "
    "or stop it with systemctl stop infernet-watch"
)


class NodeLock:
    """Exclusive right to change this node; ``purpose`` (``apply``, ``watch``…) is shown to
    whoever has to wait.

    ``timeout`` is what a ``with`` block waits when :meth:`acquire` was not called first.
    """

    def __init__(self, state_dir: Path, *, purpose: str, timeout: float = 0.0) -> None:
        self.state_dir = state_dir
        self.purpose = purpose
        self.path = state_dir / LOCK_NAME
        self._timeout = timeout
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, timeout: float) -> None:
        """Takes the lock, polling up to ``timeout`` seconds; raises :class:`LockError`."""
        if self._fd is not None:
            raise RuntimeError(f"node lock in {self.state_dir} is already held by this object")
        ensure_state_dir(self.state_dir)
        # os.open makes the descriptor non-inheritable: a backend server started by the
        # daemon must not keep the node locked after the daemon is gone.
        fd = _open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            self._wait_for(fd, timeout)
            _write_details(fd, self.purpose)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Gives the lock up; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Emptied while still locked, so nobody reads our details after we are gone.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        if self._fd is None:
            self.acquire(timeout=self._timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @staticmethod
    def holder(state_dir: Path) -> LockHolder | None:
        """Who holds the node lock, or ``None`` when nobody does."""
        path = state_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the node lock {path} ({exc.strerror})") from exc
        try:
            if _try_lock(fd, fcntl.LOCK_SH, path):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            return _read_details(fd)
        finally:
            os.close(fd)

    def _wait_for(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while not _try_lock(fd, fcntl.LOCK_EX, self.path):
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(min(_POLL_S, remaining))
                continue
            holder = self.holder(self.state_dir)
            # Released between our last try and the look: one more try is only fair.
            if holder is None and _try_lock(fd, fcntl.LOCK_EX, self.path):
                return
            raise LockError(_busy_message(holder, self.state_dir))


def _open(path: Path, flags: int) -> int:
    try:
        return open_private(path, flags)
    except OSError as exc:
        raise StateError(
            f"cannot open the node lock {path} ({exc.strerror}); check the state directory's "
            "permissions or choose another with --state-dir"
        ) from exc


def _try_lock(fd: int, kind: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise StateError(f"cannot lock {path} ({exc.strerror})") from exc
    return True


def _write_details(fd: int, purpose: str) -> None:
    details = {
        "pid": os.getpid(),
        "purpose": purpose,
        "since": clock.iso(clock.now()),
        "argv": list(sys.argv),
    }
    data = (json.dumps(details, ensure_ascii=False) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_details(fd: int) -> LockHolder:
    deadline = time.monotonic() + _DETAILS_WAIT_S
    while True:
        holder = _parse_details(os.pread(fd, 65536, 0))
        if holder is not None or time.monotonic() >= deadline:
            return holder or LockHolder(pid=None, purpose="unknown", since="unknown", argv=())
        time.sleep(0.01)


def _parse_details(data: bytes) -> LockHolder | None:
    try:
        details: Any = json.loads(data)
        return LockHolder(
            pid=int(details["pid"]),
            purpose=str(details["purpose"]),
            since=str(details["since"]),
            argv=tuple(str(arg) for arg in details["argv"]),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _busy_message(holder: LockHolder | None, state_dir: Path) -> str:
    if holder is None:
        return f"another infernet holds the node lock in {state_dir}; wait for it or stop it"
    pid = "unknown" if holder.pid is None else str(holder.pid)
    message = (
        f"another infernet (PID {pid}, {holder.purpose!r}, since {holder.since}) holds the "
        f"node lock in {state_dir}; wait for it or stop it"
    )
    if holder.purpose == "watch":
        message += f"; {_WATCH_HINT}"
    return message
