"""The fleet example (examples/ansible/fleet.yml with the infernet.node.node role) against three
local nodes, each with its own Ollama-compatible test server: converge, idempotence, check mode,
removal, and a node that fails without stopping the others."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.ansible.conftest import Fleet, Node, ansible_env, start_node
from tests.servers.controlplane_harness import start_control_plane

pytestmark = pytest.mark.integration

BUDGET_ERROR = "> VRAM budget 1.0 GiB"


@pytest.mark.timeout(300)
def test_converge_then_no_change_then_check_then_removal(fleet: Fleet) -> None:
    a, b, c = fleet.nodes["node-a"], fleet.nodes["node-b"], fleet.nodes["node-c"]

    # 1. The two nodes that fit change; node-c's budget is refused before anything is pulled.
    first = fleet.playbook()
    assert first.proc.returncode != 0, first.out
    recap = first.recap
    assert recap["node-a"]["failed"] == 0 and recap["node-a"]["changed"] > 0, first.out
    assert recap["node-b"]["failed"] == 0 and recap["node-b"]["changed"] > 0, first.out
    assert recap["node-c"]["failed"] == 1, first.out
    assert BUDGET_ERROR in first.out and "pick a smaller quantization" in first.out
    assert a.installed() == {"smollm2:135m", "all-minilm:latest"}
    assert b.installed() == {"qwen2.5:0.5b"}
    assert c.installed() == set()
    assert not c.config.exists(), "a file whose plan fails is not put in place"
    assert (a.config.stat().st_mode & 0o777) == 0o644
    assert "smollm2:135m" in a.config.read_text() and a.unit.exists()
    row_a, row_c = first.row("node-a"), first.row("node-c")
    assert row_a["changed"] is True and row_a["status"] == "ok" and row_a["fits"] is True
    assert row_a["served"] == ["smollm2:135m", "all-minilm:latest"]
    assert row_a["gpu"] == "1x 24 GB" and row_a["vram_available_bytes"] == 24 * 2**30
    assert row_c["status"].startswith("failed: ") and BUDGET_ERROR in row_c["status"]
    assert row_c["fits"] is False and row_c["vram_available_bytes"] == 2**30
    # The fleet table is printed, one line per node.
    assert "HOST" in first.out and "SERVED MODELS" in first.out
    assert "DOES NOT FIT" in first.out

    # 2. Nothing to do: no task reports a change anywhere.
    second = fleet.playbook()
    assert all(second.recap[n]["changed"] == 0 for n in fleet.nodes), second.out
    assert second.recap["node-c"]["failed"] == 1
    assert [r["changed"] for r in second.report] == [False, False, False]

    # 3. --check --diff after a group_vars edit: the change is reported, nothing is touched.
    fleet.serve("gpu_80g", ["qwen2.5:0.5b", "llama3.2:1b"])
    before = {n.name: n.config.read_bytes() for n in (a, b)}
    b.server.reset_requests()
    check = fleet.playbook("--check", "--diff")
    assert check.recap["node-b"]["changed"] == 1, check.out
    assert check.recap["node-a"]["changed"] == 0, check.out
    assert "+  - llama3.2:1b" in check.out  # the file's diff
    assert "+ pull llama3.2:1b (ollama)" in check.out  # the plan's actions
    assert {n.name: n.config.read_bytes() for n in (a, b)} == before
    assert b.installed() == {"qwen2.5:0.5b"}
    changing = {"/api/pull", "/api/delete", "/api/generate", "/api/embed", "/api/create"}
    assert not [r for r in b.server.requests() if r["path"] in changing]
    assert check.row("node-b")["served"] == ["qwen2.5:0.5b", "llama3.2:1b"]

    # 4. A model removed from a class's group_vars is removed from that class's nodes; the real
    # run also does what the check said for node-b.
    fleet.serve("gpu_24g", ["smollm2:135m"])
    removal = fleet.playbook()
    assert removal.recap["node-a"]["changed"] > 0 and removal.recap["node-a"]["failed"] == 0
    assert a.installed() == {"smollm2:135m"}
    assert "all-minilm" not in a.config.read_text()
    assert b.installed() == {"qwen2.5:0.5b", "llama3.2:1b"}
    assert removal.row("node-a")["served"] == ["smollm2:135m"]


@pytest.mark.timeout(240)
def test_backend_down_fails_that_node_only(fleet: Fleet) -> None:
    fleet.nodes["node-c"].host_vars.clear()  # a budget that fits: only node-b is in trouble
    fleet.write_inventory()
    b = fleet.nodes["node-b"]
    b.server.stop()

    run = fleet.playbook()
    assert run.proc.returncode != 0
    assert run.recap["node-b"]["failed"] == 1, run.out
    for name in ("node-a", "node-c"):
        assert run.recap[name]["failed"] == 0 and run.recap[name]["changed"] > 0, run.out
        assert fleet.nodes[name].installed() == {"smollm2:135m", "all-minilm:latest"}
    status = run.row("node-b")["status"]
    assert status.startswith("failed: can't reach Ollama at " + b.server.url), status
    assert "Traceback" not in run.out
    assert not b.config.exists()

    # The backend is back: the next run converges node-b and changes nothing elsewhere.
    b.server.start()
    again = fleet.playbook()
    assert again.proc.returncode == 0, again.out
    assert again.recap["node-b"]["changed"] > 0
    assert again.recap["node-a"]["changed"] == 0 and again.recap["node-c"]["changed"] == 0
    assert b.installed() == {"qwen2.5:0.5b"}


@pytest.mark.timeout(180)
def test_failed_canary_stops_the_rollout(fleet: Fleet) -> None:
    """The example's own batches: one canary node, then quarters; the canary (node-a, first in
    the inventory) fails, so no other node is touched."""
    fleet.nodes["node-a"].server.stop()
    run = fleet.playbook(batches="example")
    assert run.proc.returncode != 0
    assert run.recap["node-a"]["failed"] == 1, run.out
    assert "node-b" not in run.recap and "node-c" not in run.recap, run.out
    for name in ("node-b", "node-c"):
        assert fleet.nodes[name].installed() == set()
        assert not fleet.nodes[name].config.exists()


def test_check_mode_on_nodes_without_infernet(fleet: Fleet) -> None:
    """--check where infernet is not installed yet: the install is reported, the module has
    nothing to plan with and is skipped, and no node gets a virtual environment or a file."""
    for node in fleet.nodes.values():
        node.host_vars.update(infernet_install=True, infernet_venv=str(node.root / "venv"))
    fleet.write_inventory()
    run = fleet.playbook("--check")
    for name, node in fleet.nodes.items():
        assert run.recap[name]["failed"] == 0 and run.recap[name]["changed"] > 0, run.out
        assert not (node.root / "venv").exists() and not node.config.exists()
        assert run.row(name)["status"] == "skipped"
    assert "Install infernet into" in run.out


@pytest.mark.timeout(180)
def test_nodes_make_a_key_and_heartbeat(fleet: Fleet, tmp_path: Path) -> None:
    """With a control_plane, the role makes each node's key once, and each node's apply
    registers it and heartbeats exactly the models it serves."""
    cp = start_control_plane(tmp_path / "cp")
    try:
        for node in fleet.nodes.values():
            node.host_vars.clear()
            node.host_vars["infernet_control_plane"] = {
                "url": cp.url,
                "key_file": str(node.root / "node.key"),
                "node_id": node.name,
            }
        fleet.write_inventory()
        run = fleet.playbook()
        assert run.proc.returncode == 0, run.out
        keys = {n.name: (n.root / "node.key").read_bytes() for n in fleet.nodes.values()}
        assert all(
            stat.S_IMODE((n.root / "node.key").stat().st_mode) == 0o600
            for n in fleet.nodes.values()
        )
        assert sorted(n["node_id"] for n in cp.nodes()) == ["node-a", "node-b", "node-c"]
        served = {
            r["body"]["specs"]["served_models"][0]: r["body"]["specs"]["served_models"]
            for r in cp.received()
            if r["path"] == "/api/v1/node/heartbeat" and r["pubkey"] and r["status"] == 200
        }
        assert served == {
            "smollm2:135m": ["smollm2:135m", "all-minilm:latest"],
            "qwen2.5:0.5b": ["qwen2.5:0.5b"],
        }

        again = fleet.playbook()  # the keys are kept: the nodes stay who they are
        assert all(again.recap[n]["changed"] == 0 for n in fleet.nodes), again.out
        assert keys == {n.name: (n.root / "node.key").read_bytes() for n in fleet.nodes.values()}
    finally:
        cp.close()


@pytest.mark.timeout(300)
def test_rolling_change_stops_at_a_failed_first_batch(tmp_path: Path) -> None:
    """Six converged nodes, a model added to their class, batches of two with no failure
    allowed: the first batch's pulls break, so the other four keep their file and models."""
    nodes: dict[str, Node] = {}
    try:
        for i in range(1, 7):
            nodes[f"node-{i}"] = start_node(tmp_path, f"node-{i}", "gpu_24g")
        fleet = Fleet(tmp_path, nodes, ansible_env(tmp_path))
        fleet.write_inventory()
        fleet.serve("gpu_24g", ["smollm2:135m"])
        first = fleet.playbook()
        assert first.proc.returncode == 0, first.out
        before = {name: node.config.read_bytes() for name, node in nodes.items()}

        fleet.serve("gpu_24g", ["smollm2:135m", "all-minilm:latest"])
        for name in ("node-1", "node-2"):
            nodes[name].server.fault("all-minilm:latest", "error_mid", after_bytes=1000)
        rolling = fleet.playbook(
            "-e", '{"fleet_serial": 2, "fleet_max_fail_percentage": 0}', batches="example"
        )
        assert rolling.proc.returncode != 0
        assert sorted(rolling.recap) == ["node-1", "node-2"], rolling.out
        assert all(rolling.recap[n]["failed"] == 1 for n in ("node-1", "node-2")), rolling.out
        assert "pull all-minilm:latest: " in rolling.out
        for name in ("node-1", "node-2"):
            assert nodes[name].installed() == {"smollm2:135m"}
        for name in ("node-3", "node-4", "node-5", "node-6"):
            assert nodes[name].config.read_bytes() == before[name]
            assert nodes[name].installed() == {"smollm2:135m"}
    finally:
        for node in nodes.values():
            node.server.close()
