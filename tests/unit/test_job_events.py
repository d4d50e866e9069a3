"""A job's events: batched (first at once, then 16 or 250 ms), in order, never duplicated."""

from __future__ import annotations

import threading
import time
from typing import Any

from reconciler.controlplane.jobs import Delivery, JobCallFailed
from reconciler.serving.events import EventSender


class Recorder:
    """A control plane's events route: stores batches, or fails as told."""

    def __init__(self, failures: tuple[Delivery, ...] = ()) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.failures = list(failures)
        self.lock = threading.Lock()

    def __call__(self, events: list[dict[str, Any]]) -> None:
        with self.lock:
            if self.failures:
                kind = self.failures.pop(0)
                if kind is Delivery.UNKNOWN:
                    self.batches.append(list(events))  # stored, answer lost
                raise JobCallFailed(str(kind), kind)
            self.batches.append(list(events))

    def stored(self) -> list[dict[str, Any]]:
        return [e for b in self.batches for e in b]


def tokens(n: int) -> list[tuple[str, dict[str, Any]]]:
    return [("token", {"text": f"t{i}"}) for i in range(n)]


def test_first_event_goes_at_once_then_a_batch_at_16() -> None:
    rec = Recorder()
    s = EventSender(rec, flush_age=10.0)
    s.emit("meta", {"model": "m"})
    time.sleep(0.1)
    assert len(rec.batches) == 1
    for t, d in tokens(15):
        s.emit(t, d)
    time.sleep(0.2)
    assert len(rec.batches) == 1  # 15 wait for the 16th (or the timer)
    s.emit("token", {"text": "x"})
    time.sleep(0.2)
    assert [len(b) for b in rec.batches] == [1, 16]
    s.emit("done", {"text": "x"})
    assert s.close(2)
    assert rec.stored()[-1]["event_type"] == "done"


def test_a_stalled_backend_still_gets_its_tokens_out_by_the_timer() -> None:
    rec = Recorder()
    s = EventSender(rec, flush_age=0.1)
    s.emit("meta", {})
    s.emit("token", {"text": "a"})
    time.sleep(0.4)
    assert sum(len(b) for b in rec.batches) == 2
    s.emit("done", {})
    assert s.close(2)


def test_at_most_200_a_batch_in_order() -> None:
    rec = Recorder()
    s = EventSender(rec, flush_age=10.0)
    s.emit("meta", {})
    time.sleep(0.05)
    for t, d in tokens(500):
        s.emit(t, d)
    s.emit("done", {})
    assert s.close(3)
    assert max(len(b) for b in rec.batches) <= 200
    texts = [e["data"].get("text") for e in rec.stored() if e["event_type"] == "token"]
    assert texts == [f"t{i}" for i in range(500)]


def test_an_answered_failure_resends_the_same_batch() -> None:
    rec = Recorder([Delivery.NOT_STORED, Delivery.NOT_STORED])
    s = EventSender(rec, retry_delay=0.01)
    s.emit("meta", {})
    for t, d in tokens(3):
        s.emit(t, d)
    s.emit("done", {"text": "t0t1t2"})
    assert s.close(3)
    kinds = [e["event_type"] for e in rec.stored()]
    assert kinds.count("token") == 3 and kinds.count("meta") == 1 and kinds[-1] == "done"


def test_a_lost_answer_never_duplicates_tokens_but_resends_the_terminal() -> None:
    rec = Recorder([Delivery.UNKNOWN])
    s = EventSender(rec, retry_delay=0.01, flush_age=10.0)
    for t, d in tokens(3):
        s.emit(t, d)
    s.emit("done", {"text": "x"})
    assert s.close(3)
    kinds = [e["event_type"] for e in rec.stored()]
    assert kinds.count("token") == 3
    assert kinds.count("done") >= 1 and kinds[-1] == "done"


def test_a_job_that_is_gone_stops_the_sender() -> None:
    rec = Recorder([Delivery.GONE])
    s = EventSender(rec)
    s.emit("meta", {})
    s.emit("token", {"text": "a"})
    s.emit("done", {})
    assert s.close(2)
    assert s.gone
