"""Remote commands end to end: the control-plane test server queues ``model_install`` and
``model_remove``, the runner edits infernet.yaml and reconciles through a real ``Session``
against the Ollama-compatible server, and the answers land on the control plane."""

from __future__ import annotations

import threading

import pytest

from reconciler.config import desired
from reconciler.controlplane.client import ControlPlane
from reconciler.controlplane.identity import generate_key, load_key
from reconciler.converge.session import Session
from reconciler.daemon.commands import CommandRunner, Reconcile
from reconciler.daemon.verbs import ReconcileOutcome
from reconciler.events import Event, Kind, Progress
from reconciler.model import ControlPlaneSettings
from state import Store
from tests.integration.conftest import Node
from tests.servers.controlplane_harness import ControlPlaneServer

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"


def _reconcile_for(node: Node) -> tuple[list[Event], Reconcile]:
    """A reconcile as the daemon's does it: re-read the file, lock, plan, apply, heartbeat."""
    events: list[Event] = []

    def reconcile(
        progress: Progress, cancel: threading.Event, force: frozenset[str]
    ) -> ReconcileOutcome:
        def both(event: Event) -> None:
            events.append(event)
            progress(event)

        fresh = desired.load(node.config)
        with Session.open(fresh, node.state) as session, session.lock("remote command"):
            observed, plan = session.observe_and_plan(force_remove=force)
            if plan.errors:
                return ReconcileOutcome(False, plan.advertised, plan.errors[0])
            result = session.apply(plan, observed, progress=both, cancel=cancel)
        error = result.failed[0].error if result.failed else None
        return ReconcileOutcome(result.converged, result.advertised, error)

    return events, reconcile


def test_install_and_remove_by_remote_command(
    node: Node, cp: ControlPlaneServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERNET_NO_NVML", "1")
    monkeypatch.setenv("INFERNET_RETRY_BACKOFF", "0.05")
    key_file = node.tmp / "node.key"
    pubkey = generate_key(key_file)
    node.write_config(
        [SMALL], control_plane={"url": cp.url, "key_file": str(key_file), "node_id": "test-node"}
    )
    events, reconcile = _reconcile_for(node)
    client = ControlPlane(ControlPlaneSettings(url=cp.url), load_key(key_file))
    store = Store.open(node.state)
    try:
        runner = CommandRunner(
            client=client,
            store=store,
            config_path=node.config,
            reconcile=reconcile,
            progress_interval=0.0,
        )
        install = cp.enqueue_command(pubkey, "model_install", {"model": QWEN})
        assert runner.run_pending() == [install]

        row = cp.command(install)
        assert row["status"] == "completed", row["error"]
        assert row["result"] == {"model": QWEN, "backend": "ollama", "advertised": [SMALL, QWEN]}
        assert {SMALL, QWEN} <= node.installed()
        assert [m.name for m in desired.load(node.config).models] == [SMALL, QWEN]
        assert row["progress_posts"] >= 3  # config, download, check: each phase change is posted
        assert row["progress"]["phase"] == "check" and row["progress"]["steps"] == 3
        pulled = [e.action.model for e in events if e.kind is Kind.STARTED and e.action]
        assert sorted(pulled) == [QWEN, SMALL]  # the one reconcile pulled both
        assert cp.heartbeats()[-1]["specs"]["served_models"] == [SMALL, QWEN]

        remove = cp.enqueue_command(pubkey, "model_remove", {"model": SMALL})
        assert runner.run_pending() == [remove]
        row = cp.command(remove)
        assert row["status"] == "completed", row["error"]
        assert row["result"] == {"model": SMALL, "removed": [SMALL], "advertised": [QWEN]}
        assert SMALL not in node.installed()
        assert cp.heartbeats()[-1]["specs"]["served_models"] == [QWEN]

        assert store.unreported_commands() == []
        assert [cp.command(i)["complete_calls"] for i in (install, remove)] == [1, 1]
    finally:
        store.close()
        client.close()
