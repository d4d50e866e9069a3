"""The daemon serves what it advertises: the job runner beside the reconcile loop.

With a control plane, ``infernet watch`` runs a ``serving.JobRunner`` (its own threads: jobs on
one model never wait for a pull, a plan or a job on another). After every reconcile the routes
are the names advertised now (``planning.advertised``), so a job is only ever sent to a model
that is installed, answered its canary and fits. Every heartbeat carries the runner's figures
(``load``, ``bench``), and they are published in the state store for a heartbeat sent by
``infernet apply`` from a shell. A removal withdraws the model, then drains its jobs, then
unloads and deletes it; a stop sends the offline heartbeat, then drains every job.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any

from reconciler.controlplane import load
from reconciler.controlplane.jobs import JobRoutes
from reconciler.converge.session import Session
from reconciler.errors import InfernetError
from reconciler.model import ModelKey, Observed, Plan
from reconciler.planning.advertised import now as advertised_now
from reconciler.serving import routes
from reconciler.serving.runner import JobRunner
from reconciler.serving.throughput import Throughput

log = logging.getLogger("infernet.daemon")


class Serving:
    """The job runner's part of the daemon (a part of ``Daemon``)."""

    session: Session | None
    _jobs: JobRunner | None
    _jobs_client: object | None
    _routes: routes.Routes
    _throughput: Throughput

    def _serve(self) -> None:
        """Make the job runner (it polls once the first routes are known), or follow a new
        control plane or new jobs settings; every heartbeat carries its figures."""
        session = self.session
        if session is None or session.heartbeater is None:
            self._stop_serving(0.0)
            return
        try:
            client = session.heartbeater.client()
        except InfernetError as exc:
            log.error("jobs not served: %s", exc)
            return
        settings = session.desired.jobs
        if self._jobs is not None and self._jobs_client is not client:
            self._stop_serving(settings.drain_timeout)  # a new control plane: start over
        if self._jobs is None:
            cp = session.heartbeater.settings
            node_id = cp.node_id or socket.gethostname()
            self._jobs = JobRunner(
                client=JobRoutes(client),
                ledger=session.store,
                router=self._routes,
                settings=settings,
                node_id=node_id,
                node_name=node_id,
                throughput=self._throughput,
            )
            self._jobs_client = client
            if settings.enabled:
                every = settings.poll_interval
                log.info("serving jobs: %d at once, polling every %gs", settings.concurrency, every)
        self._jobs.settings = settings
        session.heartbeater.jobs = self._job_figures

    def _job_figures(self) -> Mapping[str, Any]:
        runner = self._jobs
        if runner is None:
            return load.idle()
        return load.live(runner.load, self._throughput.bench)

    def _serve_routes(self, plan: Plan, observed: Observed) -> None:
        """After a reconcile: the routes are what is advertised now."""
        session = self.session
        if session is None:
            return
        names = advertised_now(plan, session.desired)
        self._routes.update(routes.build(session.desired, names, observed, session.backends))
        if self._jobs is not None:
            self._jobs.start()  # polls from the first routes on (a no-op once started)
            load.publish(session.store, self._job_figures())

    def _drain_jobs(self, keys: frozenset[ModelKey]) -> None:
        """The executor's hook between the withdrawal and the deletes."""
        self._routes.withdraw(keys)
        runner, session = self._jobs, self.session
        if runner is not None and session is not None:
            failed = runner.drain(keys, session.desired.jobs.drain_timeout)
            if failed:
                log.warning("removal: %d jobs on the removed models failed", len(failed))

    def _undrain_jobs(self, keys: frozenset[ModelKey]) -> None:
        if self._jobs is not None:
            self._jobs.undrain(keys)

    def _jobs_busy(self) -> bool:
        return self._jobs is not None and self._jobs.busy()

    def _stop_serving(self, timeout: float) -> None:
        """Stop taking jobs; give running ones ``timeout`` s, fail the rest, answer them all."""
        runner, self._jobs = self._jobs, None
        self._jobs_client = None
        if runner is None:
            return
        runner.stop(timeout)
        session = self.session
        if session is not None:
            try:
                load.publish(session.store, None)
            except InfernetError as exc:
                log.debug("could not clear the published job figures: %s", exc)
