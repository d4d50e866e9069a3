"""``infernet watch``: the node's steady state.

One thread acts; others only wake it. The main loop waits on a queue fed by

* watchdog, watching the config file's directory (and its symlink target's), so atomic-rename
  saves, ``git pull`` replacing the file and symlink swaps are all seen; bursts are debounced
  and the last content wins;
* ``schedule``, which fires a tick every ``heartbeat_interval`` (with jitter): drift check
  (self-heal or report), heartbeat, remote-command poll;
* signals: SIGTERM/SIGINT stop (a pull in flight is cancelled; Ollama resumes it later), SIGHUP
  re-reads the file.

Whatever a step raises — a bug, input nobody foresaw — stops at the boundary around each step
(reconcile, command poll): it is logged once in one line (the traceback goes to a crash report
in the state dir), shown by ``status``, sent in the heartbeat's ``reconciler.errors``, and the
step backs off like a failed action while the daemon goes on with the desired state in force.

SIGTERM is honoured within 5 s whatever the main thread is blocked in (a peer trickling bytes,
a long pull, a lock wait): a stop watchdog thread, woken by the signal itself through
``signal.set_wakeup_fd`` (Python runs handlers only between bytecodes of the main thread),
gives the main thread ``STOP_GRACE`` seconds to stop by itself; then it sends the offline
heartbeat and writes the daemon's status itself, each bounded, and ends the process. Nothing is
left half-written: the store is SQLite (a transaction commits whole or not at all), and the
journal rolls an interrupted apply forward on the next start.

An invalid, empty, half-written or deleted file never triggers an action: the last valid desired
state stays in force (it is kept in the state store, so a restart keeps it too), the error is
logged, shown by ``status`` and sent in the heartbeat's extension. The daemon holds the node lock
only while it acts, so ``infernet plan``/``status`` always work and ``infernet apply`` waits.
Failed actions back off per action (2 s × 3ⁿ, at most 5 min), not globally.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from reconciler.controlplane.heartbeat import Heartbeater
from reconciler.converge.session import Session
from reconciler.daemon.backoff import Backoff, Faults
from reconciler.daemon.boundary import Boundary
from reconciler.daemon.commands import CommandRunner, settle_interrupted
from reconciler.daemon.metrics import Metrics
from reconciler.daemon.serve import Serving
from reconciler.daemon.stop import Stopping
from reconciler.daemon.verbs import ReconcileOutcome
from reconciler.daemon.watch import Watching
from reconciler.errors import InfernetError, LockError
from reconciler.events import Event, Kind, Progress, ignore
from reconciler.model import GpuState, Op, Plan
from reconciler.names import key
from reconciler.planning.advertised import now as advertised_now
from reconciler.serving.routes import Routes
from reconciler.serving.runner import JobRunner
from reconciler.serving.throughput import Throughput
from state import StatusKey, clock

log = logging.getLogger("infernet.daemon")

LOCK_WAIT = 5.0  # how long an act waits for an `infernet apply` running from a shell


class Daemon(Boundary, Serving, Stopping, Watching):
    """The watch loop; ``run()`` returns the process exit code."""

    def __init__(
        self,
        config_path: Path,
        state_dir: Path,
        *,
        metrics: Metrics | None = None,
        once: bool = False,
        tick: float | None = None,
    ) -> None:
        self.config_path = config_path
        self.state_dir = state_dir
        self.metrics = metrics or Metrics.disabled()
        self.once = once
        self.tick_seconds = tick
        # SimpleQueue: its put() is safe inside a signal handler, which Python runs on the main
        # thread, possibly while that thread holds a Queue's lock in get() (a deadlock).
        self.wake: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.cancel = threading.Event()
        self.backoff = Backoff()
        self.session: Session | None = None
        self.config_error: str | None = None
        self.last_outcome: str | None = None
        self.drift: list[str] = []
        self._observer: Any = None
        self._runner: CommandRunner | None = None
        self._runner_stale = False  # its heartbeater was replaced: build a new one next tick
        self._retired: list[Heartbeater] = []  # replaced, closed once the runner is done
        self.faults = Faults()
        self._crash_reports = 0
        # What the last heartbeat said, for the one a fault sends when no plan could be made.
        self._last_plan: Plan | None = None
        self._last_gpu = GpuState(source="none", total_bytes=None, free_bytes=None)
        self._advertised: tuple[str, ...] = ()
        self._beat_said: tuple[str, ...] | None = None  # the last heartbeat taken, if it was
        # Stopping: the main thread and the stop watchdog each may say goodbye; only one does.
        self._goodbye = threading.Lock()
        self._finished = threading.Event()  # the main thread's shutdown is complete
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1
        # Serving: the job runner (started after the first reconcile) and its routes.
        self._jobs: JobRunner | None = None
        self._jobs_client: object | None = None
        self._routes = Routes()
        self._throughput = Throughput()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Start, reconcile, then serve events until stopped."""
        import schedule

        first = self._load_initial()
        self.session = Session.open(first, self.state_dir)
        self.session.config_error = self.config_error
        self._install_signals()
        self._watch()
        interval = self.tick_seconds or (
            first.control_plane.heartbeat_interval if first.control_plane else 30.0
        )
        scheduler = schedule.Scheduler()
        # schedule counts whole seconds; the jitter spreads a fleet's beats over ~10 %.
        latest = max(1, round(interval))
        scheduler.every(max(1, round(interval * 0.9))).to(latest).seconds.do(self.wake.put, "tick")
        log.info("watching %s (tick every %.0fs)", self.config_path, interval)
        try:
            self._guarded("serving", self._serve)
            self._guarded("reconcile", lambda: self.reconcile("start"))
            self.tick()
            while not self.stopping.is_set() and not self.once:
                self._close_retired()
                scheduler.run_pending()
                wait = scheduler.idle_seconds
                try:
                    reason = self.wake.get(timeout=max(0.05, min(wait or 1.0, 1.0)))
                except queue.Empty:
                    continue
                if reason.startswith("stop:"):
                    self.wake.put(reason)  # _shutdown says which signal
                    break
                self._handle(reason)
        finally:
            self._shutdown()
        return 0

    def _handle(self, reason: str) -> None:
        if reason == "file":
            log.debug("file event on %s", self.config_path)
            self._debounce()
            self._guarded("reconcile", self._file_changed, retry_now=True)
        elif reason == "hup":
            log.info("SIGHUP: re-reading %s", self.config_path)
            self._guarded("reconcile", self._hup, retry_now=True)
        elif reason == "tick":
            self.tick()

    def _file_changed(self) -> None:
        if self.reload():
            self.reconcile("file changed")

    def _hup(self) -> None:
        self.reload(force=True)
        self.reconcile("SIGHUP")

    def _close_retired(self) -> None:
        """Close heartbeaters replaced by a control_plane edit, once no command uses them."""
        while self._retired:
            self._retired.pop().close()

    # ------------------------------------------------------------------ desired state

    def reconcile(
        self,
        why: str,
        *,
        progress: Progress = ignore,
        cancel: threading.Event | None = None,
        force_remove: frozenset[str] = frozenset(),
        heal: bool = True,
    ) -> ReconcileOutcome:
        """Observe, plan, and (unless only reporting drift) apply, under the node lock."""
        assert self.session is not None
        session = self.session
        started = time.monotonic()
        self._keep_valid()
        try:
            with session.lock_within("watch", LOCK_WAIT):
                # Commands a crash cut off are settled before anything is planned: an install
                # the restarted daemon answers "failed" must leave the file, not be pulled.
                busy = self._runner.busy if self._runner is not None else frozenset()
                settle_interrupted(session.store, self.config_path, busy=busy)
                # The file is read again under the lock: a writer that held it (an apply or a
                # model install from a shell) may have changed it since the event that woke
                # us, and applying the version read before would undo that writer's work.
                self.reload()
                session = self.session
                # record: ownership facts (protections, finished pulls) are kept even when
                # the plan turns out to be empty.
                observed, full = session.observe_and_plan(force_remove=force_remove, record=True)
                # What is advertised comes from the whole plan: a pull that is backing off is
                # still pending, and its model is not installed (``planning.advertised``).
                plan, held = self.backoff.filter(full)
                self.drift = [f"{a.op.value} {a.model}" for a in plan.actions]
                self.metrics.drift(len(plan.actions))
                b = plan.budget
                self.metrics.vram(
                    total=b.vram_total_bytes,
                    pinned=b.vram_pinned_bytes,
                    largest_swap_in=b.largest_swap_in_bytes,
                    reserve=b.reserve_bytes,
                )
                if plan.errors:
                    for error in plan.errors:
                        log.error("plan refused: %s", error)
                    self._beat(full, observed, converged=False)
                    self._serve_routes(full, observed)
                    return self._done("failed", started, plan.errors[0], full)
                if not heal or not (plan.actions or plan.checks):
                    if plan.actions:
                        log.warning("drift (self_heal is off): %s", "; ".join(self.drift))
                    self._beat(full, observed, converged=not plan.actions and not held)
                    self._serve_routes(full, observed)
                    outcome = "converged" if not plan.actions else "not_converged"
                    return self._done(outcome, started, None, full)
                log.info("reconciling (%s): %s", why, "; ".join(self.drift) or "canaries")
                removals = [a for a in plan.actions if a.op is Op.REMOVE]
                removed = frozenset(key(a.backend, a.canonical) for a in removals)
                try:
                    result = session.apply(
                        plan,
                        observed,
                        progress=self._progress(progress),
                        cancel=cancel or self.cancel,
                        drain=self._drain_jobs,
                    )
                finally:
                    self._undrain_jobs(removed)
                if result.final is not None and result.observed is not None:
                    self._serve_routes(result.final, result.observed)
        except LockError as exc:
            log.warning("%s; will try again on the next tick", str(exc).splitlines()[0])
            return self._done("skipped_locked", started, str(exc), None)
        except InfernetError as exc:
            log.error("%s", exc)
            return self._done("failed", started, str(exc), None)
        if result.heartbeat is not None:
            self.metrics.heartbeat(ok=result.heartbeat)
        for done in result.outcomes:
            self.metrics.action(op=done.action.op.value, outcome=done.result)
            if done.result == "failed":
                delay = self.backoff.failed(done.action)
                log.error(
                    "%s %s failed: %s (next try in %.0fs)",
                    done.action.op.value,
                    done.action.model,
                    done.error,
                    delay,
                )
            elif done.result == "ok":
                self.backoff.succeeded(done.action)
        verdict = "converged" if result.converged else "not_converged"
        first_error = result.failed[0].error if result.failed else None
        return self._done(verdict, started, first_error, result.final, advertised=result.advertised)

    def _progress(self, outer: Progress, *, routine: bool = False) -> Progress:
        """Progress events as log lines; ``routine``: an ok note is a debug line (a tick's
        heartbeat saying what the last one said)."""
        ok_level = logging.DEBUG if routine else logging.INFO

        def report(event: Event) -> None:
            if event.kind is Kind.FINISHED and event.action is not None:
                log.info(
                    "%s %s: %s%s",
                    event.action.op.value,
                    event.action.model,
                    event.outcome,
                    f" ({event.message})" if event.message else "",
                )
                if event.action.op in (Op.PULL, Op.UPDATE) and event.outcome == "ok":
                    self.metrics.bytes_pulled(event.action.download_bytes or 0)
            elif event.kind is Kind.NOTE and event.message:
                # A failed heartbeat means the network routes nothing here: not an info line.
                log.log(
                    logging.WARNING if event.outcome == "failed" else ok_level,
                    "%s",
                    event.message,
                )
            outer(event)

        return report

    def _beat(self, plan: Plan, observed: Any, *, converged: bool) -> None:
        assert self.session is not None
        self._last_plan, self._last_gpu = plan, observed.gpu
        # Every tick beats (2,880 a day at 30 s): only one that says something new — another
        # list, the first, the first after a failure — is an info line; failures are warnings.
        served = advertised_now(plan, self.session.desired)
        routine = served == self._beat_said
        beat = self.session.heartbeat(
            plan, observed, converged=converged, progress=self._progress(ignore, routine=routine)
        )
        if beat is not None:
            self.metrics.heartbeat(ok=beat)
        self._beat_said = served if beat else None

    def _done(
        self,
        outcome: str,
        started: float,
        error: str | None,
        plan: Plan | None,
        *,
        advertised: tuple[str, ...] | None = None,
    ) -> ReconcileOutcome:
        seconds = time.monotonic() - started
        log.debug("reconcile done: %s in %.0f ms", outcome, seconds * 1000)
        self.last_outcome = outcome
        self.metrics.reconcile(outcome=outcome, seconds=seconds)
        self._status()
        if advertised is None and plan is not None and self.session is not None:
            advertised = advertised_now(plan, self.session.desired)
        if plan is not None:
            self._last_plan, self._advertised = plan, advertised or ()
        return ReconcileOutcome(outcome == "converged", advertised or (), error)

    def tick(self) -> None:
        """Drift check (self-heal or report), heartbeat, and the remote-command poll."""
        assert self.session is not None
        heal = self.session.desired.policy.self_heal
        self._guarded("reconcile", lambda: self.reconcile("tick", heal=heal))
        self._guarded("commands", self._run_commands)
        self._guarded("serving", self._serve)  # follow a control plane or jobs edit

    def _run_commands(self) -> None:
        runner = self._command_runner()
        if runner is not None:
            runner.run_pending()
        self._close_retired()

    def _command_runner(self) -> CommandRunner | None:
        session = self.session
        if self._runner_stale:
            self._runner, self._runner_stale = None, False
        if session is None or session.heartbeater is None:
            return None
        if self._runner is None:
            try:
                client = session.heartbeater.client()
            except InfernetError as exc:
                log.error("remote commands disabled: %s", exc)
                return None

            def reconcile(
                progress: Progress, cancel: threading.Event, force: frozenset[str]
            ) -> ReconcileOutcome:
                self.reload()
                return self.reconcile(
                    "remote command", progress=progress, cancel=cancel, force_remove=force
                )

            self._runner = CommandRunner(
                client=client,
                store=session.store,
                config_path=self.config_path,
                reconcile=reconcile,
            )
        return self._runner

    def _status(self, *, running: bool = True) -> None:
        """What ``infernet status`` shows about the daemon."""
        if self.session is None:
            return
        self.session.store.put_status(
            StatusKey.DAEMON,
            {
                "pid": os.getpid(),
                "running": running,
                "at": clock.stamp(),
                "config_valid": self.config_error is None,
                "config_error": self.config_error,
                "last_outcome": self.last_outcome,
                "drift": self.drift,
                "errors": list(self.faults.reasons.values()),
            },
        )


__all__ = ["Daemon"]
