"""One reconciliation session: the desired state, the state store and the backends together.

The CLI and the daemon both go through here, so "observe, then plan" and "lock, then apply"
are written once (``converge.apply`` is one apply from start to end).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import backends
from reconciler.backends.base import AdapterContext, Backend, Cache, Tidies
from reconciler.backends.driver import OpenAdapters
from reconciler.converge.observe import observe
from reconciler.errors import BackendError, ConfigError
from reconciler.events import Event, Kind, Progress, ignore
from reconciler.model import (
    Action,
    BackendKind,
    Canary,
    Desired,
    Observed,
    Op,
    Owned,
    OwnedModel,
    Plan,
)
from reconciler.names import ModelKey, key
from reconciler.planning import advertised
from reconciler.planning.plan import plan
from reconciler.redact import redact
from state import NodeLock, StatusKey, Store, clock

if TYPE_CHECKING:
    # The control-plane client (signing, its HTTP client) is imported only by a file that names
    # a control plane, the executor only by an apply: `infernet plan` loads neither.
    from reconciler.controlplane.heartbeat import Heartbeater
    from reconciler.converge.executor import Drain, Result, Verified


def load_or_last_valid(path: Path, state_dir: Path) -> tuple[Desired, str | None]:
    """The file, or, while it is broken, the last valid version ``watch`` kept in the store,
    with the file's error; raises the error when no valid version was ever kept."""
    from reconciler.config import desired

    try:
        return desired.load(path), None
    except ConfigError as exc:
        with Store.open(state_dir) as store:
            kept = store.get_status(StatusKey.LAST_VALID)
        if not kept:
            raise
        return desired.parse(kept["text"], path=str(path)), str(exc).splitlines()[0]


def keep_last_valid(store: Store, the_desired: Desired) -> None:
    """Keep the text of the file in force for ``load_or_last_valid``: every apply and daemon
    reconcile keeps it, not only ``watch``'s (a daemon started on a broken file served the
    version an earlier daemon had kept, older than what ``apply`` had applied since). The file
    is re-read and kept only if it still hashes to what is in force: it may have turned
    invalid a moment ago."""
    source = the_desired.source
    kept = store.get_status(StatusKey.LAST_VALID)
    if isinstance(kept, dict) and kept.get("sha256") == source.sha256:
        return
    try:
        data = Path(source.path).read_bytes()
    except OSError:
        return
    if hashlib.sha256(data).hexdigest() == source.sha256:
        text = data.decode("utf-8-sig")
        store.put_status(
            StatusKey.LAST_VALID, {"at": clock.stamp(), "text": text, "sha256": source.sha256}
        )


def tidy(adapters: dict[BackendKind, Backend], the_desired: Desired) -> None:
    """Let each adapter that leaves things behind (a download cut off keeps its partial file
    for a resume) drop what belongs to models no longer in the file: no retry will ever
    resume those."""
    for kind, adapter in adapters.items():
        if isinstance(adapter, Tidies):
            adapter.tidy({m.name for m in the_desired.models if m.backend is kind})


class StoreCache:
    """The state store's cache table behind the backends' ``Cache`` protocol."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, kind: str, key: str, max_age: float | None = None) -> object | None:
        """A cached value younger than ``max_age`` seconds, or None."""
        value: object | None = self._store.cache_get(kind, key, max_age=max_age)
        return value

    def put(self, kind: str, key: str, value: object) -> None:
        """Remember ``value``."""
        self._store.cache_put(kind, key, value)


CANARY_RETRY = 600.0
"""Seconds after which a model whose canary failed is tested again."""


def retry_backoff() -> float:
    """First retry delay in seconds (``INFERNET_RETRY_BACKOFF``); doubles per attempt."""
    return float(os.environ.get("INFERNET_RETRY_BACKOFF", "2"))


def lock_timeout() -> float:
    """Seconds a second writer waits for the node lock (``INFERNET_LOCK_TIMEOUT``)."""
    return float(os.environ.get("INFERNET_LOCK_TIMEOUT", "30"))


def node_lock(state_dir: Path, purpose: str, timeout: float | None = None) -> NodeLock:
    """The node lock (one writer per node), held: ``LockError`` names the holder when it is
    not free within ``timeout`` seconds (default ``INFERNET_LOCK_TIMEOUT``). A writer takes it
    before it reads the file, so what it applies is never older than what the last writer did."""
    held = NodeLock(state_dir, purpose=purpose)
    held.acquire(timeout=lock_timeout() if timeout is None else timeout)
    return held


def make_backends(
    desired: Desired, *, cache: Cache | None = None, state_dir: Path | None = None
) -> dict[BackendKind, Backend]:
    """Every registered backend, used or not: a backend whose last model left the file must
    still be observed so that model can be pruned. An unused backend that isn't there (no
    llama.cpp folder, no hub cache) is simply unreachable or empty, which the planner only
    reports for backends the file uses. ``state_dir`` holds the records of the processes a
    backend starts (engines). Adapters are imported here, on first use, by the name their
    family registered (``Family.adapters``)."""
    context = AdapterContext(
        cache=cache,
        state_dir=state_dir,
        stall_timeout=float(os.environ.get("INFERNET_PULL_STALL_TIMEOUT", "300")),
        disk_reserve=desired.budget.disk_reserve,
    )
    made: dict[BackendKind, Backend] = {}
    for family in backends.families():
        module, function = family.adapter_path()
        opened: OpenAdapters = getattr(importlib.import_module(module), function)
        kinds = tuple(d.kind for d in family.drivers)
        made.update(opened(kinds, backends.settings_of(desired, kinds[0]), context))
    return made


def read_owned(store: Store) -> Owned:
    """What we own, what was measured, and what is protected, from the store."""
    models = {
        key(r.backend, r.canonical): OwnedModel(
            BackendKind(r.backend), r.canonical, r.name, r.pinned_by_us, r.measured_vram
        )
        for r in store.owned()
        if backends.known(r.backend)  # a kind no driver serves now: not ours to manage
    }
    measured = {key(b, c): v for (b, c), v in store.measured_vram().items()}
    protected = store.get_status(StatusKey.PROTECTED) or []
    return Owned(
        models=models,
        measured_vram=measured,
        protected=frozenset(protected),
        canaries=read_canaries(store),
    )


def read_canaries(store: Store) -> dict[ModelKey, Canary]:
    """How each model's last canary went; a failure older than ``CANARY_RETRY`` seconds is
    forgotten, so the next apply tests the model again (a backend that was busy or short of
    memory then may serve it now)."""
    kept = store.get_status(StatusKey.CANARIES)
    found: dict[ModelKey, Canary] = {}
    if not isinstance(kept, dict):
        return found
    now = clock.now()
    for k, row in kept.items():
        if not isinstance(row, dict):
            continue
        ok = row.get("ok") is True
        if not ok:
            try:
                age = (now - clock.parse(str(row.get("at")))).total_seconds()
            except ValueError:
                continue
            if age > CANARY_RETRY:
                continue
        digest = row.get("digest")
        error = row.get("error")
        found[ModelKey(k)] = Canary(
            digest if isinstance(digest, str) else None,
            ok,
            error if isinstance(error, str) else None,
        )
    return found


def _interrupted_pulls(
    store: Store, observed: Observed, owned: Owned
) -> list[tuple[OwnedModel, str | None]]:
    """Models whose pull was cut off (a crash, a kill) but which the backend finished on its
    own (Ollama goes on after the client dies), with their digests: they are ours, or they
    would count as unmanaged and dropping them from the file would never remove them."""
    found = []
    for entry in store.unfinished_actions():
        if entry.op not in (Op.PULL.value, Op.UPDATE.value):
            continue
        if not backends.known(entry.backend):
            continue
        state = observed.backends.get(BackendKind(entry.backend))
        if state is None or key(entry.backend, entry.canonical) in owned.models:
            continue
        for model in state.installed:
            if model.canonical == entry.canonical:
                ours = OwnedModel(BackendKind(entry.backend), entry.canonical, entry.model)
                found.append((ours, model.facts.digest))
    return found


def _protected(
    previous: frozenset[ModelKey], desired: Desired, observed: Observed
) -> frozenset[ModelKey]:
    """Protected keys stay protected after they leave the file, until the model is gone (seen
    missing from a backend that answered: one that is down says nothing about what it has)."""
    answered = {kind.value for kind, s in observed.backends.items() if s.reachable}
    installed = {
        key(kind, m.canonical) for kind, s in observed.backends.items() for m in s.installed
    }

    def gone(k: str) -> bool:
        return k.partition(":")[0] in answered and k not in installed

    now = {key(m.backend, m.canonical) for m in desired.models if m.protect}
    declared = {key(m.backend, m.canonical) for m in desired.models}
    return frozenset({k for k in previous if not gone(k) and k not in declared} | now)


def remember_protected(store: Store, desired: Desired, observed: Observed) -> None:
    """Keep in the store which models are protected now (see ``_protected``)."""
    previous = frozenset(store.get_status(StatusKey.PROTECTED) or [])
    keep = _protected(previous, desired, observed)
    if keep != previous:
        store.put_status(StatusKey.PROTECTED, sorted(keep))


@dataclass
class Session:
    """Desired state + store + backends; ``close()`` releases connections."""

    desired: Desired
    store: Store
    backends: dict[BackendKind, Backend] = field(default_factory=dict)
    heartbeater: Heartbeater | None = None
    config_error: str | None = None  # the file is broken now; the desired state is the last valid

    @classmethod
    def open(cls, desired: Desired, state_dir: Path) -> Session:
        """Open the store (rebuilt when corrupt), the backends, and the control plane."""
        store = Store.open(state_dir)
        backends = make_backends(desired, cache=StoreCache(store), state_dir=store.state_dir)
        return cls(desired, store, backends, _heartbeater(desired, store))

    def with_desired(self, fresh: Desired, *, retired: list[Heartbeater] | None = None) -> Session:
        """This session with a new desired state; adapters are rebuilt only if their
        settings changed (a daemon keeps its connections across edits of served_models).

        A heartbeater replaced by new control-plane settings is closed, or, with ``retired``,
        put there for the caller to close once nothing uses its client any more (the
        daemon's command runner may be answering a command with it right now)."""
        adapters, beats = self.backends, self.heartbeater
        if fresh.backend_settings != self.desired.backend_settings:
            for backend in adapters.values():
                backend.close()
            adapters = make_backends(
                fresh, cache=StoreCache(self.store), state_dir=self.store.state_dir
            )
        if fresh.control_plane != self.desired.control_plane:
            if beats is not None and retired is not None:
                retired.append(beats)
            elif beats is not None:
                beats.close()
            beats = _heartbeater(fresh, self.store)
        return Session(fresh, self.store, adapters, beats)

    def close(self) -> None:
        """Close backends, the control-plane client and the store."""
        for backend in self.backends.values():
            backend.close()
        if self.heartbeater is not None:
            self.heartbeater.close()
        self.store.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def observe_and_plan(
        self,
        *,
        allow_destroy: bool = False,
        refresh: bool = False,
        force_remove: frozenset[str] = frozenset(),
        record: bool = False,
    ) -> tuple[Observed, Plan]:
        """Observe the node and plan against the file (``force_remove``: removals by name).

        ``record``: the caller holds the node lock and is about to act (``apply``, a daemon
        reconcile), so what this observation establishes about ownership is kept in the store
        whether or not the plan changes anything: protections the file declares, pulls a crash
        cut off that the backend finished. Without it (``plan``, ``status``) nothing is
        written; the plan is made from the same facts, held in memory.
        """
        owned = read_owned(self.store)
        owners = {m.canonical: m.backend for m in owned.models.values()}
        observed = observe(
            self.desired,
            self.backends,
            cache=StoreCache(self.store),
            refresh_upstream=refresh,
            owners=owners,
        )
        adopted = _interrupted_pulls(self.store, observed, owned)
        if record:
            for ours, digest in adopted:
                self.store.record_installed(
                    backend=ours.backend.value,
                    canonical=ours.canonical,
                    name=ours.name,
                    digest=digest,
                )
            remember_protected(self.store, self.desired, observed)
            owned = read_owned(self.store)
            keep_last_valid(self.store, self.desired)
            tidy(self.backends, self.desired)
        else:
            models = {**owned.models, **{key(o.backend, o.canonical): o for o, _ in adopted}}
            protected = _protected(owned.protected, self.desired, observed)
            owned = replace(owned, models=models, protected=protected)
        allow = allow_destroy or bool(force_remove)
        result = plan(self.desired, observed, owned, allow_destroy=allow, force_remove=force_remove)
        if self.store.rebuilt:
            result = _with_warning(result, self.store.rebuilt)
        return observed, result

    def apply(
        self,
        the_plan: Plan,
        observed: Observed,
        *,
        progress: Progress = ignore,
        cancel: threading.Event | None = None,
        drain: Drain | None = None,
    ) -> Result:
        """Execute ``the_plan``, observe again, heartbeat; the caller holds the node lock.
        ``drain``: the job runner's, for the jobs running on models about to be removed."""
        remember_protected(self.store, self.desired, observed)
        withdraw = None
        if self.heartbeater is not None:
            beats = self.heartbeater

            def withdraw(done: tuple[Action, ...], verified: Verified) -> str | None:
                served = advertised.now(the_plan, self.desired, done=done, verified=verified)
                extension = self.extension(the_plan, converged=False)
                return beats.withdraw(served, observed.gpu, extension)

        from reconciler.converge.executor import Executor

        executor = Executor(
            self.backends,
            self.store,
            progress=progress,
            withdraw=withdraw,
            drain=drain,
            parallel=self.desired.policy.parallel_pulls,
            backoff=retry_backoff(),
            cancel=cancel or threading.Event(),
        )
        done = executor.execute(the_plan)
        try:
            after: tuple[Observed, Plan] | None = self.observe_and_plan()
        except BackendError as exc:
            progress(Event(Kind.NOTE, message=f"could not observe after apply: {exc}"))
            after = None
        result = executor.settle(the_plan, done, after)
        if result.final is not None:
            beat = self.heartbeat(
                result.final, observed, converged=result.converged, progress=progress
            )
            result = replace(result, heartbeat=beat)
        return result

    def extension(self, the_plan: Plan, *, converged: bool) -> dict[str, Any]:
        """``specs.reconciler``: how this node's reconciliation stands."""
        from reconciler.controlplane.heartbeat import report

        last = self.store.last_apply()
        return report(
            the_plan.source,
            converged=converged,
            the_plan=the_plan,
            errors=[self.config_error] if self.config_error else [],
            last_apply_at=last.at if last else None,
        )

    def heartbeat(
        self, the_plan: Plan, observed: Observed, *, converged: bool, progress: Progress = ignore
    ) -> bool | None:
        """Advertise what is served now (installed, verified, fitting); report the outcome.
        True when the control plane took it, False when not, None without a control plane."""
        if self.heartbeater is None:
            return None
        served = advertised.now(the_plan, self.desired)
        error = self.heartbeater.beat(
            served, observed.gpu, self.extension(the_plan, converged=converged)
        )
        url = redact(self.heartbeater.settings.url)
        message = error or f"heartbeat: {url} now lists {len(served)} models"
        progress(Event(Kind.NOTE, outcome="failed" if error else "ok", message=message))
        return error is None

    def lock(self, purpose: str) -> NodeLock:
        """The node lock (one writer per node), acquired with the configured timeout."""
        return self.lock_within(purpose, lock_timeout())

    def lock_within(self, purpose: str, timeout: float) -> NodeLock:
        """The node lock, waiting at most ``timeout`` seconds (``LockError`` names the holder)."""
        return node_lock(self.store.state_dir, purpose, timeout)


def _heartbeater(desired: Desired, store: Store) -> Heartbeater | None:
    if desired.control_plane is None:
        return None
    from reconciler.controlplane.heartbeat import WITHDRAW_TIMEOUT, Heartbeater

    timeout = float(os.environ.get("INFERNET_WITHDRAW_TIMEOUT", WITHDRAW_TIMEOUT))
    return Heartbeater(desired.control_plane, store, withdraw_timeout=timeout)


def _with_warning(p: Plan, text: str) -> Plan:
    return replace(p, warnings=(*p.warnings, text))


def summary(result: Result) -> dict[str, Any]:
    """A JSON summary of an apply for ``--json`` and the state store."""
    return {
        "converged": result.converged,
        "advertised": list(result.advertised),
        "outcomes": [
            {"op": o.action.op.value, "model": o.action.model, "result": o.result, "error": o.error}
            for o in result.outcomes
        ],
    }
