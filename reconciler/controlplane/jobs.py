"""The control plane's job routes, as the real one serves them (``infernet-jobs.md``).

``POST /api/v1/node/jobs/poll {limit}`` returns every ``assigned`` job of this node, oldest
first, up to ``limit`` (at most 25), on every poll until each is completed: polling claims
nothing. ``POST /jobs/<id>/events {events}`` stores up to 200 events in one insert (all or
none); ``POST /jobs/<id>/complete`` sets the job's final status and is not idempotent.

A failed call says what it means for what was sent (``Delivery``): an answer from the server,
or a connection never made, means nothing was stored; a lost answer means it may have been;
a 403/404 means the job is not ours (any more).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from urllib.parse import quote

from reconciler.controlplane.client import ControlPlane, ControlPlaneError

POLL_MAX = 25  # the control plane returns at most this many jobs per poll


class Delivery(StrEnum):
    """What a failed call says about what it carried."""

    NOT_STORED = "not_stored"  # answered with an error, or never sent: send it again
    UNKNOWN = "unknown"  # the answer was lost: it may be stored
    GONE = "gone"  # the job is not ours (any more): stop


class JobCallFailed(Exception):
    """A job route did not get a 2xx; ``delivery`` says what that means for what it carried."""

    def __init__(self, message: str, delivery: Delivery) -> None:
        super().__init__(message)
        self.delivery = delivery


def delivery(exc: ControlPlaneError) -> Delivery:
    """What a failed call means for what it carried."""
    if exc.status in (403, 404):
        return Delivery.GONE
    if exc.status is not None:
        # 5xx and 429: the server answered without storing (one insert, all or none); any
        # other 4xx means it will never take this request as sent.
        return Delivery.NOT_STORED if exc.status >= 500 or exc.status == 429 else Delivery.GONE
    return Delivery.NOT_STORED if exc.unsent else Delivery.UNKNOWN


class JobRoutes:
    """The job routes on a signed client."""

    def __init__(self, client: ControlPlane) -> None:
        self.client = client

    def poll_jobs(self, limit: int = POLL_MAX) -> list[object]:
        """The assigned jobs, oldest first (raises ``ControlPlaneError``)."""
        data = self.client.post("/api/v1/node/jobs/poll", {"limit": limit})
        rows = data.get("jobs") if isinstance(data, dict) else None
        return list(rows[:limit]) if isinstance(rows, list) else []

    def post_job_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        """One batch of events, in order; raises ``JobCallFailed``."""
        self._call(f"/api/v1/node/jobs/{quote(job_id, safe='')}/events", {"events": events})

    def complete_job(self, job_id: str, answer: dict[str, Any]) -> None:
        """The job's one answer; raises ``JobCallFailed``."""
        self._call(f"/api/v1/node/jobs/{quote(job_id, safe='')}/complete", answer)

    def _call(self, path: str, body: dict[str, Any]) -> None:
        try:
            self.client.post(path, body)
        except ControlPlaneError as exc:
            raise JobCallFailed(str(exc), delivery(exc)) from exc
