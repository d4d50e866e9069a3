"""The boundary around each step of the daemon: whatever a step raises stops here.

A bug or input nobody foresaw is logged once in one line (the traceback goes to a crash report
in the state dir, at most ``MAX_CRASH_REPORTS`` per process), shown by ``status``, sent in the
heartbeat's ``reconciler.errors``, and the step backs off like a failed action while the daemon
goes on with the desired state in force (and keeps serving what it advertised last).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from pathlib import Path

from reconciler.controlplane.heartbeat import report
from reconciler.converge.session import Session
from reconciler.daemon.backoff import Faults
from reconciler.errors import one_line
from reconciler.limits import FAULT_TEXT
from reconciler.model import GpuState, Plan
from state.location import crash_report

log = logging.getLogger("infernet.daemon")

MAX_CRASH_REPORTS = 10  # per process: a fault whose wording changes each time can't fill the disk


class Boundary:
    """The daemon's fault boundary (a part of ``Daemon``)."""

    session: Session | None
    state_dir: Path
    faults: Faults
    drift: list[str]
    _crash_reports: int
    _runner_stale: bool
    _last_plan: Plan | None
    _last_gpu: GpuState
    _advertised: tuple[str, ...]

    def _status(self, *, running: bool = True) -> None:
        raise NotImplementedError

    def _guarded(self, step: str, act: Callable[[], object], *, retry_now: bool = False) -> None:
        """Run one step of the daemon; whatever it raises stops here (see the module's doc)."""
        if retry_now:
            self.faults.retry_now(step)
        if not self.faults.allowed(step):
            if step == "reconcile":
                self._fault_beat()  # still alive, still failing: the control plane hears it
            return
        try:
            act()
        except Exception as exc:
            self._fault(step, exc)
        else:
            if self.faults.cleared(step):
                log.info("%s works again", step)
                self._safely(self._status)

    def _fault(self, step: str, exc: Exception) -> None:
        detail = one_line(str(exc), FAULT_TEXT, mark="")
        reason = f"{step} failed: internal error {type(exc).__name__}" + (
            f": {detail}" if detail else ""
        )
        delay, news = self.faults.failed(step, reason)
        if news:
            where = ""
            if self._crash_reports < MAX_CRASH_REPORTS:
                self._crash_reports += 1
                report = crash_report(self.state_dir, traceback.format_exc())
                where = f"; details in {report}, please report it" if report else ""
            log.error(
                "%s (next try in %.0fs; the desired state in force stays)%s", reason, delay, where
            )
        else:
            log.debug("%s again (next try in %.0fs)", reason, delay)
        self._safely(self._status)
        if step == "reconcile":
            self._fault_beat()
        elif step == "commands":
            self._runner_stale = True  # whatever state it was left in, the next tick starts anew

    def _safely(self, act: Callable[[], object]) -> None:
        """Reporting a fault must not raise a second one (the store may be what broke)."""
        try:
            act()
        except Exception as exc:
            log.debug("while reporting a fault: %s: %s", type(exc).__name__, exc)

    def _fault_beat(self) -> None:
        """A heartbeat carrying the faults in ``reconciler.errors``; it advertises what the last
        heartbeat did, since serving goes on while planning fails."""
        session = self.session
        if session is None or session.heartbeater is None:
            return
        errors = list(self.faults.reasons.values())
        try:
            if self._last_plan is not None:
                extension = session.extension(self._last_plan, converged=False)
                extension["errors"] = [*extension["errors"], *errors]
            else:
                extension = report(
                    session.desired.source,
                    converged=False,
                    the_plan=None,
                    drift=self.drift,
                    errors=errors,
                )
            failed = session.heartbeater.beat(self._advertised, self._last_gpu, extension)
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
        if failed:
            log.debug("heartbeat with the fault not sent: %s", failed)
