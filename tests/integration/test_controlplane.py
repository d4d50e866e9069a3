"""Heartbeats end to end: the real CLI, the Ollama-compatible server and the control-plane test
server, which verifies every signature exactly as the real control plane does."""

from __future__ import annotations

import json
import os

from tests.integration.conftest import Node, keygen, needs_fake, verified_beats
from tests.servers.controlplane_harness import ControlPlaneServer

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"


def _configure(node: Node, cp: ControlPlaneServer, served: list[object]) -> None:
    node.write_config(
        served,
        control_plane={
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "node_id": "test-node",
        },
    )


def _served(beat: dict) -> list[str]:  # type: ignore[type-arg]
    return beat["body"]["specs"]["served_models"]  # type: ignore[no-any-return]


def test_apply_heartbeats_exactly_what_is_served(node: Node, cp: ControlPlaneServer) -> None:
    pubkey = keygen(node)
    _configure(node, cp, [SMALL, QWEN])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    beats = verified_beats(cp)
    assert len(beats) == 1, beats
    assert beats[0]["pubkey"] == pubkey
    assert _served(beats[0]) == [SMALL, QWEN]
    specs = beats[0]["body"]["specs"]
    assert specs["reconciler"]["converged"] is True
    assert specs["cli_version"].startswith("infernet")
    assert [n["node_id"] for n in cp.nodes()] == ["test-node"]  # registered on the first 404
    calls = cp.received()
    assert all(r["pubkey"] == pubkey for r in calls), "every request must verify"
    assert [(r["path"].rsplit("/", 1)[-1], r["status"]) for r in calls] == [
        ("heartbeat", 404),
        ("register", 200),
        ("heartbeat", 200),
    ]
    status = json.loads(node.run("status", "--json").stdout)
    assert status["last_heartbeat"]["ok"] is True
    assert status["last_heartbeat"]["served_models"] == [SMALL, QWEN]


def test_withdrawn_before_the_backend_deletes(node: Node, cp: ControlPlaneServer) -> None:
    server = needs_fake(node)
    keygen(node)
    _configure(node, cp, [SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    cp.reset()
    server.reset_requests()
    _configure(node, cp, [SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    beats = verified_beats(cp)
    assert [_served(b) for b in beats] == [[SMALL], [SMALL]]  # withdrawal, then converged
    delete = next(r for r in server.requests() if r["path"] == "/api/delete")
    assert beats[0]["time"] < delete["time"]


def test_control_plane_down_never_breaks_apply(node: Node, cp: ControlPlaneServer) -> None:
    keygen(node)
    _configure(node, cp, [SMALL])
    cp.set_down(3600)
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert "heartbeat to" in out.stderr and "failed" in out.stderr
    assert "Traceback" not in out.stderr
    status = json.loads(node.run("status", "--json").stdout)
    assert status["last_heartbeat"]["ok"] is False
    human = node.run("status").stdout
    assert "Last heartbeat:" in human and "FAILED" in human


def test_clock_skew_is_named(node: Node, cp: ControlPlaneServer) -> None:
    keygen(node)
    _configure(node, cp, [SMALL])
    cp.set_clock_offset(600)
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert "401" in out.stderr and "clock" in out.stderr


def test_unsafe_key_file_is_refused_in_one_line(node: Node, cp: ControlPlaneServer) -> None:
    keygen(node)
    os.chmod(node.tmp / "node.key", 0o644)
    _configure(node, cp, [SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr  # the node still converges locally
    assert "chmod 600" in out.stderr
    assert verified_beats(cp) == []


def test_withdrawal_unconfirmed_is_bounded_and_recorded(node: Node, cp: ControlPlaneServer) -> None:
    keygen(node)
    _configure(node, cp, [SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    cp.set_down(3600)
    node.env["INFERNET_WITHDRAW_TIMEOUT"] = "2"
    _configure(node, cp, [SMALL])
    out = node.run("apply", "--yes", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "withdrawal not confirmed" in out.stderr
    assert QWEN not in node.installed()
