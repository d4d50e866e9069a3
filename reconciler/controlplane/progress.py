"""Progress of one remote command, posted to the control plane as the protocol stores it.

The body is ``{status, phase, step, steps, total?, completed?, pct}`` (the server keeps only
those keys and only the latest object). Executor events arrive here, some from the pull
threads at once; a post goes out on a phase change or once ``interval`` seconds have passed,
never more often, because each one is a signed request to a shared control plane. The reply
echoes the row's status: ``cancelled`` is how the owner's cancel reaches the node, so it sets
``cancel``, which the executor checks between pull chunks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from reconciler import limits
from reconciler.controlplane.client import ControlPlane, ControlPlaneError
from reconciler.events import Event, Kind
from reconciler.model import Op
from reconciler.names import key

log = logging.getLogger("infernet.commands")

STEPS = 3  # 1 edit infernet.yaml, 2 apply (download, load, remove), 3 check the node
# Ollama's pull statuses after the bytes have arrived.
_AFTER_DOWNLOAD = ("verifying", "writing manifest", "success", "removing unused layers")


class CommandProgress:
    """The ``Progress`` callback for one command; ``finished`` records how each action ended."""

    def __init__(
        self,
        client: ControlPlane,
        command_id: str,
        cancel: threading.Event,
        *,
        clock: Callable[[], float],
        interval: float,
    ) -> None:
        self._client = client
        self._id = command_id
        self._cancel = cancel
        self._clock = clock
        self._interval = interval
        self._lock = threading.Lock()
        self._sending = False
        self._last_at: float | None = None
        self._posted_phase: str | None = None
        self._phase, self._status, self._step = "config", "starting", 1
        self._bytes: dict[str, tuple[int, int]] = {}  # model key → (completed, total)
        # (op, model key) → (outcome, message) of every finished action, for the answer.
        self.finished: dict[tuple[str, str], tuple[str, str | None]] = {}

    def stage(self, phase: str, status: str, step: int) -> None:
        """Enter a stage of the command's own (not the executor's) and post it now."""
        with self._lock:
            self._phase, self._status, self._step = phase, status, step
        self._post(force=True)

    def __call__(self, event: Event) -> None:
        action = event.action
        with self._lock:
            if action is not None:
                model_key = key(action.backend, action.canonical)
                if event.kind is Kind.STARTED:
                    self._phase, self._status = _started(action.op, action.model)
                    self._step = 2
                elif event.kind is Kind.PROGRESS:
                    after = (event.phase or "").startswith(_AFTER_DOWNLOAD)
                    self._phase = "verify" if after else "download"
                    self._status = f"{'verifying' if after else 'pulling'} {action.model}"
                    if event.completed is not None and event.total:
                        self._bytes[model_key] = (event.completed, event.total)
                elif event.kind is Kind.RETRY:
                    self._status = f"retrying {action.op.value} {action.model}"
                elif event.kind is Kind.FINISHED:
                    self.finished[(action.op.value, model_key)] = (
                        event.outcome or "ok",
                        event.message,
                    )
                    done = self._bytes.get(model_key)
                    if done is not None and event.outcome == "ok":
                        self._bytes[model_key] = (done[1], done[1])
            elif event.kind is Kind.CONVERGED:
                self._phase, self._status, self._step = "check", "checking the node", 3
        self._post(force=False)

    def _post(self, *, force: bool) -> None:
        with self._lock:
            now = self._clock()
            due = (
                force
                or self._last_at is None
                or self._phase != self._posted_phase
                or now - self._last_at >= self._interval
            )
            # A post already on the wire (from another pull thread) stands for this one too:
            # waiting for it would stall that thread's download.
            if not due or self._sending:
                return
            self._sending = True
            self._last_at, self._posted_phase = now, self._phase
            body = self._body()
        try:
            reply = self._client.post_progress(self._id, body)
        except ControlPlaneError as exc:
            # Progress is advisory (protocol §4): the command goes on, the next post may land.
            log.debug("command %s: progress not posted: %s", self._id, exc)
            reply = ""
        finally:
            with self._lock:
                self._sending = False
        if reply == "cancelled" and not self._cancel.is_set():
            log.info("command %s was cancelled from the dashboard; stopping", self._id)
            self._cancel.set()

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": self._status[: limits.PROGRESS_STATUS],
            "phase": self._phase[: limits.PROGRESS_PHASE],
            "step": self._step,
            "steps": STEPS,
            "pct": 0,
        }
        if self._bytes:
            # Parallel pulls add up: one bar for the command, as the dashboard shows one.
            completed = sum(done for done, _ in self._bytes.values())
            total = sum(total for _, total in self._bytes.values())
            body.update(total=total, completed=completed, pct=round(100 * completed / total, 1))
        return body


def _started(op: Op, model: str) -> tuple[str, str]:
    if op in (Op.PULL, Op.UPDATE):
        return "download", f"pulling {model}"
    if op is Op.PIN:
        return "load", f"loading {model}"
    if op is Op.UNPIN:
        return "load", f"unpinning {model}"
    return "remove", f"removing {model}"
