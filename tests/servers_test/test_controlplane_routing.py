"""The stand-in's router (``pickChatProvider`` / ``createChatJob``, reference §3.2–§3.3).

The pure arithmetic is checked against the real code's own unit-test cases
(``tests/chat-routing.test.js`` in Infernet Protocol), then the server's ``/_test/pick`` and
``/_test/chats`` against providers registered by signing nodes and added as peers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import controlplane_router as router
from tests.servers.controlplane_client import SignedNode
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane
from tests.servers.controlplane_jobs import poll_limit


def prov(specs: Any = None, **row: Any) -> dict[str, Any]:
    return {"status": "available", "reputation": 50} | row | {"specs": specs}


# pure ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0.0),
        ("", 0.0),
        ("  12  ", 12.0),
        ("0x10", 16.0),
        ("1e3", 1000.0),
        ("-Infinity", -math.inf),
        (True, 1.0),
        ([], 0.0),
        ([4], 4.0),
        (["5"], 5.0),
        ([None], 0.0),
    ],
)
def test_js_number(value: Any, expected: float) -> None:
    assert router.js_number(value) == expected


@pytest.mark.parametrize("value", ["abc", {}, [1, 2], "1,5", "0xZZ", [{}]])
def test_js_number_nan(value: Any) -> None:
    assert math.isnan(router.js_number(value))


def test_poll_limit_missing_is_the_default() -> None:
    assert poll_limit(float("nan")) == 5 and poll_limit(3) == 3


@pytest.mark.parametrize(
    ("load", "kept"),
    [
        (None, True),
        ({}, True),
        ({"active_jobs": 3}, True),
        ({"active_jobs": 4}, False),  # default cap 4
        ({"active_jobs": 4, "concurrency_cap": 8}, True),
        ({"active_jobs": 0, "concurrency_cap": 0}, False),  # jobs switched off
        ({"active_jobs": "9"}, True),  # Number.isFinite does not coerce
        ({"active_jobs": 1, "concurrency_cap": "1"}, True),  # a string cap means 4
        ({"gpu_utilization_max": 94.9}, True),
        ({"gpu_utilization_max": 95}, False),
        ({"gpu_utilization_max": None}, True),
    ],
)
def test_not_saturated(load: Any, kept: bool) -> None:
    assert router.not_saturated(prov({"load": load})) is kept


@pytest.mark.parametrize(
    ("load", "score"),
    [
        (None, 1.0),
        ({}, 4.0),  # free slots only
        ({"ram": {"free_gb": 10}, "vram": {"free_gb": 6}, "active_jobs": 2}, 18.0),
        ({"active_jobs": 8, "concurrency_cap": 4}, 1.0),
        ({"concurrency_cap": 0, "ram": {"free_gb": 0.5}}, 1.0),
        ({"ram": {"free_gb": 97.1}, "vram": {"free_gb": 78.9}}, 180.0),
    ],
)
def test_headroom(load: Any, score: float) -> None:
    assert router.headroom_score(prov({"load": load})) == pytest.approx(score)


def test_weight_defaults_follow_javascript_coercion() -> None:
    assert router.weight(prov()) == 50 * 10 * 1
    assert router.weight(prov(reputation=None)) == 1 * 10 * 1  # Number(null) is 0, floor 1
    row = prov()
    del row["reputation"]
    assert router.weight(row) == 50 * 10  # undefined is NaN: the default
    assert router.weight(prov(reputation="80")) == 80 * 10
    assert router.weight(prov({"bench": {"tokens_per_second_avg": 41.5}})) == 50 * 41.5
    assert router.weight(prov({"bench": {"tokens_per_second_avg": 0}})) == 50 * 10


def test_weighted_pick_walks_the_cumulative_weights() -> None:
    a, b = prov(node_id="a", reputation=10), prov(node_id="b", reputation=30)
    assert router.weighted_pick([a, b], lambda: 0.0) is a  # r = 0 ≤ 0 at once
    assert router.weighted_pick([a, b], lambda: 0.25) is a  # 10 of 40
    assert router.weighted_pick([a, b], lambda: 0.26) is b
    assert router.weighted_pick([a], lambda: 0.99) is a
    assert router.weighted_pick([], lambda: 0.5) is None


def test_title_counts_utf16_units() -> None:
    assert router.chat_title([{"role": "user", "content": "é" * 100}]) == "é" * 80
    assert router.chat_title([{"role": "user", "content": "🙂" * 50}]) == "🙂" * 40
    assert router.chat_title([{"role": "user", "content": 5}, {"role": "user", "content": "b"}])
    assert router.chat_title([]) == "chat"


# server ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneServer]:
    with start_control_plane(tmp_path_factory.mktemp("controlplane-routing")) as srv:
        yield srv


@pytest.fixture
def cp(server: ControlPlaneServer) -> ControlPlaneServer:
    server.reset()
    return server


@pytest.fixture
def node(cp: ControlPlaneServer) -> Iterator[SignedNode]:
    with SignedNode(cp.url) as n:
        assert n.register("ours").status_code == 200
        yield n


MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_named_model_goes_only_to_nodes_that_serve_it_exactly(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    node.heartbeat({"served_models": ["qwen2.5:7b"]})
    cp.add_provider("peer", specs={"served_models": ["llama3"]})
    assert cp.pick_provider("qwen2.5:7b")["node_id"] == "ours"  # type: ignore[index]
    assert cp.pick_provider("llama3:latest") is None  # no normalisation
    assert {c["node_id"] for c in cp.router_candidates(None)} == {"ours", "peer"}
    chat = cp.create_chat(MESSAGES, "qwen2.5:7b")
    assert chat["source"] == "p2p" and chat["provider"]["public_key"] == node.pubkey
    job = chat["job"]
    assert (job["status"], job["model_name"], job["title"], job["type"]) == (
        "assigned",
        "qwen2.5:7b",
        "hi",
        "chat",
    )
    assert job["input_spec"] == {"messages": MESSAGES, "max_tokens": 512, "temperature": 0.7}
    assert [j["id"] for j in node.poll_jobs().json()["data"]["jobs"]] == [job["id"]]


def test_register_alone_advertises_nothing(cp: ControlPlaneServer, node: SignedNode) -> None:
    # sanitizeSpecs keeps served_models here, but a model-less chat still finds the node
    assert cp.pick_provider("m:1") is None
    assert cp.pick_provider(None)["node_id"] == "ours"  # type: ignore[index]


def test_no_candidate_leaves_the_job_pending(cp: ControlPlaneServer, node: SignedNode) -> None:
    chat = cp.create_chat(MESSAGES, "nobody:1", max_tokens=None)
    assert (chat["source"], chat["provider"], chat["job"]["status"]) == ("none", None, "pending")
    assert chat["job"]["provider_id"] is None and chat["job"]["assigned_at"] is None
    assert chat["job"]["input_spec"]["max_tokens"] is None
    assert node.poll_jobs().json()["data"]["jobs"] == []


def test_stale_offline_and_saturated_nodes_are_skipped(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    node.heartbeat({"served_models": ["m"], "load": {"active_jobs": 4}})
    assert cp.pick_provider("m") is None
    node.heartbeat({"served_models": ["m"], "load": {"active_jobs": 0, "concurrency_cap": 0}})
    assert cp.pick_provider("m") is None  # jobs.enabled: false
    node.heartbeat({"served_models": ["m"], "load": {"active_jobs": 1}})
    assert cp.pick_provider("m") is not None
    cp.update_provider(node.pubkey, last_seen_age_s=121)
    assert cp.pick_provider("m") is None
    node.heartbeat({"served_models": ["m"]})
    assert cp.pick_provider("m") is not None
    node.heartbeat({"served_models": ["m"]}, status="offline")
    assert cp.pick_provider("m") is None


def test_weights_and_seeded_draws(cp: ControlPlaneServer, node: SignedNode) -> None:
    # our heartbeat's load: no active_jobs, lots of free RAM (the 96 % case)
    node.heartbeat({"served_models": ["m"], "load": {"ram": {"free_gb": 100}}})
    cp.add_provider("peer", specs={"served_models": ["m"], "load": {"ram": {"free_gb": 0.1}}})
    weights = {c["node_id"]: c["weight"] for c in cp.router_candidates("m")}
    assert weights == pytest.approx({"ours": 50 * 10 * 104, "peer": 50 * 10 * 4.1})
    assert weights["ours"] / sum(weights.values()) == pytest.approx(0.962, abs=0.001)
    assert cp.pick_provider("m", draw=0.95)["node_id"] == "ours"  # type: ignore[index]
    assert cp.pick_provider("m", draw=0.97)["node_id"] == "peer"  # type: ignore[index]
    seeded = [cp.pick_provider("m", seed=s)["node_id"] for s in range(20)]  # type: ignore[index]
    assert seeded == [cp.pick_provider("m", seed=s)["node_id"] for s in range(20)]  # type: ignore[index]
    chat = cp.create_chat(MESSAGES, "m", draw=0.99)
    assert chat["provider"]["node_id"] == "peer" and chat["job"]["provider_node_id"] == "peer"


def test_reputation_and_speed_shift_the_odds(cp: ControlPlaneServer, node: SignedNode) -> None:
    node.heartbeat({"served_models": ["m"], "bench": {"tokens_per_second_avg": 40}})
    cp.add_provider("peer", specs={"served_models": ["m"]}, reputation=200)
    cp.update_provider(node.pubkey, reputation=0)
    weights = {c["node_id"]: c["weight"] for c in cp.router_candidates("m")}
    assert weights == {"ours": 1 * 40 * 1, "peer": 200 * 10 * 1}
