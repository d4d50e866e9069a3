"""The executor: the only code that changes a backend.

Ordering and safety (contract §4):

* pulls (``policy.parallel_pulls`` at once) and updates first, each verified before it counts;
* pins and unpins next (an engine-served model's "pin" starts its engine);
* then the canaries: each new model answers a one-token generation before it is advertised;
* removals last, and only when every pull succeeded (make before break): before any weights
  are deleted the shrunken advertised list is handed to ``withdraw`` (the heartbeat), the jobs
  running on them are drained (``drain``), and each model is unloaded before it is deleted;
* one failed action doesn't stop independent ones; retryable failures are retried here and
  nowhere else, with a capped exponential backoff;
* every action is journalled, so an apply killed halfway is rolled forward by the next one
  (the next plan is computed from what is really installed).

The caller then observes the node again (the session: the executor never reaches back up) and
``settle`` records whether the run converged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from reconciler.backends.base import Backend, Served
from reconciler.errors import InfernetError, one_line
from reconciler.events import Event, Kind, Progress, ignore
from reconciler.limits import PEER_TEXT
from reconciler.model import Action, BackendKind, ModelFacts, ModelKey, Observed, Op, Plan
from reconciler.names import addressed, key
from state import StatusKey, Store, clock

Verified = frozenset[tuple[BackendKind, str]]
"""``(backend, canonical)`` of the models whose canary answered in this apply."""
Withdraw = Callable[[tuple[Action, ...], Verified], str | None]
"""Before deletes, advertise only what is served once these actions (done so far) are done
and these canaries answered; returns a note when the control plane did not confirm it."""
Drain = Callable[[frozenset[ModelKey]], None]
"""After the withdrawal, before the deletes: let the jobs running on these models finish (or
fail them); the job runner's ``drain``."""


@dataclass(frozen=True)
class Outcome:
    """How one action ended."""

    action: Action
    result: str  # ok | failed | skipped
    error: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class Executed:
    """What ``execute`` did: its journal run, the actions' outcomes, the canaries answered."""

    run_id: str
    outcomes: tuple[Outcome, ...]
    verified: Verified


@dataclass(frozen=True)
class Result:
    """What an apply did and where it left the node."""

    outcomes: tuple[Outcome, ...]
    converged: bool
    final: Plan | None
    advertised: tuple[str, ...]
    heartbeat: bool | None = None  # the heartbeat after it: taken, refused, or none to send
    verified: Verified = frozenset()  # models whose canary answered in this apply
    observed: Observed | None = None  # the node as seen after the apply (with ``final``)

    @property
    def failed(self) -> tuple[Outcome, ...]:
        """The actions that failed."""
        return tuple(o for o in self.outcomes if o.result == "failed")


@dataclass
class Executor:
    """Runs a plan's actions against the backends; see the module docstring for the rules."""

    backends: Mapping[BackendKind, Backend]
    store: Store
    progress: Progress = ignore
    withdraw: Withdraw | None = None
    drain: Drain | None = None
    parallel: int = 2
    retries: int = 3
    backoff: float = 2.0
    backoff_cap: float = 300.0
    sleep: Callable[[float], None] = time.sleep
    cancel: threading.Event = field(default_factory=threading.Event)
    _pulled: dict[ModelKey, ModelFacts] = field(default_factory=dict, init=False)

    def _backend(self, action: Action) -> Backend:
        return self.backends[action.backend]

    @staticmethod
    def _target(action: Action) -> str:
        """What the backend acts on (actions carry the name as the file writes it)."""
        return addressed(action.backend, action.model, action.canonical)

    def _with_retries(self, action: Action, work: Callable[[], None]) -> Outcome:
        """Run ``work`` with the one retry policy of the project."""
        attempt = 0
        while True:
            attempt += 1
            try:
                work()
                return Outcome(action, "ok", attempts=attempt)
            except InfernetError as exc:
                if not exc.retryable or attempt > self.retries or self.cancel.is_set():
                    return Outcome(action, "failed", str(exc), attempt)
                delay = min(self.backoff * 2 ** (attempt - 1), self.backoff_cap)
                self.progress(Event(Kind.RETRY, action, message=f"{exc}; retry in {delay:.0f}s"))
                self.sleep(delay)

    def _journal(self, action: Action, run_id: str) -> int:
        return self.store.begin_action(
            run_id=run_id,
            op=action.op.value,
            backend=action.backend.value,
            canonical=action.canonical,
            model=action.model,
        )

    def _run(self, action: Action, run_id: str, work: Callable[[], None]) -> Outcome:
        """Journal, announce, run with retries, record the outcome."""
        entry = self._journal(action, run_id)
        self.progress(Event(Kind.STARTED, action))
        outcome = self._with_retries(action, work)
        self.store.finish_action(entry, outcome=outcome.result, error=outcome.error)
        self.progress(Event(Kind.FINISHED, action, outcome=outcome.result, message=outcome.error))
        return outcome

    def _skip(self, action: Action, run_id: str, why: str) -> Outcome:
        entry = self._journal(action, run_id)
        self.store.finish_action(entry, outcome="skipped", error=why)
        self.progress(Event(Kind.FINISHED, action, outcome="skipped", message=why))
        return Outcome(action, "skipped", why, 0)

    # ---- the actions

    def _pull(self, action: Action) -> None:
        backend = self._backend(action)
        last_at, last_phase = 0.0, ""

        def report(phase: str, done: int | None, total: int | None) -> None:
            nonlocal last_at, last_phase
            now = time.monotonic()
            # Ollama sends a line every 60 ms per layer; a few updates a second is plenty.
            if phase == last_phase and now - last_at < 0.2 and done != total:
                return
            last_at, last_phase = now, phase
            self.progress(Event(Kind.PROGRESS, action, phase=phase, completed=done, total=total))

        target = self._target(action)
        backend.pull(target, report, self.cancel, source=action.source, digest=action.digest)
        facts = backend.verify(target, action.digest)
        self._pulled[key(action.backend, action.canonical)] = facts
        self.store.record_installed(
            backend=action.backend.value,
            canonical=action.canonical,
            name=action.model,
            digest=facts.digest,
        )

    def _pin(self, action: Action) -> None:
        keep = action.keep_alive if action.keep_alive is not None else 0.0
        self._backend(action).load(
            self._target(action),
            keep_alive=keep,
            embedding=action.embedding,
            context=action.context,
            advertise_as=action.advertise_as,
        )
        self.store.set_pinned(
            backend=action.backend.value, canonical=action.canonical, pinned=keep < 0
        )

    def _remove(self, action: Action) -> None:
        self._backend(action).remove(self._target(action), embedding=action.embedding)
        self.store.record_removed(backend=action.backend.value, canonical=action.canonical)

    # ---- the run

    def execute(self, plan: Plan) -> Executed:
        """Apply ``plan``'s actions and canaries in the safe order (``settle`` records how the
        run ended, from the observation the caller makes after it)."""
        interrupted = self.store.unfinished_actions()
        if interrupted:
            names = ", ".join(sorted({f"{e.op} {e.model}" for e in interrupted}))
            self.store.close_unfinished(note="interrupted; rolled forward by the next apply")
            self.progress(
                Event(Kind.NOTE, message=f"rolling forward an interrupted apply ({names})")
            )
        run_id = self.store.begin_run(
            config_sha256=plan.source.sha256,
            plan={"fingerprint": plan.fingerprint, "actions": [a.model for a in plan.actions]},
        )
        outcomes: list[Outcome] = []
        pulls = [a for a in plan.actions if a.op in (Op.PULL, Op.UPDATE)]
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as pool:
            jobs = [pool.submit(self._run, a, run_id, partial(self._pull, a)) for a in pulls]
            outcomes.extend(job.result() for job in jobs)
        failed_pulls = {
            key(o.action.backend, o.action.canonical) for o in outcomes if o.result != "ok"
        }

        for action in (a for a in plan.actions if a.op in (Op.PIN, Op.UNPIN)):
            if self.cancel.is_set():
                outcomes.append(self._skip(action, run_id, "cancelled"))
            elif key(action.backend, action.canonical) in failed_pulls:
                outcomes.append(self._skip(action, run_id, "its pull failed"))
            else:
                outcomes.append(self._run(action, run_id, partial(self._pin, action)))

        verified = self._canaries(plan, outcomes)

        removals = [a for a in plan.actions if a.op is Op.REMOVE]
        if removals and (failed_pulls or self.cancel.is_set()):
            why = "a pull failed or was cancelled: removals wait, the node keeps what it has"
            outcomes.extend(self._skip(a, run_id, why) for a in removals)
        elif removals:
            if self.withdraw is not None:
                # The heartbeat without them goes out (and is answered) before any delete.
                done = tuple(o.action for o in outcomes if o.result == "ok")
                note = self.withdraw(done, verified)
                if note:
                    self.progress(Event(Kind.NOTE, message=note))
            if self.drain is not None:
                # Jobs on them finish (or fail "model removed") before they are unloaded.
                self.drain(frozenset(key(a.backend, a.canonical) for a in removals))
            for action in removals:
                outcomes.append(self._run(action, run_id, partial(self._remove, action)))

        return Executed(run_id, tuple(outcomes), verified)

    def settle(self, plan: Plan, done: Executed, after: tuple[Observed, Plan] | None) -> Result:
        """Record how the run of ``plan`` ended: converged when the node observed ``after`` it
        needs nothing more (None: it could not be observed); the measured VRAM of what is
        loaded is kept for the budget."""
        observed, final = after if after is not None else (None, None)
        converged = final is not None and not final.actions and not final.errors
        if observed is not None:
            self._record_measured(observed)
        self.store.finish_run(done.run_id, converged=converged)
        failed = sum(1 for o in done.outcomes if o.result == "failed")
        advertised = final.advertised if final else plan.advertised
        self.store.record_apply(
            config_sha256=plan.source.sha256,
            git_commit=plan.source.git_commit,
            converged=converged,
            actions=len(done.outcomes),
            failed=failed,
            summary={"advertised": list(advertised)},
        )
        self.progress(Event(Kind.CONVERGED, outcome="converged" if converged else "not_converged"))
        return Result(
            done.outcomes, converged, final, advertised, verified=done.verified, observed=observed
        )

    def _canaries(self, plan: Plan, outcomes: list[Outcome]) -> Verified:
        """Run the plan's canaries whose model is there to test (its pull and engine start, if
        any, succeeded); keep each result for the weights it tested."""
        failed = {key(o.action.backend, o.action.canonical) for o in outcomes if o.result != "ok"}
        verified: set[tuple[BackendKind, str]] = set()
        for check in plan.checks:
            k = key(check.backend, check.canonical)
            if self.cancel.is_set() or k in failed:
                continue
            # What the backend says of weights it just pulled beats what the plan expected
            # (the registry's config may not say a model is an embedding model).
            pulled = self._pulled.get(k)
            digest = pulled.digest if pulled is not None else check.digest
            embedding = "embedding" in pulled.capabilities if pulled else check.embedding
            served = Served(
                name=addressed(check.backend, check.model, check.canonical),
                advertise_as=check.advertise_as,
                keep_alive=check.keep_alive,
                context=check.context,
                embedding=embedding,
            )
            try:
                self.backends[check.backend].canary(served)
            except InfernetError as exc:
                error = one_line(str(exc), PEER_TEXT)
                remember_canary(self.store, k, digest, error)
                why = f"{check.advertise_as} did not answer a one-token test generation ({error})"
                self.progress(Event(Kind.NOTE, outcome="failed", message=f"{why}; not advertised"))
                continue
            remember_canary(self.store, k, digest, None)
            verified.add((check.backend, check.canonical))
            self.progress(
                Event(Kind.NOTE, outcome="ok", message=f"{check.advertise_as} answered its canary")
            )
        return frozenset(verified)

    def _record_measured(self, observed: Observed) -> None:
        """Keep ``size_vram`` of loaded desired models: the budget's "measured" layer."""
        for kind, state in observed.backends.items():
            for loaded in state.loaded:
                if loaded.size_vram > 0:
                    self.store.record_measured_vram(
                        backend=kind.value, canonical=loaded.canonical, size_vram=loaded.size_vram
                    )


def remember_canary(store: Store, k: ModelKey, digest: str | None, error: str | None) -> None:
    """Keep how ``k``'s canary went for the weights at ``digest`` (``StatusKey.CANARIES``)."""
    kept = dict(store.get_status(StatusKey.CANARIES) or {})
    kept[k] = {"digest": digest, "ok": error is None, "error": error, "at": clock.stamp()}
    store.put_status(StatusKey.CANARIES, kept)
