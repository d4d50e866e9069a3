"""Stopping the daemon within 5 s of SIGTERM, whatever the main thread is blocked in.

A stop watchdog thread, woken by the signal itself through ``signal.set_wakeup_fd`` (Python runs
handlers only between bytecodes of the main thread), gives the main thread ``STOP_GRACE``
seconds to stop by itself; then it sends the offline heartbeat and writes the daemon's status
itself, each bounded, and ends the process.

Jobs in flight change one thing: the offline heartbeat goes first (the router sends nothing
more), then running jobs get ``jobs.drain_timeout`` seconds to finish, the rest are failed "node
shutting down" and every job is answered; the process ends ``STOP_DEADLINE`` seconds after
that drain at the latest (keep the unit's ``TimeoutStopSec`` above ``drain_timeout`` + 10 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.controlplane.heartbeat import Heartbeater
from reconciler.converge.session import Session
from reconciler.daemon.metrics import Metrics

log = logging.getLogger("infernet.daemon")

# After SIGTERM: the main thread has STOP_GRACE s to begin its own goodbye; the offline
# heartbeat gets GOODBYE s; at STOP_DEADLINE the process ends whatever it is blocked in.
# The promise is 5 s; the shipped unit SIGKILLs after 15.
STOP_GRACE, GOODBYE, STOP_DEADLINE = 1.5, 2.0, 4.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class Stopping:
    """The daemon's signal handling and goodbye (a part of ``Daemon``)."""

    wake: queue.SimpleQueue[str]
    stopping: threading.Event
    cancel: threading.Event
    session: Session | None
    metrics: Metrics
    once: bool
    _observer: Any
    _goodbye: threading.Lock
    _finished: threading.Event
    _wakeup: tuple[int, int] | None
    _old_wakeup_fd: int

    def _status(self, *, running: bool = True) -> None:
        raise NotImplementedError

    def _safely(self, act: Callable[[], object]) -> None:
        raise NotImplementedError

    def _close_retired(self) -> None:
        raise NotImplementedError

    def _jobs_busy(self) -> bool:
        raise NotImplementedError

    def _stop_serving(self, timeout: float) -> None:
        raise NotImplementedError

    def _drain_budget(self) -> float:
        """Seconds the running jobs get on a stop: ``jobs.drain_timeout`` while any runs."""
        session = self.session
        if session is None or not self._jobs_busy():
            return 0.0
        return session.desired.jobs.drain_timeout

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: object) -> None:
            # No logging and no Event.set() here: a handler interrupting the main thread while
            # it holds the lock of a log handler or of an Event would wait on it for ever. The
            # stop watchdog sets the events, woken by the signal through the wakeup fd.
            self.wake.put(f"stop:{signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.wake.put("hup"))
        # The C-level handler writes the signal's number here at once, even while the main
        # thread is blocked in a read that will take minutes.
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        self._wakeup = (reader, writer)
        self._old_wakeup_fd = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        threading.Thread(
            target=self._stop_watchdog, args=(reader,), name="infernet-stop", daemon=True
        ).start()

    def _stop_watchdog(self, reader: int) -> None:
        """Wait for SIGTERM/SIGINT; make sure the process is gone ``STOP_DEADLINE`` s later."""
        while True:
            try:
                got = os.read(reader, 64)
            except OSError:
                got = b""
            if not got or 0 in got:  # the daemon stopped on its own (or --once ended)
                os.close(reader)
                return
            if any(n in _STOP_SIGNALS for n in got):
                break
        signalled = time.monotonic()
        drain = self._drain_budget()
        self.stopping.set()
        self.cancel.set()  # pulls in flight are abandoned; the journal rolls them forward
        if not self._finished.wait(STOP_GRACE) and self._goodbye.acquire(blocking=False):
            # The main thread is stuck in something slow and has not begun its goodbye.
            where = _main_thread_at()
            self._say_goodbye(signalled + STOP_DEADLINE - 0.2)
            self._stop_serving(drain)
            log.warning(
                "stopping: the main thread did not stop within %.1fs of the signal "
                "(blocked in %s); ending the process",
                STOP_GRACE,
                where,
            )
            _exit_now()
        # The main thread is saying goodbye (and draining jobs), or done: only the exit itself
        # may still hang (a pull's worker thread joined at interpreter exit).
        time.sleep(max(0.0, signalled + drain + STOP_DEADLINE - time.monotonic()))
        _exit_now()

    def _say_goodbye(self, deadline: float) -> None:
        """The daemon's status (stopped) and the offline heartbeat, side by side, each on its
        own thread and abandoned at ``deadline``: the store may be locked by the stuck main
        thread, the control plane may be the slow peer it is stuck on."""
        session = self.session
        if session is None:
            return
        jobs = [
            threading.Thread(
                target=self._safely, args=(lambda: self._status(running=False),), daemon=True
            )
        ]
        if session.heartbeater is not None and not self.once:
            settings = session.heartbeater.settings

            def offline() -> None:
                # Its own client: the main thread's may be in the middle of a request.
                beats = Heartbeater(settings, session.store)
                try:
                    error = beats.offline()
                    log.info(error or "offline heartbeat sent")
                finally:
                    beats.close()

            jobs.append(threading.Thread(target=self._safely, args=(offline,), daemon=True))
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(max(0.0, min(deadline - time.monotonic(), GOODBYE)))
        if session.heartbeater is not None and len(jobs) > 1 and jobs[-1].is_alive():
            log.warning(
                "offline heartbeat to %s got no answer within %.0fs; stopping anyway",
                session.heartbeater.settings.url,
                GOODBYE,
            )

    def _shutdown(self) -> None:
        for reason in _drain(self.wake):
            if reason.startswith("stop:"):
                log.info("signal %s: stopping", reason.removeprefix("stop:"))
        if self._observer is not None:
            self._observer.stop()
        session = self.session
        # The stop watchdog may have said goodbye already (this thread was stuck until now).
        if session is not None and self._goodbye.acquire(blocking=False):
            # `watch --once` (from cron, a timer) leaves the node as its heartbeat said: an
            # offline beat at every run's end made the node flap between runs.
            if session.heartbeater is not None and not self.once:
                self._offline(session.heartbeater)  # first: the router sends nothing more
            self._safely(lambda: self._stop_serving(self._drain_budget()))
            self._safely(lambda: self._status(running=False))
            self._close_retired()
            session.close()
        self.metrics.close()
        log.info("stopped")
        self._finished.set()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            with contextlib.suppress(OSError):
                os.write(self._wakeup[1], b"\0")  # lets the watchdog thread end
            os.close(self._wakeup[1])
            self._wakeup = None

    def _offline(self, beats: Heartbeater) -> None:
        """The offline heartbeat, given at most ``GOODBYE`` s: a control plane trickling bytes
        must not hold the stop up."""
        outcome: list[str | None] = []

        def send() -> None:
            try:
                outcome.append(beats.offline())
            except Exception as exc:  # closed under it after the timeout: nobody waits now
                outcome.append(f"offline heartbeat failed: {type(exc).__name__}: {exc}")

        job = threading.Thread(target=send, daemon=True)
        job.start()
        job.join(GOODBYE)
        if outcome:
            log.info(outcome[0] or "offline heartbeat sent")
        else:
            log.warning(
                "offline heartbeat to %s got no answer within %.0fs; stopping anyway",
                beats.settings.url,
                GOODBYE,
            )


def _main_thread_at() -> str:
    """Where the main thread is now, for the log line of a forced stop."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "an unknown place"
    code = frame.f_code
    return f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})"


def _exit_now() -> None:
    """End the process at once: threads blocked on a slow peer can't hold it up."""
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):  # nothing left to report it to
            stream.flush()
    os._exit(0)


def _drain(wake: queue.SimpleQueue[str]) -> list[str]:
    """What is left in the wake-up queue, without waiting."""
    out = []
    while True:
        try:
            out.append(wake.get_nowait())
        except queue.Empty:
            return out
