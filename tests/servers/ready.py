"""Waiting for a test server subprocess to print its ``READY …`` line (shared by the harnesses)."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

READY_TIMEOUT_S = 10.0


class Closing:
    """``with harness:`` stops the server (and its client) on the way out, error or not."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ServerStartError(RuntimeError):
    """The server exited or stayed silent instead of printing READY."""


def read_ready_line(
    proc: subprocess.Popen[bytes],
    *,
    what: str,
    stderr: Callable[[], str],
    give_up: Callable[[], None],
    timeout: float = READY_TIMEOUT_S,
) -> str:
    """The first stdout line of ``proc``; on exit or timeout, ``give_up()`` and raise."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            code = proc.poll()
            give_up()
            raise ServerStartError(f"{what} did not become ready (exit {code}):\n{stderr()}")
        if select.select([fd], [], [], min(left, 0.1))[0]:
            buf += os.read(fd, 4096)  # b"" at EOF: the poll() above then sees the exit
    return buf.split(b"\n", 1)[0].decode()
