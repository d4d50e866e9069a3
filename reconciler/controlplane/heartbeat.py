"""Heartbeats: tell the control plane exactly what this node serves, after every convergence.

The control plane routes a job only to nodes whose ``specs.served_models`` holds the requested
name, so the list sent is what is installed, verified and fits the budget now
(``planning.advertised.now``), never what is merely desired. Nothing here can fail an apply: a
control plane that is down, slow or refusing is recorded in the state store (``status`` shows
it) and reported in one line. The body is built here: ``specs_for`` (``specs``) around the
advertised names and ``report``, the reconciler's own part.

Before weights are deleted, ``withdraw`` sends a heartbeat without them and waits for a 2xx,
retrying for ``WITHDRAW_TIMEOUT`` seconds; if none comes, the delete goes ahead and the
withdrawal is recorded as unconfirmed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.controlplane.client import ControlPlane, ControlPlaneError, specs_for
from reconciler.controlplane.identity import load_key
from reconciler.controlplane.load import published
from reconciler.errors import InfernetError
from reconciler.model import ConfigSource, ControlPlaneSettings, GpuState, Plan
from reconciler.redact import redact
from state import StatusKey, Store, clock

WITHDRAW_TIMEOUT = 20.0


def report(
    source: ConfigSource,
    *,
    converged: bool,
    the_plan: Plan | None,
    errors: Sequence[str] = (),
    drift: Sequence[str] = (),
    last_apply_at: str | None = None,
) -> dict[str, Any]:
    """``specs.reconciler``: how this node's reconciliation stands, from the plan last made
    (its drift, errors and estimates), or, when none could be made, from ``drift`` alone."""
    if the_plan is not None:
        drift = [f"{a.op.value} {a.model}" for a in the_plan.actions]
        errors = [*the_plan.errors, *the_plan.unserved, *errors]
    estimates = the_plan.budget.estimates if the_plan is not None else ()
    return {
        "config_sha256": source.sha256,
        "git_commit": source.git_commit,
        "converged": converged,
        "drift": list(drift),
        "errors": list(errors),
        "last_apply_at": last_apply_at,
        "estimates": [
            {
                "model": e.model,
                "bytes": e.bytes,
                "source": e.source,
                "estimated_bytes": e.estimated_bytes,
                "measured_bytes": e.measured_bytes,
            }
            for e in estimates
        ],
    }


@dataclass
class Heartbeater:
    """Sends heartbeats for one node and records each outcome in the store."""

    settings: ControlPlaneSettings
    store: Store
    withdraw_timeout: float = WITHDRAW_TIMEOUT
    sleep: Callable[[float], None] = time.sleep
    jobs: Callable[[], Mapping[str, Any]] | None = None
    """The job figures for ``load`` and ``bench``, asked at every beat: the daemon's live
    runner; by default what a running daemon published (``load.published``)."""
    _client: ControlPlane | None = field(default=None, init=False)

    def client(self) -> ControlPlane:
        """The signed client (built on first use: loading the key may fail, in one line)."""
        return self._connect()

    def _connect(self) -> ControlPlane:
        if self._client is None:
            ca = self.settings.ca_bundle
            self._client = ControlPlane(
                self.settings,
                load_key(self.settings.key_file),
                ca_bundle=str(Path(ca).expanduser()) if ca else None,
            )
        return self._client

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _send(
        self, served: tuple[str, ...], gpu: GpuState, extension: dict[str, Any]
    ) -> Exception | None:
        """One heartbeat with the full specs; records the outcome; returns the failure."""
        record: dict[str, Any] = {
            "at": clock.stamp(),
            "url": redact(self.settings.url),
            "served_models": list(served),
        }
        failure: Exception | None = None
        try:
            jobs = self.jobs() if self.jobs is not None else published(self.store)
            specs = specs_for(list(served), gpu, extension=extension, jobs=jobs)
            outcome = self._connect().heartbeat({"status": "available", "specs": specs})
            record.update(ok=True, registered=outcome.registered, error=None)
        except (InfernetError, ValueError) as exc:
            failure = exc
            record.update(ok=False, error=_describe(self.settings.url, exc))
        self.store.put_status(StatusKey.LAST_HEARTBEAT, record)
        return failure

    def beat(self, served: tuple[str, ...], gpu: GpuState, extension: dict[str, Any]) -> str | None:
        """One heartbeat; None when answered 2xx, else the one-line error."""
        failure = self._send(served, gpu, extension)
        return None if failure is None else _describe(self.settings.url, failure)

    def withdraw(
        self, served: tuple[str, ...], gpu: GpuState, extension: dict[str, Any]
    ) -> str | None:
        """Advertise ``served`` (without the models about to go) and wait for a 2xx.

        Retries what may heal (unreachable, 5xx) with backoff for ``withdraw_timeout`` seconds;
        returns None when confirmed, else a note saying the withdrawal is unconfirmed.
        """
        deadline = time.monotonic() + self.withdraw_timeout
        delay = 0.5
        while True:
            failure = self._send(served, gpu, extension)
            if failure is None:
                return None
            retryable = isinstance(failure, InfernetError) and failure.retryable
            # The whole timeout is waited out (the last sleep is shortened to fit): giving up
            # a whole backoff step early would delete before the documented time.
            remaining = deadline - time.monotonic()
            if not retryable or remaining <= 0:
                error = _describe(self.settings.url, failure)
                record = {"at": clock.stamp(), "confirmed": False, "error": error}
                self.store.put_status(StatusKey.LAST_WITHDRAWAL, record)
                return f"withdrawal not confirmed by the control plane ({error}); deleting anyway"
            self.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)

    def offline(self) -> str | None:
        """The goodbye: ``{role, status: "offline"}``."""
        try:
            self._connect().heartbeat({"status": "offline"})
        except (InfernetError, ValueError) as exc:
            return f"offline heartbeat to {redact(self.settings.url)} failed: {exc}"
        return None


def _describe(url: str, exc: Exception) -> str:
    return f"heartbeat to {redact(url)} failed: {exc}"


__all__ = ["ControlPlaneError", "Heartbeater", "report"]
