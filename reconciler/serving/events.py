"""A job's events on their way to the control plane: batched, in order, never duplicated.

The control plane stores a job's events as rows ordered by insert id, and every consumer stops at
the first terminal event (``done`` or ``error``). So one sender thread per job posts batches one
after another, each waiting for the answer to the last. A batch goes when 16 events wait, when
250 ms have passed since the last batch went (at once for the first, so the first token is not
held back), or with the terminal event; while the backend stalls, the same 250 ms timer sends
what waits. A batch holds at most 200 events (the server refuses more).

A batch that failed is handled by what the failure says about the rows:

* the control plane answered (a 5xx, a 429) or the connection was never made: nothing was
  stored (the rows go in one insert), so the same batch goes again, in order, with backoff;
* the answer was lost (a timeout or a reset after the request went out): the rows may be stored,
  so tokens are not sent again (the consumer would see them twice), but a terminal event is
  (readers stop at the first, so a second one is harmless, and a missing one hangs them);
* any other 4xx: the job is gone or not ours; the sender stops and says so (``gone``).

A batch that still fails after ``give_up`` seconds is dropped (logged); the job's ``complete``
still carries the whole text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reconciler.controlplane.jobs import Delivery, JobCallFailed

log = logging.getLogger("infernet.jobs")

MAX_BATCH = 200  # the control plane's limit per request
FLUSH_COUNT = 16
FLUSH_AGE = 0.25
TERMINAL = frozenset({"done", "error"})


Post = Callable[[list[dict[str, Any]]], None]
"""Posts one batch of events; raises ``JobCallFailed`` when it did not get a 2xx."""


@dataclass
class _Event:
    event_type: str
    data: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"event_type": self.event_type, "data": self.data}


class EventSender:
    """Sends one job's events; ``emit`` never blocks on the network."""

    def __init__(
        self,
        post: Post,
        *,
        name: str = "job",
        clock: Callable[[], float] = time.monotonic,
        flush_count: int = FLUSH_COUNT,
        flush_age: float = FLUSH_AGE,
        max_batch: int = MAX_BATCH,
        retry_delay: float = 0.25,
        give_up: float = 60.0,
    ) -> None:
        self._post = post
        self._clock = clock
        self._flush_count = flush_count
        self._flush_age = flush_age
        self._max_batch = max_batch
        self._retry_delay = retry_delay
        self._give_up = give_up
        self._pending: list[_Event] = []
        self._closed = False
        self._cond = threading.Condition()
        self._last_sent = float("-inf")
        self.gone: str | None = None  # why the control plane no longer takes this job's events
        self.sent = 0  # events stored (or, after a lost answer, maybe stored)
        self.dropped = 0  # events given up on
        self._thread = threading.Thread(target=self._run, name=f"events-{name}", daemon=True)
        self._thread.start()

    # ---- the producer's side

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        """Queue one event; a terminal one ends the stream (later ones are ignored)."""
        with self._cond:
            if self._closed:
                return
            self._pending.append(_Event(event_type, data))
            if event_type in TERMINAL:
                self._closed = True
            self._cond.notify()

    def close(self, timeout: float) -> bool:
        """Stop taking events and wait up to ``timeout`` s for what waits to be sent; True
        when everything went (or the job is gone and there is nothing more to do)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- the sender thread

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._send(batch)

    def _next_batch(self) -> list[_Event] | None:
        """Wait until a batch is due; None when the stream is over and everything went."""
        with self._cond:
            while True:
                if self.gone is not None:
                    return None
                if self._pending:
                    due = self._last_sent + self._flush_age
                    now = self._clock()
                    ended = self._closed or any(e.event_type in TERMINAL for e in self._pending)
                    if ended or len(self._pending) >= self._flush_count or now >= due:
                        batch = self._pending[: self._max_batch]
                        del self._pending[: self._max_batch]
                        return batch
                    self._cond.wait(max(0.0, due - now))
                elif self._closed:
                    return None
                else:
                    self._cond.wait()

    def _send(self, batch: list[_Event]) -> None:
        first_failure: float | None = None
        delay = self._retry_delay
        while batch:
            try:
                self._post([e.wire() for e in batch])
            except JobCallFailed as exc:
                if exc.delivery is Delivery.GONE:
                    log.warning("job events not accepted any more: %s", exc)
                    with self._cond:
                        self.gone = str(exc)
                        self.dropped += len(batch) + len(self._pending)
                        self._pending.clear()
                    return
                if exc.delivery is Delivery.UNKNOWN:
                    # Maybe stored: never send tokens twice; a terminal event must arrive.
                    self.sent += sum(1 for e in batch if e.event_type not in TERMINAL)
                    batch = [e for e in batch if e.event_type in TERMINAL]
                now = self._clock()
                first_failure = now if first_failure is None else first_failure
                if not batch:
                    break
                if now - first_failure >= self._give_up:
                    log.warning(
                        "dropping %d job events after %.0fs of failures: %s",
                        len(batch),
                        now - first_failure,
                        exc,
                    )
                    self.dropped += len(batch)
                    break
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.sent += len(batch)
            break
        with self._cond:
            self._last_sent = self._clock()
