"""Remote commands from the dashboard (``model_install``, ``model_remove``), run exactly once.

The control plane hands out a command once (poll flips it to ``running``) and expects one
``complete``. The state store's ledger makes that hold across crashes: a command id is entered
(``received``) before anything is done and only moves forward (``running`` → ``completed`` |
``failed``), so a redelivered or half-run command is never run again; a finished command stays
"unreported" until its ``complete`` got a 2xx, so the ledger's unreported list is the outbox
that ``deliver_pending`` drains on every tick. A command found ``received``/``running`` from
before a restart is answered as failed, not re-run: we can't know how far it got.

Every refusal (policy, unknown verb, bad name, invalid file, protected model) is answered with
``failed`` and a one-line reason before anything reaches a backend. Accepted commands edit
``infernet.yaml`` (comments kept, via ``configedit``, under the node lock) and reconcile through
the daemon's callback, so the file stays the single truth and ``git diff`` shows what the
dashboard did. So a removal is exactly a hand edit dropping the entry: the prune policy decides
whether weights are deleted, nothing is forced. An install that fails, is cancelled or is cut
off by a crash is answered ``failed`` and taken back out of the file (its bytes from before the
edit are kept in the store first), so the answer and the node always agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import configedit, desired, names
from reconciler._files import write_atomically
from reconciler.commandargs import NO_HF, install_target, model_problem, name_problem
from reconciler.commandprogress import CommandProgress
from reconciler.controlplane import ControlPlane, ControlPlaneError, RemoteCommand
from reconciler.errors import ConfigError, InfernetError, LockError, ValidationError
from reconciler.events import Progress
from reconciler.model import BackendKind, Desired, Op
from state import CommandRecord, NodeLock, Store

log = logging.getLogger("infernet.commands")

INSTALL, REMOVE = "model_install", "model_remove"
REJECTED = "this node is managed from infernet.yaml"
INTERRUPTED = "interrupted by a restart of infernet; issue it again"
CANCELLED = "cancelled from the dashboard"
# The state-store key where the session keeps models declared protect: true (still protected
# after they leave the file). It is reconciler.session.PROTECTED; the layering contract keeps
# commands and session independent, so a test checks the two stay equal.
PROTECTED = "protected"
# State-store status key: per command id, what undoes the file edit of an install still in
# flight (the file's bytes before it, a digest of them after it), so an install cut off by a
# crash is taken back out of the file by the next daemon instead of being pulled anyway.
UNDO = "command_undo"
BUSY = (
    "the node is busy: an apply or model command run on the node holds its lock; "
    "issue the command again in a while"
)
LOCK_WAIT = 5.0  # seconds a command waits for the node lock to edit the file
_ERROR_MAX = 500  # characters of an error we send; the server keeps 2000, a line is enough


@dataclass(frozen=True)
class ReconcileOutcome:
    """What the daemon's reconcile did: converged, what it advertises now, or why not."""

    converged: bool
    advertised: tuple[str, ...]
    error: str | None  # one line, when the reconcile failed or was refused


Reconcile = Callable[[Progress, threading.Event, frozenset[str]], ReconcileOutcome]
"""``reconcile(progress, cancel, force_remove_keys)``: re-read the file, plan, apply, beat."""


@dataclass(frozen=True)
class _Answer:
    status: str  # completed | failed
    result: dict[str, Any] | None = None
    error: str | None = None


def _failed(error: str) -> _Answer:
    return _Answer("failed", None, _line(error))


class CommandRunner:
    """Polls, runs and answers remote commands; the daemon calls ``run_pending`` every tick."""

    def __init__(
        self,
        *,
        client: ControlPlane,
        store: Store,
        config_path: Path,
        reconcile: Reconcile,
        clock: Callable[[], float] = time.monotonic,
        progress_interval: float = 2.0,
    ) -> None:
        self.client = client
        self.store = store
        self.config_path = config_path
        self.reconcile = reconcile
        self.clock = clock
        self.progress_interval = progress_interval
        self._active: set[str] = set()  # ids being run now: not "interrupted", just busy

    @property
    def busy(self) -> frozenset[str]:
        """Ids of the commands being run now (the daemon's reconcile must not settle them)."""
        return frozenset(self._active)

    def _file_lock(self) -> NodeLock:
        """The node lock, for reading and editing the file: never while a writer run from
        the shell (``apply``, ``model install``) has read it and not yet applied it."""
        held = NodeLock(self.store.state_dir, purpose="remote command")
        held.acquire(timeout=LOCK_WAIT)
        return held

    # ---- the tick

    def run_pending(self, *, limit: int = 5) -> list[str]:
        """Deliver owed answers, then claim up to ``limit`` commands and run them in turn."""
        self.deliver_pending()
        try:
            commands = self.client.poll_commands(limit)
        except ControlPlaneError as exc:
            log.warning("command poll failed: %s", exc)
            return []
        handled = []
        for command in commands:
            try:
                self._handle(command)
            except Exception:  # a bug must not stop the daemon or the other commands
                log.exception("command %s (%s) crashed the runner", command.id, command.command)
            handled.append(command.id)
        return handled

    def deliver_pending(self) -> int:
        """Send ``complete`` for every finished, unreported command; fail interrupted ones."""
        try:
            with self._file_lock():
                settle_interrupted(self.store, self.config_path, busy=self._active)
        except LockError:
            pass  # a writer holds the node: cut-off commands are settled on a later tick
        delivered = 0
        for record in self.store.unreported_commands():
            if record.command_id in self._active or record.state in ("received", "running"):
                continue
            answer = _recorded(record)
            try:
                self._send(record.command_id, answer)
            except ControlPlaneError as exc:
                log.warning("answer to command %s not delivered (will retry): %s",
                            record.command_id, exc)  # fmt: skip
                break  # the control plane is down or refusing us: the rest would fail the same
            delivered += 1
        return delivered

    # ---- one command

    def _handle(self, command: RemoteCommand) -> None:
        if not self.store.record_command(
            command_id=command.id, verb=command.command, payload=_storable(command.args)
        ):
            # Known id: it ran (or was cut off) already. Its answer, if owed, is in the outbox.
            log.warning("command %s was delivered again; not running it twice", command.id)
            return
        self._active.add(command.id)
        try:
            self.store.set_command_state(command.id, state="running")
            try:
                answer = self._execute(command)
            except Exception as exc:  # a bug: still answer, or the owner waits 24 h for nothing
                log.exception("command %s (%s) crashed", command.id, command.command)
                answer = _failed(f"internal error in infernet: {type(exc).__name__}: {exc}")
            answer = self._settle_edit(command.id, answer)
            self.store.set_command_state(
                command.id, state=answer.status, result=answer.result, error=answer.error
            )
        finally:
            self._active.discard(command.id)
        log.info("command %s %s %s: %s%s", command.id, command.command,
                 command.args.get("model", ""), answer.status,
                 f" ({answer.error})" if answer.error else "")  # fmt: skip
        try:
            self._send(command.id, answer)
        except ControlPlaneError as exc:
            log.warning("answer to command %s not delivered (will retry): %s", command.id, exc)

    def _send(self, command_id: str, answer: _Answer) -> None:
        """``complete`` once; a 2xx (a no-op answer included) means the answer is delivered."""
        try:
            now = self.client.complete(
                command_id, status=answer.status, result=answer.result, error=answer.error
            )
        except ControlPlaneError as exc:
            # The control plane's own 404/403 says nobody there awaits this answer (deleted,
            # or another node's): retrying forever would only fill the log.
            if exc.status not in (403, 404) or exc.detail is None:
                raise
            log.warning("command %s: %s; dropping its answer", command_id, exc)
            now = "gone"
        self.store.mark_command_reported(command_id)
        if now not in (answer.status, "gone"):
            log.info("command %s is %s on the control plane; our %s answer was a no-op",
                     command_id, now, answer.status)  # fmt: skip

    def _settle_edit(self, command_id: str, answer: _Answer) -> _Answer:
        """One truth: a failed install's edit is taken back out of the file (byte for byte
        when nobody touched the file since); a completed one's undo record is dropped."""
        if answer.status != "failed":
            _drop_undo(self.store, command_id)
            return answer
        try:
            with self._file_lock():
                note = undo_edit(self.store, self.config_path, command_id)
        except LockError:
            # Left for settle_interrupted, which every reconcile and tick runs.
            return answer
        return _failed((answer.error or "") + note) if note else answer

    def _execute(self, command: RemoteCommand) -> _Answer:
        if command.command not in (INSTALL, REMOVE):
            verb = _line(command.command)[:64] or "(empty)"
            return _failed(
                f"unsupported command '{verb}': this node runs only {INSTALL} and {REMOVE}"
            )
        try:
            current = desired.load(self.config_path)
        except ValidationError as exc:
            first = str(exc.problems[0]) if exc.problems else str(exc)
            return _failed(
                f"infernet.yaml is invalid right now: {first}; fix it before sending commands"
            )
        except ConfigError as exc:
            return _failed(
                f"infernet.yaml is invalid right now: {exc}; fix it before sending commands"
            )
        settings = current.control_plane
        if settings is not None and settings.commands == "reject":
            return _failed(REJECTED)
        cancel = threading.Event()
        progress = CommandProgress(self.client, command.id, cancel,
                                   clock=self.clock, interval=self.progress_interval)  # fmt: skip
        try:
            if command.command == INSTALL:
                return self._install(command.id, command.args, current, progress, cancel)
            return self._remove(command.args, current, progress, cancel)
        except LockError:
            return _failed(BUSY)  # the holder's PID and command line stay on the node
        except InfernetError as exc:
            return _failed(str(exc))

    # ---- model_install

    def _install(
        self,
        command_id: str,
        args: dict[str, Any],
        current: Desired,
        progress: CommandProgress,
        cancel: threading.Event,
    ) -> _Answer:
        target = install_target(args, current)
        if isinstance(target, str):
            return _failed(target)
        model, backend, entry, advertised = target
        wanted = names.key(backend, names.canonical(backend, _entry_name(entry)))
        existing = next((m for m in current.models
                         if names.key(m.backend, m.canonical) == wanted
                         or m.advertise_as == advertised), None)  # fmt: skip
        progress.stage("config", "editing infernet.yaml", 1)
        if cancel.is_set():
            return _failed(CANCELLED)
        if existing is None:

            def keep_undo(before: bytes, after: bytes) -> None:
                # In the store before the file changes: a crash from here on is undone.
                _keep_undo(self.store, command_id, before, after, name=_entry_name(entry),
                           backend=backend)  # fmt: skip

            with self._file_lock():
                configedit.add_model(self.config_path, entry, before_write=keep_undo)
        else:
            backend, advertised = existing.backend, existing.advertise_as
        outcome, crash = self._reconcile(progress, cancel, frozenset())
        ok = outcome is not None and outcome.converged and advertised in outcome.advertised
        if cancel.is_set():
            # A cancelled or failed install must not stay in the file (``_settle_edit`` takes
            # it out): the node would keep pulling (or failing to plan) a model nobody wants.
            # The next tick prunes whatever was already downloaded (infernet owns it).
            return _failed(CANCELLED)
        if not ok:
            return _failed(crash or _why_not(outcome, progress, f"{advertised} is not advertised"))
        assert outcome is not None
        result: dict[str, Any] = {"model": model, "backend": backend.value,
                                  "advertised": list(outcome.advertised)}  # fmt: skip
        if existing is not None:
            result["note"] = f"{existing.name} was already in infernet.yaml"
        return _Answer("completed", result)

    # ---- model_remove

    def _remove(
        self,
        args: dict[str, Any],
        current: Desired,
        progress: CommandProgress,
        cancel: threading.Event,
    ) -> _Answer:
        """Exactly what dropping the entry from the file by hand does: the entry leaves the
        file, and the prune policy decides whether weights are deleted (a model infernet did
        not install stays under ``prune: managed``; nothing goes under ``prune: none``)."""
        name = args.get("model")
        problem = name_problem(name)
        if problem is not None:
            return _failed(problem)
        assert isinstance(name, str)
        matched = [m for m in current.models if configedit.refers_to(m, name)]
        if matched:
            keys = {names.key(m.backend, m.canonical) for m in matched}
        else:
            reason = names.is_valid(current.default_backend, name)
            if reason is not None:
                return _failed(reason)
            keys = {names.key(current.default_backend,
                              names.canonical(current.default_backend, name))}  # fmt: skip
        guarded = [m.name for m in matched if m.protect]
        # A model that left the file stays protected until it is gone (the session keeps
        # those keys); the planner keeps it too, but the answer should say why.
        remembered = keys & set(self.store.get_status(PROTECTED) or [])
        if guarded or remembered:
            where = "is protect: true in infernet.yaml" if guarded else "was declared protect: true"
            return _failed(
                f"{guarded[0] if guarded else name} {where}; remote commands never remove "
                "protected models"
            )
        owned = {names.key(r.backend, r.canonical) for r in self.store.owned()}
        progress.stage("config", "editing infernet.yaml", 1)
        if cancel.is_set():
            return _failed(CANCELLED)
        if matched:
            with self._file_lock():
                configedit.remove_model(self.config_path, name, None)
        # From here the removal runs to its end even if cancelled: the file no longer lists
        # the model, and a half-undone removal would be worse than a finished one. Nothing is
        # forced: the reconcile removes what the prune policy removes for any edit of the file.
        outcome, crash = self._reconcile(progress, threading.Event(), frozenset())
        removals = {k: progress.finished.get((Op.REMOVE.value, k)) for k in keys}
        failed = [done for done in removals.values() if done and done[0] != "ok"]
        gone = [m.advertise_as for m in matched]
        if failed:
            return _failed(f"removing {name} failed: {failed[0][1] or failed[0][0]}")
        if outcome is None or (not outcome.converged and not any(removals.values())):
            return _failed(crash or _why_not(outcome, progress, f"{name} may still be served"))
        if any(a in outcome.advertised for a in gone):
            return _failed(f"{name} is still advertised after the apply")
        result: dict[str, Any] = {"model": name, "removed": [m.name for m in matched],
                                  "advertised": list(outcome.advertised)}  # fmt: skip
        if not any(removals.values()):
            kept = _kept_because(current.policy.prune, bool(keys & owned))
            result["note"] = (
                f"removed {name} from infernet.yaml; nothing deleted ({kept})"
                if matched
                else f"{name} is not in infernet.yaml; nothing deleted ({kept})"
            )
        return _Answer("completed", result)

    # ---- shared

    def _reconcile(
        self, progress: CommandProgress, cancel: threading.Event, force: frozenset[str]
    ) -> tuple[ReconcileOutcome | None, str | None]:
        """The daemon's reconcile; a raise becomes a one-line reason instead of a crash."""
        try:
            return self.reconcile(progress, cancel, force), None
        except InfernetError as exc:
            return None, _line(str(exc))
        except Exception as exc:
            log.exception("reconcile for a remote command crashed")
            return None, _line(f"internal error in infernet: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- helpers


def _storable(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as the ledger can keep them: NaN and Infinity (which Python's JSON parser
    accepts from the control plane) become strings; the checks still see the original."""
    stored: dict[str, Any] = json.loads(json.dumps(args, default=str), parse_constant=str)
    return stored


def _kept_because(prune: str, owned: bool) -> str:
    """Why a model that is not (or no longer) in the file was not deleted."""
    if prune == "none":
        return "policy.prune: none keeps the weights of models that leave the file"
    if prune == "managed" and not owned:
        return "infernet did not install it, and policy.prune: managed deletes only what it did"
    return "it is not installed"


# --------------------------------------------------------------------------- undoing an edit


def _keep_undo(
    store: Store, command_id: str, before: bytes, after: bytes, *, name: str, backend: BackendKind
) -> None:
    undo = dict(store.get_status(UNDO) or {})
    undo[command_id] = {
        "before": base64.b64encode(before).decode("ascii"),
        "after_sha256": hashlib.sha256(after).hexdigest(),
        "name": name,
        "backend": backend.value,
    }
    store.put_status(UNDO, undo)


def _drop_undo(store: Store, command_id: str) -> None:
    undo = dict(store.get_status(UNDO) or {})
    if undo.pop(command_id, None) is not None:
        store.put_status(UNDO, undo)


def undo_edit(store: Store, config_path: Path, command_id: str) -> str:
    """Take the file edit of install ``command_id`` back; the caller holds the node lock.

    The file gets its bytes from before the edit back when it is exactly as the edit left it.
    When someone changed it since, their changes stay and only the added entry is removed.
    Returns "" when done (or there was nothing to undo), else a note for the answer.
    """
    undo = (store.get_status(UNDO) or {}).get(command_id)
    if not isinstance(undo, dict):
        return ""
    name = str(undo.get("name", ""))
    note = ""
    try:
        now = config_path.read_bytes()
        if hashlib.sha256(now).hexdigest() == undo.get("after_sha256"):
            write_atomically(config_path, base64.b64decode(undo.get("before", "")))
        elif name:
            configedit.remove_model(config_path, name, BackendKind(undo.get("backend", "ollama")))
    except (OSError, ValueError, InfernetError) as exc:
        log.error("could not take %s back out of %s: %s", name, config_path, exc)
        note = f"; infernet.yaml still lists {name} (could not revert: {_line(str(exc))})"
    _drop_undo(store, command_id)
    return note


def settle_interrupted(store: Store, config_path: Path, *, busy: Collection[str] = ()) -> list[str]:
    """Settle commands a crash or kill cut off (still ``received``/``running`` in the ledger
    and not being run now): take back the file edit an install made and mark them failed, so
    the node and the answer agree: it is not installed. Running one again could do it twice;
    the owner decides whether to issue it again. Also takes back the edit of a failed install
    whose revert could not run then. The caller holds the node lock; returns the settled ids.
    """
    settled: list[str] = []
    for record in store.unreported_commands():
        if record.command_id in busy or record.state not in ("received", "running"):
            continue
        log.warning("command %s (%s) was interrupted; answering failed",
                    record.command_id, record.verb)  # fmt: skip
        note = undo_edit(store, config_path, record.command_id)
        store.set_command_state(record.command_id, state="failed", error=INTERRUPTED + note)
        settled.append(record.command_id)
    for command_id in list(store.get_status(UNDO) or {}):
        seen = store.command_seen(command_id)
        if command_id in busy or (seen is not None and seen.state in ("received", "running")):
            continue
        if seen is None or seen.state == "failed":  # failed, or its ledger row is gone
            undo_edit(store, config_path, command_id)
            settled.append(command_id)
        else:
            _drop_undo(store, command_id)
    return settled


def _entry_name(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else str(entry["name"])


def _why_not(outcome: ReconcileOutcome | None, progress: CommandProgress, what: str) -> str:
    """The best one-line reason a reconcile didn't do what the command asked."""
    if outcome is not None and outcome.error:
        return outcome.error
    failed = [m for outcome_, m in progress.finished.values() if outcome_ == "failed" and m]
    if failed:
        return failed[0]
    if outcome is not None and outcome.converged:
        return f"{what} after the apply"
    return f"the node did not converge, so {what} (see infernet status on the node)"


def _recorded(record: CommandRecord) -> _Answer:
    return _Answer(record.state, record.result, record.error)


def _line(text: str) -> str:
    """One line, cut: the dashboard shows it in a table cell."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _ERROR_MAX else flat[: _ERROR_MAX - 1] + "…"


__all__ = [
    "CANCELLED",
    "INTERRUPTED",
    "NO_HF",
    "REJECTED",
    "CommandRunner",
    "Reconcile",
    "ReconcileOutcome",
    "model_problem",
    "name_problem",
    "settle_interrupted",
    "undo_edit",
]
