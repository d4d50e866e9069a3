"""The control-plane stand-in's job routes against ``shared/reference/infernet-jobs.md`` §4–§8.

Nodes here sign with ``tests.servers.controlplane_client`` (coincurve), not the product's
client, so these tests hold while the product changes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers.controlplane_client import SignedNode
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane

POLL = "/api/v1/node/jobs/poll"
PG_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?\+00:00$")
NINE = [
    "id",
    "title",
    "type",
    "status",
    "payment_offer",
    "payment_coin",
    "model_name",
    "input_spec",
    "created_at",
]
TYPES_ERROR = "invalid event_type (must be one of meta, token, done, error)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneServer]:
    with start_control_plane(tmp_path_factory.mktemp("controlplane-jobs")) as srv:
        yield srv


@pytest.fixture
def cp(server: ControlPlaneServer) -> ControlPlaneServer:
    server.reset()
    return server


def provider(cp: ControlPlaneServer, node_id: str, **specs: Any) -> SignedNode:
    node = SignedNode(cp.url)
    assert node.register(node_id).status_code == 200
    assert node.heartbeat({"served_models": ["m:1"]} | specs).status_code == 200
    return node


@pytest.fixture
def node(cp: ControlPlaneServer) -> Iterator[SignedNode]:
    with provider(cp, "node-a") as n:
        yield n


@pytest.fixture
def other(cp: ControlPlaneServer) -> Iterator[SignedNode]:
    with provider(cp, "node-b") as n:
        yield n


def data(resp: httpx.Response) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def error(resp: httpx.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]


def token(text: str) -> dict[str, Any]:
    return {"event_type": "token", "data": {"text": text}}


# poll ------------------------------------------------------------------------------------------


def test_poll_returns_the_nine_columns_of_assigned_jobs_oldest_first_and_claims_nothing(
    cp: ControlPlaneServer, node: SignedNode, other: SignedNode
) -> None:
    messages = [{"role": "user", "content": "b"}]
    newer = cp.create_job(node.pubkey, model_name="m:1", messages=messages)
    older = cp.create_job(node.pubkey, model_name=None, age_s=30, max_tokens=None)
    cp.create_job(node.pubkey, status="completed")
    cp.create_job(other.pubkey)
    cp.create_job()  # pending, nobody's

    first = data(node.poll_jobs())
    assert first["provider_id"] == next(n["id"] for n in cp.nodes() if n["node_id"] == "node-a")
    assert [j["id"] for j in first["jobs"]] == [older, newer]
    job = first["jobs"][1]
    assert list(job) == NINE
    assert job["title"] == "b" and job["type"] == "chat" and job["status"] == "assigned"
    assert (job["payment_offer"], job["payment_coin"], job["model_name"]) == (0, None, "m:1")
    assert job["input_spec"] == {
        "messages": [{"role": "user", "content": "b"}],
        "max_tokens": 512,
        "temperature": 0.7,
    }
    assert first["jobs"][0]["model_name"] is None
    assert first["jobs"][0]["input_spec"]["max_tokens"] is None
    assert all(PG_TIME.match(j["created_at"]) for j in first["jobs"])
    assert data(node.poll_jobs()) == first  # read-only: the same jobs again
    assert cp.job(newer)["status"] == "assigned"


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (None, 5),
        (0, 5),
        ("", 5),
        ("many", 5),
        ({}, 5),
        (False, 5),
        ([], 5),
        (-3, 1),
        (1, 1),
        (True, 1),
        ("3", 3),
        (" 7 ", 7),
        ([7], 7),
        (2.5, 2),
        (25, 25),
        (26, 25),
        (10**9, 25),
        ("Infinity", 25),
    ],
)
def test_poll_limit_is_clamped_like_javascript(
    cp: ControlPlaneServer, node: SignedNode, limit: Any, expected: int
) -> None:
    for _ in range(27):
        cp.create_job(node.pubkey)
    assert len(data(node.poll_jobs(limit))["jobs"]) == expected


def test_poll_without_a_limit_gives_five(cp: ControlPlaneServer, node: SignedNode) -> None:
    for _ in range(7):
        cp.create_job(node.pubkey)
    assert len(data(node.post(POLL, {}))["jobs"]) == 5
    assert len(data(node.post(POLL))["jobs"]) == 5  # no body at all


def test_job_routes_need_a_provider_row_and_a_signature(cp: ControlPlaneServer) -> None:
    with SignedNode(cp.url) as stranger:
        assert error(stranger.poll_jobs()) == (404, "no provider row for this pubkey")
        job = cp.create_job()
        assert error(stranger.post_events(job, [token("x")])) == (
            404,
            "no provider row for this pubkey",
        )
        assert error(stranger.complete(job, {})) == (404, "no provider row for this pubkey")
    unsigned = httpx.post(cp.url + POLL, json={"limit": 5}, trust_env=False)
    assert error(unsigned) == (401, "missing X-Infernet-Auth header")


def test_a_lying_server_hands_out_more_jobs_than_asked(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    for _ in range(4):
        cp.create_job(node.pubkey)
    cp.ignore_job_poll_limit()
    assert len(data(node.poll_jobs(1))["jobs"]) == 4
    cp.ignore_job_poll_limit(False)
    assert len(data(node.poll_jobs(1))["jobs"]) == 1


# events ----------------------------------------------------------------------------------------


def test_events_are_stored_in_order_with_growing_ids(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    meta = {"event_type": "meta", "data": {"provider_node_id": "node-a", "model": "m:1"}}
    assert data(node.post_events(job, [meta, token("Hel")])) == {"inserted": 2}
    assert data(node.post_events(job, [token("lo"), {"event_type": "done"}])) == {"inserted": 2}
    rows = cp.job_events(job)
    assert [r["event_type"] for r in rows] == ["meta", "token", "token", "done"]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert len({r["id"] for r in rows}) == 4
    assert rows[3]["data"] == {}  # data defaults to {}
    assert rows[0]["created_at"] == rows[1]["created_at"]  # one insert, one now()
    assert all(r["job_id"] == job and PG_TIME.match(r["created_at"]) for r in rows)
    assert cp.token_text(job) == "Hello"
    assert cp.job(job)["event_batches"] == 2


def test_events_after_completion_are_still_accepted(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    data(node.complete(job, {"status": "completed"}))
    assert data(node.post_events(job, [token("late")])) == {"inserted": 1}
    assert cp.token_text(job) == "late"


@pytest.mark.parametrize(
    ("events", "message"),
    [
        (None, "events must be a non-empty array"),
        ([], "events must be a non-empty array"),
        ({"event_type": "token"}, "events must be a non-empty array"),
        ("token", "events must be a non-empty array"),
        ([token("x")] * 201, "too many events (max 200)"),
        ([token("a"), {"event_type": "progress", "data": {}}, token("b")], TYPES_ERROR),
        ([token("a"), None], TYPES_ERROR),
        ([token("a"), ["token"]], TYPES_ERROR),
        ([{"data": {"text": "no type"}}], TYPES_ERROR),
        ([{"event_type": "TOKEN"}], TYPES_ERROR),
    ],
)
def test_a_bad_batch_is_refused_whole(
    cp: ControlPlaneServer, node: SignedNode, events: Any, message: str
) -> None:
    job = cp.create_job(node.pubkey)
    resp = node.post(f"/api/v1/node/jobs/{job}/events", {"events": events})
    assert error(resp) == (400, message)
    assert cp.job_events(job) == []


def test_two_hundred_events_is_the_most_one_batch_may_carry(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    assert data(node.post_events(job, [token("x")] * 200)) == {"inserted": 200}


def test_event_checks_run_in_the_real_order(
    cp: ControlPlaneServer, node: SignedNode, other: SignedNode
) -> None:
    theirs = cp.create_job(other.pubkey)
    pending = cp.create_job()
    missing = "0b6e3f7c-1d2a-4c9e-9f00-123456789abc"
    with SignedNode(cp.url) as stranger:  # the array is checked before the provider
        assert error(stranger.post_events(theirs, []))[0] == 400
    assert error(node.post_events(missing, [token("x")])) == (404, "job not found")
    assert error(node.post_events(theirs, [token("x")])) == (
        403,
        "job not assigned to this provider",
    )
    assert error(node.post_events(pending, [token("x")]))[0] == 403
    # ownership before types: a bad type on someone else's job is a 403
    assert error(node.post_events(theirs, [{"event_type": "bad"}]))[0] == 403
    assert error(node.post_events("not-a-uuid", [token("x")])) == (
        500,
        'invalid input syntax for type uuid: "not-a-uuid"',
    )
    assert cp.job_events(theirs) == []


# complete --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "completed", "result": {"text": "hi"}}, ("completed", {"text": "hi"}, None)),
        ({"status": "failed", "error": "boom", "result": {"x": 1}}, ("failed", None, "boom")),
        ({"status": "failed", "error": "e" * 2000}, ("failed", None, "e" * 1024)),
        ({"status": "failed", "error": {"not": "a string"}}, ("failed", None, None)),
        ({"status": "FAILED"}, ("completed", None, None)),
        ({"status": "done", "error": "ignored"}, ("completed", None, None)),
        ({}, ("completed", None, None)),
        ({"result": None}, ("completed", None, None)),
    ],
)
def test_complete_stores_what_the_real_server_stores(
    cp: ControlPlaneServer,
    node: SignedNode,
    body: dict[str, Any],
    expected: tuple[str, Any, str | None],
) -> None:
    job = cp.create_job(node.pubkey)
    assert data(node.complete(job, body)) == {"id": job, "status": expected[0]}
    row = cp.job(job)
    assert (row["status"], row["result"], row["error"]) == expected
    assert PG_TIME.match(row["completed_at"]) and row["updated_at"] == row["completed_at"]
    assert row["completions"][0]["body"] == body
    assert data(node.poll_jobs())["jobs"] == []


def test_complete_is_never_deduplicated_and_checks_no_state(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    data(node.complete(job, {"status": "completed", "result": {"text": "a"}}))
    data(node.complete(job, {"status": "failed", "error": "late failure"}))
    assert cp.job(job)["status"] == "failed"
    data(node.complete(job, {"status": "completed"}))
    row = cp.job(job)
    assert row["complete_calls"] == cp.complete_calls(job) == 3
    assert [c["body"].get("status") for c in row["completions"]] == [
        "completed",
        "failed",
        "completed",
    ]
    # neither path clears the other's column
    assert (row["status"], row["result"], row["error"]) == (
        "completed",
        {"text": "a"},
        "late failure",
    )


def test_complete_refuses_unknown_and_foreign_jobs(
    cp: ControlPlaneServer, node: SignedNode, other: SignedNode
) -> None:
    theirs = cp.create_job(other.pubkey)
    assert error(node.complete(theirs, {"status": "completed"})) == (
        403,
        "job not assigned to this provider",
    )
    assert error(node.complete("0b6e3f7c-1d2a-4c9e-9f00-123456789abc", {}))[0] == 404
    assert cp.job(theirs)["status"] == "assigned" and cp.complete_calls(theirs) == 0


# test-side API ---------------------------------------------------------------------------------


def test_create_job_defaults_and_back_dating(cp: ControlPlaneServer, node: SignedNode) -> None:
    long = "x" * 100
    job = cp.create_job(
        node.pubkey,
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": long}],
        temperature=None,
        created_at="2026-04-28T19:20:01.120000Z",
    )
    row = cp.job(job)
    assert row["title"] == "x" * 80
    assert row["created_at"] == "2026-04-28T19:20:01.12+00:00"  # trailing zeros trimmed
    assert row["input_spec"]["temperature"] is None
    assert (row["provider_node_id"], row["provider_pubkey"]) == ("node-a", node.pubkey)
    assert row["assigned_at"] is not None and row["payment_status"] == "unpaid"
    pending = cp.job(cp.create_job(messages=[{"role": "system", "content": "only"}]))
    assert (pending["status"], pending["provider_id"], pending["title"]) == (
        "pending",
        None,
        "chat",
    )
    assert cp.assign_job(pending["id"], node.pubkey)["status"] == "assigned"
    assert [j["id"] for j in cp.jobs()] == [job, pending["id"]]
    with pytest.raises(httpx.HTTPStatusError):
        cp.create_job("ab" * 32)  # no such provider


def test_wait_job_returns_once_completed(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    threading.Timer(0.2, node.complete, args=(job, {"status": "failed"})).start()
    assert cp.wait_job(job, timeout=5)["status"] == "failed"


def test_create_jobs_inserts_them_all_at_once(cp: ControlPlaneServer, node: SignedNode) -> None:
    stop = threading.Event()
    seen: list[list[Any]] = []

    def poll() -> None:
        while not stop.is_set():
            seen.append([j["model_name"] for j in data(node.poll_jobs(25))["jobs"]])

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for batch in range(3):  # 24 jobs: every one fits in a poll's 25
            ids = cp.create_jobs(8, node.pubkey, model_name=f"m:{batch}", max_tokens=None)
            assert len(set(ids)) == 8
            time.sleep(0.05)
    finally:
        stop.set()
        poller.join()
    assert len(seen) > 3
    for models in seen:  # never a poll that saw part of a batch
        assert all(models.count(m) == 8 for m in models), models
    row = cp.job(ids[0])
    assert (row["model_name"], row["input_spec"]["max_tokens"]) == ("m:2", None)
    mixed = cp.create_jobs(2, node.pubkey, model_name="m:1", each=[{}, {"model_name": "m:9"}])
    assert [cp.job(j)["model_name"] for j in mixed] == ["m:1", "m:9"]


def test_the_request_log_says_which_jobs_each_poll_answer_carried(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    assert data(node.poll_jobs(5))["jobs"] == []
    first, second = cp.create_job(node.pubkey), cp.create_job(node.pubkey)
    data(node.poll_jobs(1))
    polls = [r for r in cp.received() if r["path"] == POLL]
    assert [p["jobs"] for p in polls] == [[], [first]]
    assert second


# faults ----------------------------------------------------------------------------------------


def test_events_error_fault_stores_nothing(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("events", "error", times=2)
    assert node.post_events(job, [token("a")]).status_code == 500
    assert node.post_events(job, [token("a")]).status_code == 500
    assert data(node.post_events(job, [token("a")])) == {"inserted": 1}
    assert cp.token_text(job) == "a"


def test_events_drop_fault_stores_then_loses_the_answer(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("events", "drop", job_id=job)
    with pytest.raises(httpx.TransportError):
        node.post_events(job, [token("a"), token("b")])
    assert cp.token_text(job) == "ab"  # stored although the node never heard so
    assert cp.received()[-1]["status"] == 0
    data(node.post_events(job, [token("c")]))  # used up
    assert cp.token_text(job) == "abc"


def test_a_fault_is_used_only_by_requests_that_pass_the_checks(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("events", "error")
    assert node.post_events(job, []).status_code == 400
    assert node.post_events(job, [token("a")]).status_code == 500


def test_complete_error_fault_is_not_stored(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("complete", "error", status=503)
    assert node.complete(job, {"status": "completed"}).status_code == 503
    assert (cp.job(job)["status"], cp.complete_calls(job)) == ("assigned", 0)
    data(node.complete(job, {"status": "completed"}))
    assert cp.complete_calls(job) == 1


def test_complete_drop_fault_stores_and_counts(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("complete", "drop")
    with pytest.raises(httpx.TransportError):
        node.complete(job, {"status": "completed", "result": {"text": "t"}})
    assert (cp.job(job)["status"], cp.complete_calls(job)) == ("completed", 1)
    data(node.complete(job, {"status": "completed"}))  # the retry a runner must not make
    assert cp.complete_calls(job) == 2


def test_close_faults_store_nothing(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("complete", "close")
    cp.job_fault("events", "close")
    cp.job_fault("poll", "close")
    calls: list[Callable[[], httpx.Response]] = [
        lambda: node.complete(job, {}),
        lambda: node.post_events(job, [token("a")]),
        node.poll_jobs,
    ]
    for call in calls:
        with pytest.raises(httpx.TransportError):
            call()
    assert (cp.complete_calls(job), cp.job_events(job)) == (0, [])
    assert [j["id"] for j in data(node.poll_jobs())["jobs"]] == [job]


def test_faults_last_until_cleared_with_times_none(
    cp: ControlPlaneServer, node: SignedNode
) -> None:
    cp.job_fault("poll", "error", times=None, status=502)
    assert [node.poll_jobs().status_code for _ in range(3)] == [502, 502, 502]
    cp.clear_job_faults()
    assert node.poll_jobs().status_code == 200


def test_overlapping_event_batches_are_counted(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("events", "delay", seconds=0.5)
    data(node.post_events(job, [token("a")]))
    assert cp.job(job)["events_inflight_max"] == 1  # one after another

    cp.job_fault("events", "delay", seconds=0.5)
    slow = threading.Thread(target=node.post_events, args=(job, [token("b")]))
    slow.start()
    time.sleep(0.2)
    with SignedNode(cp.url, node.secret) as same_key:
        data(same_key.post_events(job, [token("c")]))
    slow.join()
    assert cp.job(job)["events_inflight_max"] == 2
    assert cp.token_text(job) == "acb"  # the overlapping batch was stored first


def test_an_outage_covers_the_job_routes(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.set_down(30)
    try:
        assert node.poll_jobs().status_code == 503
        assert node.post_events(job, [token("a")]).status_code == 503
        assert node.complete(job, {}).status_code == 503
    finally:
        cp.set_down(None)
    assert cp.job_events(job) == [] and cp.complete_calls(job) == 0


def test_reset_forgets_jobs(cp: ControlPlaneServer, node: SignedNode, tmp_path: Path) -> None:
    cp.create_job(node.pubkey)
    cp.job_fault("poll", "error", times=None)
    cp.reset()
    assert cp.jobs() == []
    with provider(cp, "node-a") as again:
        assert data(again.poll_jobs())["jobs"] == []


def test_a_dropped_poll_answer_claims_nothing(cp: ControlPlaneServer, node: SignedNode) -> None:
    job = cp.create_job(node.pubkey)
    cp.job_fault("poll", "drop")
    with pytest.raises(httpx.TransportError):
        node.poll_jobs()
    assert [j["id"] for j in data(node.poll_jobs())["jobs"]] == [job]
