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

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler import desired as desired_mod
from reconciler.commands import CommandRunner, ReconcileOutcome, settle_interrupted
from reconciler.errors import ConfigError, InfernetError, LockError
from reconciler.events import Event, Kind, Progress, ignore
from reconciler.heartbeat import Heartbeater
from reconciler.metrics import Metrics
from reconciler.model import Action, Desired, GpuState, Op, Plan
from reconciler.names import key
from reconciler.plan import serving
from reconciler.session import LAST_VALID, Session, load_or_last_valid
from state import Store
from state.location import crash_report

log = logging.getLogger("infernet.daemon")

DEBOUNCE = 0.1  # quiet time that ends a burst of file events
DEBOUNCE_MAX = 1.0  # a storm of saves still reconciles at least once a second
LOCK_WAIT = 5.0  # how long an act waits for an `infernet apply` running from a shell
BACKOFF_BASE, BACKOFF_CAP = 2.0, 300.0
DAEMON_STATUS = "daemon"  # state-store status key read by `infernet status`
# After SIGTERM: the main thread has STOP_GRACE s to begin its own goodbye; the offline
# heartbeat gets GOODBYE s; at STOP_DEADLINE the process ends whatever it is blocked in.
# The promise is 5 s; the shipped unit SIGKILLs after 15.
STOP_GRACE, GOODBYE, STOP_DEADLINE = 1.5, 2.0, 4.0
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_MAX_CRASH_REPORTS = 10  # per process: a fault whose wording changes each time can't fill the disk


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Backoff:
    """Per-action failure counts and when each may be tried again."""

    clock: Callable[[], float] = time.monotonic
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def key_of(action: Action) -> str:
        return f"{action.op.value}:{key(action.backend, action.canonical)}"

    def allowed(self, action: Action) -> bool:
        return self.clock() >= self.until.get(self.key_of(action), 0.0)

    def failed(self, action: Action) -> float:
        k = self.key_of(action)
        n = self.failures.get(k, 0) + 1
        self.failures[k] = n
        delay = min(BACKOFF_BASE * 3.0 ** (n - 1), BACKOFF_CAP)
        self.until[k] = self.clock() + delay
        return delay

    def succeeded(self, action: Action) -> None:
        k = self.key_of(action)
        self.failures.pop(k, None)
        self.until.pop(k, None)

    def filter(self, plan: Plan) -> tuple[Plan, list[Action]]:
        """The plan without actions still backing off; removals wait while a pull does."""
        held = [a for a in plan.actions if not self.allowed(a)]
        if not held:
            return plan, []
        pull_held = any(a.op in (Op.PULL, Op.UPDATE) for a in held)
        keep = tuple(
            a for a in plan.actions
            if a not in held and not (pull_held and a.op is Op.REMOVE)
        )  # fmt: skip
        return dataclasses.replace(plan, actions=keep), held


@dataclass
class Faults:
    """What each step of the daemon raised at its boundary (one line), and its backoff.

    Steps back off like failed actions (2 s × 3ⁿ, at most 5 min): a bug that a tick triggers
    every time is met once per backoff, not once per second.
    """

    clock: Callable[[], float] = time.monotonic
    reasons: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)

    def allowed(self, step: str) -> bool:
        return self.clock() >= self.until.get(step, 0.0)

    def failed(self, step: str, reason: str) -> tuple[float, bool]:
        """The delay before ``step`` runs again, and whether ``reason`` is news (to log)."""
        n = self.failures.get(step, 0) + 1
        self.failures[step] = n
        delay = min(BACKOFF_BASE * 3.0 ** (n - 1), BACKOFF_CAP)
        self.until[step] = self.clock() + delay
        news = self.reasons.get(step) != reason
        self.reasons[step] = reason
        return delay, news

    def cleared(self, step: str) -> bool:
        """``step`` ran through; True when it had been failing."""
        self.until.pop(step, None)
        self.failures.pop(step, None)
        return self.reasons.pop(step, None) is not None

    def retry_now(self, step: str) -> None:
        """New input (the file changed, SIGHUP): try at once, still counting failures."""
        self.until.pop(step, None)


class Daemon:
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
        self._kept_sha: str | None = None
        self.faults = Faults()
        self._crash_reports = 0
        # What the last heartbeat said, for the one a fault sends when no plan could be made.
        self._last_plan: Plan | None = None
        self._last_gpu = GpuState(source="none", total_bytes=None, free_bytes=None)
        self._advertised: tuple[str, ...] = ()
        # Stopping: the main thread and the stop watchdog each may say goodbye; only one does.
        self._goodbye = threading.Lock()
        self._finished = threading.Event()  # the main thread's shutdown is complete
        self._wakeup: tuple[int, int] | None = None
        self._old_wakeup_fd = -1

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

    # ------------------------------------------------------------------ the boundary

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
        detail = " ".join(str(exc).split())[:300]
        reason = f"{step} failed: internal error {type(exc).__name__}" + (
            f": {detail}" if detail else ""
        )
        delay, news = self.faults.failed(step, reason)
        if news:
            where = ""
            if self._crash_reports < _MAX_CRASH_REPORTS:
                self._crash_reports += 1
                report = crash_report(self.state_dir, traceback.format_exc())
                where = f"; details in {report}, please report it" if report else ""
            log.error("%s (next try in %.0fs; the desired state in force stays)%s",
                      reason, delay, where)  # fmt: skip
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
            else:
                extension = {"config_sha256": session.desired.source.sha256,
                             "git_commit": session.desired.source.git_commit,
                             "converged": False, "drift": self.drift, "errors": [],
                             "last_apply_at": None, "estimates": []}  # fmt: skip
            extension["errors"] = [*extension.get("errors", []), *errors]
            failed = session.heartbeater.beat(self._advertised, self._last_gpu, extension)
        except Exception as exc:
            failed = f"{type(exc).__name__}: {exc}"
        if failed:
            log.debug("heartbeat with the fault not sent: %s", failed)

    def _debounce(self) -> None:
        """Swallow a burst of file events: wait until quiet (bounded), keep other wake-ups."""
        deadline = time.monotonic() + DEBOUNCE_MAX
        others: list[str] = []
        while time.monotonic() < deadline:
            try:
                reason = self.wake.get(timeout=DEBOUNCE)
            except queue.Empty:
                break
            if reason != "file":
                others.append(reason)
        for reason in others:
            self.wake.put(reason)

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
        threading.Thread(target=self._stop_watchdog, args=(reader,), name="infernet-stop",
                         daemon=True).start()  # fmt: skip

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
        self.stopping.set()
        self.cancel.set()  # pulls in flight are abandoned; the journal rolls them forward
        if not self._finished.wait(STOP_GRACE) and self._goodbye.acquire(blocking=False):
            # The main thread is stuck in something slow and has not begun its goodbye.
            where = _main_thread_at()
            self._say_goodbye(signalled + STOP_DEADLINE - 0.2)
            log.warning("stopping: the main thread did not stop within %.1fs of the signal "
                        "(blocked in %s); ending the process", STOP_GRACE, where)  # fmt: skip
            _exit_now()
        # The main thread is saying goodbye, or done: only the exit itself may still hang (a
        # pull's worker thread joined at interpreter exit).
        time.sleep(max(0.0, signalled + STOP_DEADLINE - time.monotonic()))
        _exit_now()

    def _say_goodbye(self, deadline: float) -> None:
        """The daemon's status (stopped) and the offline heartbeat, side by side, each on its
        own thread and abandoned at ``deadline``: the store may be locked by the stuck main
        thread, the control plane may be the slow peer it is stuck on."""
        session = self.session
        if session is None:
            return
        jobs = [threading.Thread(target=self._safely, args=(lambda: self._status(running=False),),
                                 daemon=True)]  # fmt: skip
        if session.heartbeater is not None:
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
        if session.heartbeater is not None and jobs[-1].is_alive():
            log.warning("offline heartbeat to %s got no answer within %.0fs; stopping anyway",
                        session.heartbeater.settings.url, GOODBYE)  # fmt: skip

    def _watch(self) -> None:
        """watchdog on the file's folder, and its symlink target's folder (git checkouts)."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watched = {self.config_path.absolute(), self.config_path.resolve()}
        names = {str(p) for p in watched}
        daemon = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Opens and read-only closes are our own reads of the file: waking on them
                # would re-read it forever.
                if event.event_type in ("opened", "closed_no_write"):
                    return
                paths = {str(event.src_path), str(getattr(event, "dest_path", "") or "")}
                if paths & names:
                    daemon.wake.put("file")

        self._observer = Observer()
        for folder in {p.parent for p in watched}:
            self._observer.schedule(Handler(), str(folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _shutdown(self) -> None:
        for reason in _drain(self.wake):
            if reason.startswith("stop:"):
                log.info("signal %s: stopping", reason.removeprefix("stop:"))
        if self._observer is not None:
            self._observer.stop()
        session = self.session
        # The stop watchdog may have said goodbye already (this thread was stuck until now).
        if session is not None and self._goodbye.acquire(blocking=False):
            if session.heartbeater is not None:
                self._offline(session.heartbeater)
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
            log.warning("offline heartbeat to %s got no answer within %.0fs; stopping anyway",
                        beats.settings.url, GOODBYE)  # fmt: skip

    def _close_retired(self) -> None:
        """Close heartbeaters replaced by a control_plane edit, once no command uses them."""
        while self._retired:
            self._retired.pop().close()

    # ------------------------------------------------------------------ desired state

    def _load_initial(self) -> Desired:
        """The file, or the last valid one kept in the store when the file is broken now."""
        try:
            first, self.config_error = load_or_last_valid(self.config_path, self.state_dir)
        except InfernetError:
            raise  # nothing valid was ever kept (or no store): there is nothing to serve
        except Exception as exc:  # the validator itself failed on this file: keep the last
            first, self.config_error = self._kept(_unusable(self.config_path, exc))
        if self.config_error:
            log.error("%s; using the last valid version kept in the state store", self.config_error)
        return first

    def _kept(self, message: str) -> tuple[Desired, str]:
        """The last valid text ``watch`` kept, with why the file is not used."""
        with Store.open(self.state_dir) as store:
            kept = store.get_status(LAST_VALID)
        if not isinstance(kept, dict) or not isinstance(kept.get("text"), str):
            raise ConfigError(message)
        return desired_mod.parse(kept["text"], path=str(self.config_path)), message

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file; True when a new valid desired state is now in force."""
        assert self.session is not None
        try:
            fresh = desired_mod.load(self.config_path)
        except Exception as exc:
            # A validator's own failure on this text counts like an invalid file: it must not
            # take the desired state in force (or the daemon) with it.
            if isinstance(exc, ConfigError):
                message = str(exc).splitlines()[0]
            else:
                message = _unusable(self.config_path, exc)
            if message != self.config_error:
                log.error("%s; the last valid desired state stays in force", message)
            self.config_error = message
            self.session.config_error = message
            self.metrics.config_valid(False)
            self._status()
            return False
        self.config_error = None
        self.session.config_error = None
        self.metrics.config_valid(True)
        if not force and fresh.source.sha256 == self.session.desired.source.sha256:
            return False
        before = self.session.heartbeater
        self.session = self.session.with_desired(fresh, retired=self._retired)
        if self.session.heartbeater is not before:
            # The command runner holds the old heartbeater's client; it may be answering a
            # command with it right now (this reload can come from that command's reconcile).
            self._runner_stale = True
        return True

    def _keep_valid(self) -> None:
        """Keep the text of the desired state in force, for a restart while the file is broken.

        The file is re-read and kept only if it still hashes to what is in force: it may have
        turned invalid a moment ago, before its change event was handled.
        """
        assert self.session is not None
        wanted = self.session.desired.source.sha256
        if wanted == self._kept_sha:
            return
        try:
            data = self.config_path.read_bytes()
        except OSError:
            return
        if hashlib.sha256(data).hexdigest() == wanted:
            text = data.decode("utf-8-sig")
            self.session.store.put_status(LAST_VALID, {"at": _now(), "text": text})
            self._kept_sha = wanted

    # ------------------------------------------------------------------ acting

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
                observed, plan = session.observe_and_plan(force_remove=force_remove, record=True)
                plan, held = self.backoff.filter(plan)
                self.drift = [f"{a.op.value} {a.model}" for a in plan.actions]
                self.metrics.drift(len(plan.actions))
                b = plan.budget
                self.metrics.vram(total=b.vram_total_bytes, pinned=b.vram_pinned_bytes,
                                  largest_swap_in=b.largest_swap_in_bytes,
                                  reserve=b.reserve_bytes)  # fmt: skip
                if plan.errors:
                    for error in plan.errors:
                        log.error("plan refused: %s", error)
                    self._beat(plan, observed, converged=False)
                    return self._done("failed", started, plan.errors[0], plan)
                if not plan.actions or not heal:
                    if plan.actions:
                        log.warning("drift (self_heal is off): %s", "; ".join(self.drift))
                    self._beat(plan, observed, converged=not plan.actions and not held)
                    outcome = "converged" if not plan.actions else "not_converged"
                    return self._done(outcome, started, None, plan)
                log.info("reconciling (%s): %s", why, "; ".join(self.drift))
                result = session.apply(
                    plan, observed, progress=self._progress(progress), cancel=cancel or self.cancel
                )
        except LockError as exc:
            log.warning("%s; will try again on the next tick", str(exc).splitlines()[0])
            return self._done("skipped_locked", started, str(exc), None)
        except InfernetError as exc:
            log.error("%s", exc)
            return self._done("failed", started, str(exc), None)
        for done in result.outcomes:
            self.metrics.action(op=done.action.op.value, outcome=done.result)
            if done.result == "failed":
                delay = self.backoff.failed(done.action)
                log.error("%s %s failed: %s (next try in %.0fs)", done.action.op.value,
                          done.action.model, done.error, delay)  # fmt: skip
            elif done.result == "ok":
                self.backoff.succeeded(done.action)
        verdict = "converged" if result.converged else "not_converged"
        first_error = result.failed[0].error if result.failed else None
        return self._done(verdict, started, first_error, result.final, advertised=result.advertised)

    def _progress(self, outer: Progress) -> Progress:
        def report(event: Event) -> None:
            if event.kind is Kind.FINISHED and event.action is not None:
                log.info("%s %s: %s%s", event.action.op.value, event.action.model,
                         event.outcome, f" ({event.message})" if event.message else "")  # fmt: skip
                if event.action.op in (Op.PULL, Op.UPDATE) and event.outcome == "ok":
                    self.metrics.bytes_pulled(event.action.download_bytes or 0)
            elif event.kind is Kind.NOTE and event.message:
                # A failed heartbeat means the network routes nothing here: not an info line.
                log.log(logging.WARNING if event.outcome == "failed" else logging.INFO,
                        "%s", event.message)  # fmt: skip
                if event.message.startswith("heartbeat"):
                    self.metrics.heartbeat(ok=event.outcome != "failed")
            outer(event)

        return report

    def _beat(self, plan: Plan, observed: Any, *, converged: bool) -> None:
        assert self.session is not None
        self._last_plan, self._last_gpu = plan, observed.gpu
        self.session.heartbeat(plan, observed, converged=converged,
                               progress=self._progress(ignore))  # fmt: skip

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
            advertised = serving(plan, self.session.desired)
        if plan is not None:
            self._last_plan, self._advertised = plan, advertised or ()
        return ReconcileOutcome(outcome == "converged", advertised or (), error)

    def tick(self) -> None:
        """Drift check (self-heal or report), heartbeat, and the remote-command poll."""
        assert self.session is not None
        heal = self.session.desired.policy.self_heal
        self._guarded("reconcile", lambda: self.reconcile("tick", heal=heal))
        self._guarded("commands", self._run_commands)

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
                return self.reconcile("remote command", progress=progress, cancel=cancel,
                                      force_remove=force)  # fmt: skip

            self._runner = CommandRunner(
                client=client, store=session.store, config_path=self.config_path,
                reconcile=reconcile,
            )  # fmt: skip
        return self._runner

    def _status(self, *, running: bool = True) -> None:
        """What ``infernet status`` shows about the daemon."""
        if self.session is None:
            return
        self.session.store.put_status(DAEMON_STATUS, {
            "pid": os.getpid(), "running": running, "at": _now(),
            "config_valid": self.config_error is None, "config_error": self.config_error,
            "last_outcome": self.last_outcome, "drift": self.drift,
            "errors": list(self.faults.reasons.values()),
        })  # fmt: skip


__all__ = ["DAEMON_STATUS", "Backoff", "Daemon", "Faults"]


def _unusable(path: Path, exc: Exception) -> str:
    detail = " ".join(str(exc).split())[:200]
    return (
        f"{path}: could not be checked (internal error {type(exc).__name__}: {detail}); "
        "please report it with the file"
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
