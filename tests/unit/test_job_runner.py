"""The job runner's rules, with the state store's real job book and in-memory peers: each job
run once and answered once; refusals answered; concurrency, waiting and "node full"; drains."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.controlplane.jobs import Delivery, JobCallFailed
from reconciler.errors import ChatFailed
from reconciler.model import JobSettings
from reconciler.names import key
from reconciler.serving.routes import Route
from reconciler.serving.runner import JobRunner
from state import Store


class Plane:
    """The control plane's job routes, in memory: never claims, never deduplicates."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.completes: dict[str, list[dict[str, Any]]] = {}
        self.lock = threading.Lock()
        self.complete_failures: list[Delivery] = []

    def add(self, job_id: str, model: str | None = "m", **fields: Any) -> None:
        row = {
            "id": job_id,
            "type": "chat",
            "status": "assigned",
            "model_name": model,
            "input_spec": {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
                "temperature": None,
            },
            "created_at": datetime.now(UTC).isoformat(),
        }
        self.jobs[job_id] = row | fields

    def poll_jobs(self, limit: int) -> list[object]:
        with self.lock:
            return [dict(r) for r in self.jobs.values() if r["status"] == "assigned"][:limit]

    def post_job_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        with self.lock:
            self.events.setdefault(job_id, []).extend(events)

    def complete_job(self, job_id: str, answer: dict[str, Any]) -> None:
        with self.lock:
            if self.complete_failures:
                kind = self.complete_failures.pop(0)
                raise JobCallFailed(f"complete: {kind}", kind)
            self.completes.setdefault(job_id, []).append(answer)
            self.jobs[job_id]["status"] = answer["status"]

    def kinds(self, job_id: str) -> list[str]:
        return [e["event_type"] for e in self.events.get(job_id, [])]


class Chatty:
    """A backend's chat: ``tokens`` deltas, optionally slow, failing or held at a gate."""

    def __init__(
        self,
        tokens: int = 3,
        delay: float = 0.0,
        fail: str | None = None,
        gate: threading.Event | None = None,
    ) -> None:
        self.tokens, self.delay, self.fail, self.gate = tokens, delay, fail, gate
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        with self.lock:
            self.calls += 1
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            for i in range(self.tokens):
                if self.gate is not None:
                    self.gate.wait(10)
                if cancel.wait(self.delay):
                    return
                if self.fail is not None and i == 1:
                    raise ChatFailed(self.fail)
                yield f"t{i} "
            ending.reason = "stop"
        finally:
            with self.lock:
                self.active -= 1


def route(name: str, backend: Chatty, *, embedding: bool = False) -> Route:
    served = Served(name=name, advertise_as=name, embedding=embedding)
    model_key = key("ollama", f"registry.ollama.ai/library/{name}:latest")
    return Route(name, model_key, "ollama", backend, served)  # type: ignore[arg-type]


def wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


def runner(plane: Plane, store: Store, routes: dict[str, Route], **settings: Any) -> JobRunner:
    def router(name: str) -> Route | str:
        found = routes.get(name)
        return found if found is not None else f"{name} is not advertised by this node right now"

    return JobRunner(
        client=plane,
        ledger=store,
        router=router,
        settings=JobSettings(poll_interval=0.05, **settings),
        node_id="node-1",
    )


def test_a_job_longer_than_a_poll_interval_runs_exactly_once(store: Store) -> None:
    plane, backend = Plane(), Chatty(tokens=5, delay=0.1)
    jobs = runner(plane, store, {"m": route("m", backend)})
    plane.add("j1")
    jobs.start()
    assert wait(lambda: "j1" in plane.completes)
    time.sleep(0.3)  # more polls: the job is completed, nothing more happens
    jobs.stop(2)
    assert backend.calls == 1
    assert [a["status"] for a in plane.completes["j1"]] == ["completed"]
    kinds = plane.kinds("j1")
    assert kinds[0] == "meta" and kinds.count("token") == 5 and kinds[-1] == "done"
    result = plane.completes["j1"][0]["result"]
    assert result["text"] == "t0 t1 t2 t3 t4 " and result["token_count"] == 5
    meta = plane.events["j1"][0]["data"]
    assert (meta["provider_node_id"], meta["model"], meta["engine"]) == ("node-1", "m", "ollama")


def test_refused_jobs_get_an_error_event_and_one_failed_answer(store: Store) -> None:
    plane = Plane()
    routes = {"m": route("m", Chatty()), "e": route("e", Chatty(), embedding=True)}
    jobs = runner(plane, store, routes)
    plane.add("unknown", model="ghost")
    plane.add("old", created_at=(datetime.now(UTC) - timedelta(hours=1)).isoformat())
    plane.add("type", type="inference")
    plane.add("nomodel", model=None)
    plane.add("badspec", input_spec={"messages": "hi"})
    jobs.start()
    assert wait(lambda: len(plane.completes) == 5)
    jobs.stop(1)
    for job_id, answers in plane.completes.items():
        assert [a["status"] for a in answers] == ["failed"], job_id
        assert plane.kinds(job_id) == ["error"], job_id
    assert "not advertised" in plane.completes["unknown"][0]["error"]
    assert "max_age" in plane.completes["old"][0]["error"]
    assert "only chat" in plane.completes["type"][0]["error"]
    assert "default_model" in plane.completes["nomodel"][0]["error"]
    assert "messages" in plane.completes["badspec"][0]["error"]


def test_a_job_naming_no_model_goes_to_the_default_model(store: Store) -> None:
    plane = Plane()
    jobs = runner(plane, store, {"m": route("m", Chatty())}, default_model="m")
    plane.add("j", model=None)
    jobs.start()
    assert wait(lambda: "j" in plane.completes)
    jobs.stop(1)
    assert plane.completes["j"][0]["status"] == "completed"


def test_fifty_jobs_at_once_with_concurrency_4(store: Store) -> None:
    plane, backend = Plane(), Chatty(tokens=3, delay=0.02)
    jobs = runner(plane, store, {"m": route("m", backend)}, concurrency=4)
    for n in range(50):
        plane.add(f"j{n}")
    jobs.start()
    assert wait(lambda: len(plane.completes) == 50, 30)
    jobs.stop(1)
    assert backend.peak <= 4
    assert all(len(answers) == 1 for answers in plane.completes.values())
    done = [j for j, a in plane.completes.items() if a[0]["status"] == "completed"]
    full = [j for j, a in plane.completes.items() if "node full" in a[0].get("error", "")]
    assert len(done) >= 20 and len(done) + len(full) == 50  # 4 running + 16 waiting at least


def test_an_error_inside_the_stream_ends_in_error_never_done(store: Store) -> None:
    plane = Plane()
    jobs = runner(plane, store, {"m": route("m", Chatty(fail="CUDA error: out of memory"))})
    plane.add("j")
    jobs.start()
    assert wait(lambda: "j" in plane.completes)
    jobs.stop(1)
    kinds = plane.kinds("j")
    assert "done" not in kinds and kinds[-1] == "error" and kinds.count("error") == 1
    assert plane.completes["j"] == [{"status": "failed", "error": "CUDA error: out of memory"}]


def test_a_drain_fails_a_job_still_running_after_its_timeout(store: Store) -> None:
    plane, gate = Plane(), threading.Event()
    model = route("m", Chatty(tokens=3, gate=gate))
    jobs = runner(plane, store, {"m": model})
    plane.add("j")
    jobs.start()
    assert wait(lambda: jobs.load()["active_jobs"] == 1)
    assert jobs.drain([model.key], 0.2) == ["j"]
    gate.set()
    assert wait(lambda: "j" in plane.completes)
    plane.add("k")  # the model is being removed: no new job for it
    assert wait(lambda: "k" in plane.completes)
    jobs.stop(1)
    assert "model removed" in plane.completes["j"][0]["error"]
    assert "model removed" in plane.completes["k"][0]["error"]


def test_an_answer_the_control_plane_missed_is_sent_again_once(store: Store) -> None:
    plane = Plane()
    plane.complete_failures = [Delivery.NOT_STORED]
    jobs = runner(plane, store, {"m": route("m", Chatty())})
    plane.add("j")
    jobs.start()
    assert wait(lambda: "j" in plane.completes)
    time.sleep(0.3)
    jobs.stop(1)
    assert len(plane.completes["j"]) == 1
    assert store.jobs_unreported() == []


def test_a_job_cut_off_by_a_restart_is_answered_failed_once_and_not_rerun(store: Store) -> None:
    plane, backend = Plane(), Chatty()
    plane.add("j")
    store.job_begin("j", model="m")  # taken by the run before the crash, never finished
    jobs = runner(plane, store, {"m": route("m", backend)})
    jobs.start()
    assert wait(lambda: "j" in plane.completes)
    time.sleep(0.2)
    jobs.stop(1)
    assert backend.calls == 0
    assert plane.completes["j"] == [
        {"status": "failed", "error": "interrupted by a restart of the node"}
    ]
    assert plane.kinds("j") == ["error"]


def test_stopping_fails_running_jobs_with_node_shutting_down(store: Store) -> None:
    plane, gate = Plane(), threading.Event()
    jobs = runner(plane, store, {"m": route("m", Chatty(gate=gate))})
    plane.add("j")
    jobs.start()
    assert wait(jobs.busy)
    jobs.stop(0.2)
    gate.set()
    assert wait(lambda: "j" in plane.completes)
    assert plane.completes["j"][0]["error"] == "node shutting down"


def test_with_jobs_off_the_node_takes_none_and_says_so_in_its_load(store: Store) -> None:
    plane = Plane()
    jobs = runner(plane, store, {"m": route("m", Chatty())}, enabled=False)
    plane.add("j")
    jobs.start()
    time.sleep(0.3)
    jobs.stop(1)
    assert plane.completes == {} and jobs.load() == {"active_jobs": 0, "concurrency_cap": 0}
