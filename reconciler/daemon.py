"""``infernet watch``: the node's steady state.

One thread acts; others only wake it. The main loop waits on a queue fed by

* watchdog, watching the config file's directory (and its symlink target's), so atomic-rename
  saves, ``git pull`` replacing the file and symlink swaps are all seen; bursts are debounced
  and the last content wins;
* ``schedule``, which fires a tick every ``heartbeat_interval`` (with jitter): drift check
  (self-heal or report), heartbeat, remote-command poll;
* signals: SIGTERM/SIGINT stop (a pull in flight is cancelled; Ollama resumes it later), SIGHUP
  re-reads the file.

An invalid, empty, half-written or deleted file never triggers an action: the last valid desired
state stays in force (it is kept in the state store, so a restart keeps it too), the error is
logged, shown by ``status`` and sent in the heartbeat's extension. The daemon holds the node lock
only while it acts, so ``infernet plan``/``status`` always work and ``infernet apply`` waits.
Failed actions back off per action (2 s × 3ⁿ, at most 5 min), not globally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler import desired as desired_mod
from reconciler.commands import CommandRunner, ReconcileOutcome
from reconciler.errors import ConfigError, InfernetError, LockError
from reconciler.events import Event, Kind, Progress, ignore
from reconciler.metrics import Metrics
from reconciler.model import Action, Desired, Op, Plan
from reconciler.names import key
from reconciler.plan import serving
from reconciler.session import LAST_VALID, Session, load_or_last_valid

log = logging.getLogger("infernet.daemon")

DEBOUNCE = 0.1  # quiet time that ends a burst of file events
DEBOUNCE_MAX = 1.0  # a storm of saves still reconciles at least once a second
LOCK_WAIT = 5.0  # how long an act waits for an `infernet apply` running from a shell
BACKOFF_BASE, BACKOFF_CAP = 2.0, 300.0
DAEMON_STATUS = "daemon"  # state-store status key read by `infernet status`


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
        self._kept_sha: str | None = None

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
            self.reconcile("start")
            self.tick()
            while not self.stopping.is_set() and not self.once:
                scheduler.run_pending()
                wait = scheduler.idle_seconds
                try:
                    reason = self.wake.get(timeout=max(0.05, min(wait or 1.0, 1.0)))
                except queue.Empty:
                    continue
                self._handle(reason)
        finally:
            self._shutdown()
        return 0

    def _handle(self, reason: str) -> None:
        if reason == "file":
            log.debug("file event on %s", self.config_path)
            self._debounce()
            if self.reload():
                self.reconcile("file changed")
        elif reason == "hup":
            log.info("SIGHUP: re-reading %s", self.config_path)
            self.reload(force=True)
            self.reconcile("SIGHUP")
        elif reason == "tick":
            self.tick()

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
            # No logging here: a handler interrupting a log call would wait on its lock.
            self.stopping.set()
            self.cancel.set()
            self.wake.put(f"stop:{signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.wake.put("hup"))

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
        if session is not None:
            if session.heartbeater is not None:
                error = session.heartbeater.offline()
                log.info(error or "offline heartbeat sent")
            self._status(running=False)
            session.close()
        self.metrics.close()
        log.info("stopped")

    # ------------------------------------------------------------------ desired state

    def _load_initial(self) -> Desired:
        """The file, or the last valid one kept in the store when the file is broken now."""
        first, self.config_error = load_or_last_valid(self.config_path, self.state_dir)
        if self.config_error:
            log.error("%s; using the last valid version kept in the state store", self.config_error)
        return first

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file; True when a new valid desired state is now in force."""
        assert self.session is not None
        try:
            fresh = desired_mod.load(self.config_path)
        except ConfigError as exc:
            message = str(exc).splitlines()[0]
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
        self.session = self.session.with_desired(fresh)
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
                observed, plan = session.observe_and_plan(force_remove=force_remove)
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
                log.info("%s", event.message)
                if event.message.startswith("heartbeat"):
                    self.metrics.heartbeat(ok=event.outcome != "failed")
            outer(event)

        return report

    def _beat(self, plan: Plan, observed: Any, *, converged: bool) -> None:
        assert self.session is not None
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
        return ReconcileOutcome(outcome == "converged", advertised or (), error)

    def tick(self) -> None:
        """Drift check (self-heal or report), heartbeat, and the remote-command poll."""
        assert self.session is not None
        heal = self.session.desired.policy.self_heal
        self.reconcile("tick", heal=heal)
        runner = self._command_runner()
        if runner is not None:
            runner.run_pending()

    def _command_runner(self) -> CommandRunner | None:
        session = self.session
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
        import os

        self.session.store.put_status(DAEMON_STATUS, {
            "pid": os.getpid(), "running": running, "at": _now(),
            "config_valid": self.config_error is None, "config_error": self.config_error,
            "last_outcome": self.last_outcome, "drift": self.drift,
        })  # fmt: skip


__all__ = ["DAEMON_STATUS", "Backoff", "Daemon"]


def _drain(wake: queue.SimpleQueue[str]) -> list[str]:
    """What is left in the wake-up queue, without waiting."""
    out = []
    while True:
        try:
            out.append(wake.get_nowait())
        except queue.Empty:
            return out
