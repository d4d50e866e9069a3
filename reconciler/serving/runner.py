"""The job runner: run the chat jobs the network routes to this node, each exactly once.

The control plane never claims a job: every poll returns every ``assigned`` job of this node
until it is completed, and ``complete`` is not idempotent (a second call overwrites the first
and repeats its side effects). So:

* an in-flight set (running and waiting ids) and the state store's job book make sure a job
  returned again by the next poll, or after a restart, is never run twice;
* each job gets exactly one ``complete``: its answer is written to the job book first and marked
  reported only after a 2xx, so a crash or an outage neither loses nor repeats it (a restart
  finds a job that was running and answers it ``failed``: "interrupted by a restart");
* a job we do not run (a model not advertised now, a type other than ``chat``, older than
  ``jobs.max_age``, a full node, unreadable input) is answered too, with an ``error`` event (a
  consumer's stream ends only on one) and ``failed``, so it stops coming back;
* at most ``jobs.concurrency`` run at once; up to ``QUEUE_FACTOR`` times as many wait for a slot
  (a burst the router sent on a stale heartbeat), the rest are refused "node full";
* removal drains: a model being removed takes no new job, its running jobs get
  ``drain_timeout`` seconds and are then failed "model removed"; stopping does the same for
  every job ("node shutting down").

Threads: one poller, one per running job (and its event sender). The backend, the control
plane and the job book are injected; this module does no I/O of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.backends.base import ChatRequest, Ending
from reconciler.controlplane.jobs import Delivery, JobCallFailed
from reconciler.errors import InfernetError, one_line
from reconciler.limits import JOB_ERROR, PEER_TEXT
from reconciler.model import JobSettings, ModelKey
from reconciler.serving.events import EventSender
from reconciler.serving.jobs import Job, chat_request, parse_row
from reconciler.serving.routes import Route
from reconciler.serving.throughput import Throughput
from state import JobRecord, clock

log = logging.getLogger("infernet.jobs")

POLL_LIMIT = 25  # the control plane's own maximum per poll
QUEUE_FACTOR = 4  # jobs waiting for a slot, per slot, before "node full"
EVENTS_WAIT = 30.0  # how long a finished job's events may take to go out before its complete
SHUTTING_DOWN = "node shutting down"
REMOVED = "model removed from this node"
INTERRUPTED = "interrupted by a restart of the node"
STOP_POLLER = 2.0  # seconds a stop waits at least for the poller's iteration in flight

Router = Callable[[str], Route | str]
"""An advertised model name → its route, or why it can't be served now (one line)."""


class JobClient(Protocol):
    """The control plane's job routes (``controlplane.jobs.JobRoutes``)."""

    def poll_jobs(self, limit: int) -> list[object]: ...

    def post_job_events(self, job_id: str, events: list[dict[str, Any]]) -> None: ...

    def complete_job(self, job_id: str, answer: dict[str, Any]) -> None: ...


class JobLedger(Protocol):
    """The state store's job book (``state.jobs``)."""

    def jobs_begin(self, jobs: Sequence[tuple[str, str | None]]) -> set[str]: ...

    def job_finish(self, job_id: str, answer: dict[str, Any]) -> None: ...

    def job_reported(self, job_id: str) -> None: ...

    def jobs_unreported(self) -> list[JobRecord]: ...


@dataclass
class _Ticket:
    job: Job
    request: ChatRequest
    route: Route
    cancel: threading.Event = field(default_factory=threading.Event)
    why_cancelled: str = ""


class JobRunner:
    """Polls, runs and answers jobs; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        client: JobClient,
        ledger: JobLedger,
        router: Router,
        settings: JobSettings,
        node_id: str,
        node_name: str | None = None,
        throughput: Throughput | None = None,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.router = router
        self.settings = settings
        self.node_id = node_id
        self.node_name = node_name
        self.throughput = throughput or Throughput()
        self._lock = threading.Condition()
        self._running: dict[str, _Ticket] = {}
        self._queued: deque[_Ticket] = deque()
        self._draining: set[ModelKey] = set()
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        self._poll_failing = False

    # ---- lifecycle

    def start(self) -> None:
        """Answer what a previous run left owed, then poll every ``poll_interval``."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="jobs", daemon=True)
            self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.deliver_owed()
                if self.settings.enabled:
                    self.poll_once()
            except Exception:  # a bug must not end the node's serving
                log.exception("job poll crashed; polling goes on")
            self._stopping.wait(self.settings.poll_interval)

    def stop(self, timeout: float) -> None:
        """Stop polling; refuse what waits; give running jobs ``timeout`` s, then fail them
        "node shutting down"; answer everything owed (within the same time, as it can)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        self._drain_where(lambda _t: True, SHUTTING_DOWN, deadline)
        if self._poller is not None:
            # Its iteration in flight ends first (bounded by the poll's own deadline): the
            # store it answers to may be closed right after this.
            self._poller.join(max(deadline - time.monotonic(), STOP_POLLER))
        self.deliver_owed()

    def busy(self) -> bool:
        """Whether a job is running or waiting (a stop then takes up to ``drain_timeout``)."""
        with self._lock:
            return bool(self._running or self._queued)

    # ---- what the heartbeat reports

    def load(self) -> dict[str, int]:
        """``load.active_jobs`` and ``load.concurrency_cap`` (0 and 0 with jobs off)."""
        if not self.settings.enabled:
            return {"active_jobs": 0, "concurrency_cap": 0}
        with self._lock:
            active = len(self._running) + len(self._queued)
        return {"active_jobs": active, "concurrency_cap": self.settings.concurrency}

    # ---- removal

    def drain(self, keys: Collection[ModelKey], timeout: float) -> list[str]:
        """Take no new job for the models ``keys``; wait up to ``timeout`` s for theirs to
        finish, then fail the rest "model removed". Returns the ids failed that way."""
        wanted = set(keys)
        if not wanted:
            return []
        with self._lock:
            self._draining |= wanted
        return self._drain_where(
            lambda t: t.route.key in wanted, REMOVED, time.monotonic() + timeout
        )

    def undrain(self, keys: Collection[ModelKey]) -> None:
        """Their removal is over: the models may be served again if they come back."""
        with self._lock:
            self._draining -= set(keys)

    def _drain_where(
        self, matches: Callable[[_Ticket], bool], why: str, deadline: float
    ) -> list[str]:
        with self._lock:
            waiting = [t for t in self._queued if matches(t)]
            for ticket in waiting:
                self._queued.remove(ticket)
        for ticket in waiting:
            self._refuse(ticket.job, why)
        with self._lock:
            while any(matches(t) for t in self._running.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            late = [t for t in self._running.values() if matches(t)]
            for ticket in late:
                ticket.why_cancelled = why
                ticket.cancel.set()
            # A cancelled stream ends at its next read; its answer goes out then.
            end = time.monotonic() + 5.0
            while any(t.job.id in self._running for t in late) and time.monotonic() < end:
                self._lock.wait(0.2)
        return [t.job.id for t in (*waiting, *late)]

    # ---- polling

    def poll_once(self) -> list[str]:
        """One poll: new jobs are taken (run, queued or refused); returns their ids."""
        try:
            rows = self.client.poll_jobs(POLL_LIMIT)
        except InfernetError as exc:
            if not self._poll_failing:
                log.warning("job poll failed: %s", one_line(str(exc), PEER_TEXT * 2))
            self._poll_failing = True
            return []
        if self._poll_failing:
            log.info("job poll works again")
        self._poll_failing = False
        fresh: dict[str, Job] = {}
        for row in rows[:POLL_LIMIT]:
            job = parse_row(row)
            if job is not None and job.id not in fresh and not self._in_flight(job.id):
                fresh[job.id] = job
        if not fresh:
            return []
        # Entered before any runs, in one commit: a job known already was taken before (an
        # owed answer goes out in deliver_owed) and is never run again.
        entered = self.ledger.jobs_begin([(j.id, j.model_name) for j in fresh.values()])
        taken = [job_id for job_id in fresh if job_id in entered]
        for job_id in taken:
            self._take(fresh[job_id])
        return taken

    def _in_flight(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._running or any(t.job.id == job_id for t in self._queued)

    def _take(self, job: Job) -> None:
        verdict = self._check(job)
        if isinstance(verdict, str):
            self._refuse(job, verdict)
            return
        ticket = _Ticket(job, *verdict)
        with self._lock:
            if self._stopping.is_set():
                reason = SHUTTING_DOWN
            elif ticket.route.key in self._draining:
                reason = REMOVED
            elif len(self._running) < self.settings.concurrency:
                self._start(ticket)
                return
            elif len(self._queued) < self.settings.concurrency * QUEUE_FACTOR:
                self._queued.append(ticket)
                return
            else:
                reason = (
                    f"node full: {len(self._running)} jobs running and {len(self._queued)} "
                    "waiting (jobs.concurrency)"
                )
        self._refuse(job, reason)

    def _check(self, job: Job) -> tuple[ChatRequest, Route] | str:
        if job.type != "chat":
            shown = one_line(job.type, 40) or "(none)"
            return f"job type '{shown}' is not served by this node (only chat)"
        if job.created_at is not None:
            age = (clock.now() - job.created_at).total_seconds()
            if age > self.settings.max_age:
                return (
                    f"job is {age:.0f}s old, older than jobs.max_age "
                    f"({self.settings.max_age:.0f}s): its consumer has given up"
                )
        request = chat_request(job.input_spec)
        if isinstance(request, str):
            return request
        name = job.model_name or self.settings.default_model
        if name is None:
            return "the job names no model and this node has no jobs.default_model"
        route = self.router(name)
        if isinstance(route, str):
            return route
        return request, route

    def _start(self, ticket: _Ticket) -> None:
        """Run ``ticket`` on a thread of its own; the caller holds the lock."""
        self._running[ticket.job.id] = ticket
        name = f"job-{ticket.job.id[:8]}"
        threading.Thread(target=self._run, args=(ticket,), name=name, daemon=True).start()

    def _finished(self, ticket: _Ticket) -> None:
        refused: list[tuple[Job, str]] = []
        with self._lock:
            self._running.pop(ticket.job.id, None)
            while self._queued and len(self._running) < self.settings.concurrency:
                nxt = self._queued.popleft()
                if self._stopping.is_set() or nxt.route.key in self._draining:
                    refused.append((nxt.job, SHUTTING_DOWN if self._stopping.is_set() else REMOVED))
                else:
                    self._start(nxt)
            self._lock.notify_all()
        for job, why in refused:
            self._refuse(job, why)

    # ---- one job

    def _run(self, ticket: _Ticket) -> None:
        try:
            self._generate(ticket)
        finally:
            self._finished(ticket)

    def _generate(self, ticket: _Ticket) -> None:
        job, route = ticket.job, ticket.route
        sender = EventSender(
            lambda events: self.client.post_job_events(job.id, events), name=job.id[:8]
        )
        started_at, started = clock.iso(clock.now(), precise=True), time.monotonic()
        parts: list[str] = []
        ending = Ending()
        error: str | None = None
        meta_sent = False

        def meta() -> None:
            # Sent with the first delta (or the end), so it never holds the first token back.
            nonlocal meta_sent
            if not meta_sent:
                meta_sent = True
                data = {
                    "provider_node_id": self.node_id,
                    "provider_name": self.node_name,
                    "model": route.model,
                    "engine": route.engine,
                    "started_at": started_at,
                }
                sender.emit("meta", data)

        try:
            for delta in route.chat(ticket.request, ending, ticket.cancel):
                meta()
                parts.append(delta)
                sender.emit("token", {"text": delta})
                if sender.gone is not None:
                    ticket.why_cancelled = "the control plane no longer takes this job"
                    ticket.cancel.set()
                if ticket.cancel.is_set():
                    break
            if ticket.cancel.is_set():
                error = ticket.why_cancelled or "cancelled"
        except InfernetError as exc:
            error = one_line(str(exc), PEER_TEXT * 2)
        except Exception as exc:  # a bug: the job still gets its answer
            log.exception("job %s crashed", job.id)
            error = f"internal error in infernet: {type(exc).__name__}"
        seconds = time.monotonic() - started
        text = "".join(parts)
        meta()
        if error is None:
            reason = ending.reason or "stop"
            sender.emit(
                "done",
                {
                    "text": text,
                    "reason": reason,
                    "finished_at": clock.iso(clock.now(), precise=True),
                },
            )
        else:
            sender.emit("error", {"message": error})
        sender.close(EVENTS_WAIT)
        if error is not None:
            answer: dict[str, Any] = {"status": "failed", "error": one_line(error, JOB_ERROR)}
        else:
            tokens = ending.tokens if ending.tokens is not None else len(parts)
            self.throughput.add(tokens, ending.seconds or seconds)
            answer = {
                "status": "completed",
                "result": {
                    "type": "chat",
                    "text": text,
                    "token_count": tokens,
                    "duration_ms": round(seconds * 1000),
                    "completed_by": self.node_id,
                    "model": route.model,
                    "finish_reason": ending.reason or "stop",
                },
            }
        shown = f" ({error})" if error else ""
        log.info("job %s (%s): %s%s", job.id, route.model, answer["status"], shown)
        self._answer(job.id, answer)

    def _refuse(self, job: Job, reason: str) -> None:
        """Answer a job we do not run: an ``error`` event, then ``failed``."""
        log.info("job %s refused: %s", job.id, reason)
        self._error_event(job.id, reason)
        self._answer(job.id, {"status": "failed", "error": one_line(reason, JOB_ERROR)})

    def _error_event(self, job_id: str, message: str) -> None:
        try:
            event = {"event_type": "error", "data": {"message": message}}
            self.client.post_job_events(job_id, [event])
        except JobCallFailed as exc:
            log.debug("job %s: error event not delivered: %s", job_id, exc)

    # ---- answers

    def _answer(self, job_id: str, answer: dict[str, Any]) -> None:
        self.ledger.job_finish(job_id, answer)
        self._deliver(job_id, answer)

    def _deliver(self, job_id: str, answer: dict[str, Any]) -> bool:
        try:
            self.client.complete_job(job_id, answer)
        except JobCallFailed as exc:
            if exc.delivery is not Delivery.GONE:
                log.warning("answer to job %s not delivered (will retry): %s", job_id, exc)
                return False
            log.warning("job %s: %s; dropping its answer", job_id, exc)
        self.ledger.job_reported(job_id)
        return True

    def deliver_owed(self) -> int:
        """Send every answer not yet reported; a job a crash cut off is answered failed."""
        owed = self.ledger.jobs_unreported()
        delivered = 0
        for record in owed:
            if self._in_flight(record.job_id):
                continue
            answer = record.answer
            if answer is None:  # taken before a restart and never finished
                self._error_event(record.job_id, INTERRUPTED)
                answer = {"status": "failed", "error": INTERRUPTED}
                self.ledger.job_finish(record.job_id, answer)
            if not self._deliver(record.job_id, answer):
                break  # the control plane is down: the rest would fail the same
            delivered += 1
        return delivered
