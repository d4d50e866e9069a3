"""Remote commands from the dashboard (``model_install``, ``model_remove``), run exactly once.

The control plane hands out a command once (poll flips it to ``running``) and expects one
``complete``. The state store's ledger makes that hold across crashes: a command id is entered
(``received``) before anything is done and only moves forward (``running`` → ``completed`` |
``failed``), so a redelivered or half-run command is never run again; a finished command stays
"unreported" until its ``complete`` got a 2xx, so the ledger's unreported list is the outbox
that ``deliver_pending`` drains on every tick. A command found ``received``/``running`` from
before a restart is answered as failed, not re-run: we can't know how far it got.

Every refusal (policy, unknown verb, bad name, invalid file, protected model) is answered with
``failed`` and a one-line reason before anything reaches a backend. What a verb does is its
handler's, in the verb table (``daemon.verbs``); accepted commands edit ``infernet.yaml``
through ``converge.edits`` and reconcile through the daemon's reconcile. An install that
fails, is cancelled or is cut off by a crash is answered ``failed`` and taken back out of the
file (its bytes from before the edit are kept in the store first), so the answer and the node
always agree.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from reconciler import limits
from reconciler.config import desired
from reconciler.controlplane.client import ControlPlane, ControlPlaneError, RemoteCommand
from reconciler.controlplane.progress import CommandProgress
from reconciler.converge import edits
from reconciler.daemon.verbs import VERBS, Answer, Context, ReconcileOutcome, answer_line, failed
from reconciler.errors import (
    ConfigError,
    InfernetError,
    LockError,
    ValidationError,
    listed,
    one_line,
)
from reconciler.events import Progress
from state import CommandRecord, NodeLock, Store

log = logging.getLogger("infernet.commands")

REJECTED = "this node is managed from infernet.yaml"
INTERRUPTED = "interrupted by a restart of infernet; issue it again"
BUSY = (
    "the node is busy: an apply or model command run on the node holds its lock; "
    "issue the command again in a while"
)
LOCK_WAIT = 5.0  # seconds a command waits for the node lock to edit the file


Reconcile = Callable[[Progress, threading.Event, frozenset[str]], ReconcileOutcome]
"""``reconcile(progress, cancel, force_remove_keys)``: re-read the file, plan, apply, beat."""


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

    def run_pending(self, *, limit: int = limits.POLL_LIMIT) -> list[str]:
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
                log.warning(
                    "answer to command %s not delivered (will retry): %s", record.command_id, exc
                )
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
                answer = failed(f"internal error in infernet: {type(exc).__name__}: {exc}")
            answer = self._settle_edit(command.id, answer)
            self.store.set_command_state(
                command.id, state=answer.status, result=answer.result, error=answer.error
            )
        finally:
            self._active.discard(command.id)
        log.info(
            "command %s %s %s: %s%s",
            command.id,
            command.command,
            command.args.get("model", ""),
            answer.status,
            f" ({answer.error})" if answer.error else "",
        )
        try:
            self._send(command.id, answer)
        except ControlPlaneError as exc:
            log.warning("answer to command %s not delivered (will retry): %s", command.id, exc)

    def _send(self, command_id: str, answer: Answer) -> None:
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
            log.info(
                "command %s is %s on the control plane; our %s answer was a no-op",
                command_id,
                now,
                answer.status,
            )

    def _settle_edit(self, command_id: str, answer: Answer) -> Answer:
        """One truth: a failed install's edit is taken back out of the file (byte for byte
        when nobody touched the file since); a completed one's undo record is dropped."""
        if answer.status != "failed":
            edits.drop_undo(self.store, command_id)
            return answer
        try:
            with self._file_lock():
                note = edits.undo_edit(self.store, self.config_path, command_id)
        except LockError:
            # Left for settle_interrupted, which every reconcile and tick runs.
            return answer
        return failed((answer.error or "") + note) if note else answer

    def _execute(self, command: RemoteCommand) -> Answer:
        handler = VERBS.get(command.command)
        if handler is None:
            verb = one_line(command.command, limits.MAX_VERB, mark="") or "(empty)"
            return failed(
                f"unsupported command '{verb}': this node runs only {listed(list(VERBS))}"
            )
        try:
            current = desired.load(self.config_path)
        except ValidationError as exc:
            first = str(exc.problems[0]) if exc.problems else str(exc)
            return failed(
                f"infernet.yaml is invalid right now: {first}; fix it before sending commands"
            )
        except ConfigError as exc:
            return failed(
                f"infernet.yaml is invalid right now: {exc}; fix it before sending commands"
            )
        settings = current.control_plane
        if settings is not None and settings.commands == "reject":
            return failed(REJECTED)
        cancel = threading.Event()
        progress = CommandProgress(
            self.client, command.id, cancel, clock=self.clock, interval=self.progress_interval
        )
        context = Context(
            command_id=command.id,
            args=command.args,
            current=current,
            progress=progress,
            cancel=cancel,
            store=self.store,
            config_path=self.config_path,
            file_lock=self._file_lock,
            reconcile=self._reconcile,
        )
        try:
            return handler(context)
        except LockError:
            return failed(BUSY)  # the holder's PID and command line stay on the node
        except InfernetError as exc:
            return failed(str(exc))

    def _reconcile(
        self, progress: CommandProgress, cancel: threading.Event, force: frozenset[str]
    ) -> tuple[ReconcileOutcome | None, str | None]:
        """The daemon's reconcile; a raise becomes a one-line reason instead of a crash."""
        try:
            return self.reconcile(progress, cancel, force), None
        except InfernetError as exc:
            return None, answer_line(str(exc))
        except Exception as exc:
            log.exception("reconcile for a remote command crashed")
            return None, one_line(f"internal error in infernet: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- helpers


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
        log.warning(
            "command %s (%s) was interrupted; answering failed", record.command_id, record.verb
        )
        note = edits.undo_edit(store, config_path, record.command_id)
        store.set_command_state(record.command_id, state="failed", error=INTERRUPTED + note)
        settled.append(record.command_id)
    for command_id in edits.undo_pending(store):
        seen = store.command_seen(command_id)
        if command_id in busy or (seen is not None and seen.state in ("received", "running")):
            continue
        if seen is None or seen.state == "failed":  # failed, or its ledger row is gone
            edits.undo_edit(store, config_path, command_id)
            settled.append(command_id)
        else:
            edits.drop_undo(store, command_id)
    return settled


def _storable(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` as the ledger can keep them: NaN and Infinity (which Python's JSON parser
    accepts from the control plane) become strings; the checks still see the original."""
    stored: dict[str, Any] = json.loads(json.dumps(args, default=str), parse_constant=str)
    return stored


def _recorded(record: CommandRecord) -> Answer:
    return Answer(record.state, record.result, record.error)


__all__ = ["INTERRUPTED", "REJECTED", "CommandRunner", "Reconcile", "settle_interrupted"]
