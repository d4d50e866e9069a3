"""The node lock across processes: waiting, failing with the holder named, dead holders."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from reconciler.errors import LockError
from state import LockHolder, NodeLock

HOLD = """
import sys
from pathlib import Path
from state import NodeLock
lock = NodeLock(Path(sys.argv[1]), purpose=sys.argv[2])
lock.acquire(timeout=10)
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""

TRY = """
import sys
from pathlib import Path
from reconciler.errors import LockError
from state import NodeLock
lock = NodeLock(Path(sys.argv[1]), purpose="apply")
try:
    lock.acquire(timeout=float(sys.argv[2]))
except LockError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
lock.release()
"""

SINCE = r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@contextmanager
def holder_process(
    state_dir: Path, env: dict[str, str], purpose: str = "watch"
) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(state_dir), purpose],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "locked"
            yield child
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)


def _let_go(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


def test_second_process_waits_then_fails_naming_the_holder(
    state_dir: Path, child_env: dict[str, str]
) -> None:
    with holder_process(state_dir, child_env, purpose="watch") as child:
        lock = NodeLock(state_dir, purpose="apply")
        started = time.monotonic()
        with pytest.raises(LockError) as info:
            lock.acquire(timeout=0.6)
        assert time.monotonic() - started >= 0.6
        message = str(info.value)
        assert "\n" not in message
        assert re.search(
            rf"^another infernet \(PID {child.pid}, 'watch', {SINCE}\) holds the node lock in "
            + re.escape(str(state_dir))
            + "; wait for it or stop it; the daemon is running: edit infernet.yaml and it will "
            "reconcile, or stop it with systemctl stop infernet-watch$",
            message,
        ), message
        assert not lock.held

        _let_go(child)
        lock.acquire(timeout=10)
        try:
            assert lock.held
            holder = NodeLock.holder(state_dir)
            assert holder is not None
            assert (holder.pid, holder.purpose) == (os.getpid(), "apply")
        finally:
            lock.release()


def test_waiting_acquirer_gets_the_lock_when_the_holder_exits(
    state_dir: Path, child_env: dict[str, str]
) -> None:
    with holder_process(state_dir, child_env) as child:
        timer = threading.Timer(0.5, _let_go, args=(child,))
        timer.start()
        try:
            started = time.monotonic()
            with NodeLock(state_dir, purpose="apply", timeout=20) as lock:
                assert lock.held
                assert time.monotonic() - started >= 0.4
        finally:
            timer.join()
        assert child.wait(timeout=30) == 0


def test_holder_killed_with_sigkill_frees_the_lock(
    state_dir: Path, child_env: dict[str, str]
) -> None:
    with holder_process(state_dir, child_env, purpose="watch") as child:
        holder = NodeLock.holder(state_dir)
        assert holder is not None
        assert holder.pid == child.pid
        assert holder.purpose == "watch"
        assert holder.argv[0] == "-c"
        assert holder.argv[1:] == (str(state_dir), "watch")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", holder.since)

        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL

    # The dead holder's details are still in the file, but the kernel released its flock.
    assert "watch" in (state_dir / "lock").read_text()
    assert NodeLock.holder(state_dir) is None
    with NodeLock(state_dir, purpose="apply", timeout=5) as lock:
        assert lock.held


def test_other_process_fails_while_this_one_holds(
    state_dir: Path, child_env: dict[str, str]
) -> None:
    with NodeLock(state_dir, purpose="apply", timeout=0):
        result = subprocess.run(
            [sys.executable, "-c", TRY, str(state_dir), "0.3"],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 3, result.stderr
        assert f"(PID {os.getpid()}, 'apply', since " in result.stderr
        assert "systemctl" not in result.stderr
    # Released: the same child now gets it at once.
    result = subprocess.run(
        [sys.executable, "-c", TRY, str(state_dir), "0"],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_second_lock_in_the_same_process_is_refused(state_dir: Path) -> None:
    with (
        NodeLock(state_dir, purpose="watch", timeout=0),
        pytest.raises(LockError, match=f"PID {os.getpid()}, 'watch'"),
    ):
        NodeLock(state_dir, purpose="apply").acquire(timeout=0)


def test_holder_is_none_when_free(state_dir: Path) -> None:
    assert NodeLock.holder(state_dir) is None
    lock = NodeLock(state_dir, purpose="apply")
    lock.acquire(timeout=0)
    holder = NodeLock.holder(state_dir)
    assert isinstance(holder, LockHolder)
    assert holder.argv == tuple(sys.argv)
    lock.release()
    assert NodeLock.holder(state_dir) is None
    assert (state_dir / "lock").read_text() == ""


def test_lock_creates_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    with NodeLock(state_dir, purpose="apply"):
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((state_dir / "lock").stat().st_mode) == 0o600


def test_release_is_idempotent_and_double_acquire_is_a_bug(state_dir: Path) -> None:
    lock = NodeLock(state_dir, purpose="apply")
    lock.release()
    lock.acquire(timeout=0)
    with pytest.raises(RuntimeError):
        lock.acquire(timeout=0)
    lock.release()
    lock.release()
    assert not lock.held
    # Usable again after release.
    lock.acquire(timeout=0)
    lock.release()


def test_holder_without_details_is_reported_as_unknown(state_dir: Path) -> None:
    state_dir.mkdir()
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Locked but never described: a holder that died between flock and write, or a
        # foreign tool.
        fcntl.flock(fd, fcntl.LOCK_EX)
        holder = NodeLock.holder(state_dir)
        assert holder == LockHolder(pid=None, purpose="unknown", since="unknown", argv=())
        with pytest.raises(LockError, match="PID unknown"):
            NodeLock(state_dir, purpose="apply").acquire(timeout=0)
    finally:
        os.close(fd)
