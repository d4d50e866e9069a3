"""``infernet watch`` serves the chat jobs the network routes to it, on real processes: the
control-plane test server (job routes as the real one: assigned jobs come back on every poll,
complete is never deduplicated), the Ollama-compatible test server streaming ``/api/chat``."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.conftest import INFERNET, Node, keygen, needs_fake, verified_beats
from tests.integration.test_hf import ENGINE, REPO, free_port, publish_repo
from tests.servers.chatreply import reply_text
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.servers.hub_harness import start_hub_server
from tests.servers.llamacpp_harness import start_router
from tests.servers.tinygguf import write_tiny_gguf

pytestmark = pytest.mark.integration

SMALL, QWEN, EMBED = "smollm2:135m", "qwen2.5:0.5b", "all-minilm:latest"
HELLO = [{"role": "user", "content": "Say hello."}]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Watch:
    """``infernet watch`` as a real process, its log kept."""

    def __init__(self, node: Node, name: str = "watch") -> None:
        self.log = node.tmp / f"{name}.log"
        self.node = node
        with self.log.open("w") as log:
            command = [INFERNET, "watch", "-c", str(node.config), "--state-dir", str(node.state)]
            self.proc = subprocess.Popen(
                [*command, "--tick", "1"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=node.env,
                stdin=subprocess.DEVNULL,
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> float:
        """Signal it; the seconds it took to exit."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout)
        return time.monotonic() - started


@pytest.fixture
def serving(node: Node, cp: ControlPlaneServer) -> Iterator[tuple[Node, ControlPlaneServer, str]]:
    """A node with a key, heartbeating to the control-plane test server, polling jobs fast."""
    needs_fake(node)
    pubkey = keygen(node)
    yield node, cp, pubkey


def configure(node: Node, cp: ControlPlaneServer, served: list[Any], **jobs: Any) -> None:
    plane = {"url": cp.url, "key_file": str(node.tmp / "node.key"), "heartbeat_interval": "1s"}
    settings = {"poll_interval": "0.2s", **jobs}
    node.write_config(served, control_plane=plane, jobs=settings)


def advertising(cp: ControlPlaneServer, *names: str) -> Callable[[], bool]:
    def check() -> bool:
        beats = verified_beats(cp)
        return bool(beats) and set(names) <= set(beats[-1]["body"]["specs"]["served_models"])

    return check


def last_load(cp: ControlPlaneServer) -> dict[str, Any]:
    load: dict[str, Any] = verified_beats(cp)[-1]["body"]["specs"]["load"]
    return load


def _chat(request: dict[str, Any]) -> bool:
    """A generation on the Ollama test server (not a load or an unload)."""
    return request["path"] == "/api/chat" and bool(request["body"].get("messages"))


def _specs(beat: dict[str, Any]) -> dict[str, Any]:
    specs: dict[str, Any] = beat["body"].get("specs", {})
    return specs


def _served(beat: dict[str, Any]) -> list[str]:
    served: list[str] = _specs(beat).get("served_models", [])
    return served


def kinds(cp: ControlPlaneServer, job_id: str) -> list[str]:
    return [e["event_type"] for e in cp.job_events(job_id)]


def test_watch_serves_a_chat_job_end_to_end(serving: tuple[Node, ControlPlaneServer, str]) -> None:
    node, cp, pubkey = serving
    configure(node, cp, [SMALL])
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        load = last_load(cp)
        assert (load["active_jobs"], load["concurrency_cap"]) == (0, 4)
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO, max_tokens=64)
        row = cp.wait_job(job, timeout=20)
        assert row["status"] == "completed", row
        events = cp.job_events(job)
        assert kinds(cp, job)[0] == "meta" and kinds(cp, job)[-1] == "done"
        assert sum(e["event_type"] in ("done", "error") for e in events) == 1
        meta = events[0]["data"]
        assert (meta["model"], meta["engine"]) == (SMALL, "ollama")
        assert meta["provider_node_id"] and meta["started_at"]
        expected = reply_text(HELLO)
        assert cp.token_text(job) == expected == events[-1]["data"]["text"]
        assert row["result"]["text"] == expected and row["result"]["completed_by"]
        time.sleep(1.5)  # more polls and ticks: the completed job is never run again
        assert cp.complete_calls(job) == 1
        wait_for(
            "tokens/s in a heartbeat", lambda: "bench" in verified_beats(cp)[-1]["body"]["specs"]
        )
        bench = verified_beats(cp)[-1]["body"]["specs"]["bench"]
        assert bench["samples"] == 1 and bench["tokens_per_second_avg"] > 0
        # Per-model keep_alive and context go with every chat (Ollama's default otherwise).
        chats = [r for r in needs_fake(node).requests() if _chat(r)]
        assert len(chats) == 2  # the canary and the job
        assert chats[-1]["body"]["options"]["num_predict"] == 64
    finally:
        assert watch.stop() < 6
    assert "Traceback" not in watch.text()


def test_jobs_it_does_not_serve_are_answered_failed_with_an_error_event(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    configure(node, cp, [SMALL, EMBED])
    watch = Watch(node)
    try:
        wait_for("the models advertised", advertising(cp, SMALL, EMBED))
        cases = {
            "not advertised": cp.create_job(pubkey, model_name="ghost:7b"),
            "embedding model": cp.create_job(pubkey, model_name=EMBED),
            "no model": cp.create_job(pubkey, model_name=None),
            "not chat": cp.create_job(pubkey, model_name=SMALL, type="inference"),
            "too old": cp.create_job(pubkey, model_name=SMALL, age_s=3600),
        }
        for why, job in cases.items():
            row = cp.wait_job(job, timeout=15)
            assert row["status"] == "failed", (why, row)
            assert kinds(cp, job) == ["error"], why
            assert cp.complete_calls(job) == 1, why
        assert "not advertised" in cp.job(cases["not advertised"])["error"]
        assert "embedding" in cp.job(cases["embedding model"])["error"]
        assert "default_model" in cp.job(cases["no model"])["error"]
        assert "only chat" in cp.job(cases["not chat"])["error"]
        assert "max_age" in cp.job(cases["too old"])["error"]
    finally:
        watch.stop()


def test_a_job_naming_no_model_goes_to_jobs_default_model(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    configure(node, cp, [SMALL], default_model=SMALL)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        job = cp.create_job(pubkey, model_name=None, messages=HELLO)
        assert cp.wait_job(job, timeout=15)["status"] == "completed"
        assert cp.job_events(job)[0]["data"]["model"] == SMALL
    finally:
        watch.stop()


@pytest.mark.parametrize("fault", ["chat_error", "chat_cut"])
def test_a_broken_stream_ends_in_one_error_never_an_empty_done(
    serving: tuple[Node, ControlPlaneServer, str], fault: str
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        server.chat_fault(SMALL, fault, 2, message="CUDA error: out of memory", times=1)
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        row = cp.wait_job(job, timeout=15)
        assert row["status"] == "failed"
        got = kinds(cp, job)
        assert got[0] == "meta" and got[-1] == "error" and "done" not in got
        assert got.count("error") == 1 and cp.complete_calls(job) == 1
        if fault == "chat_error":
            assert "out of memory" in row["error"]
    finally:
        watch.stop()


def test_fifty_jobs_at_once_with_concurrency_4(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL], concurrency=4)
    server.set_chat(token_delay=0.02)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        jobs = [cp.create_job(pubkey, model_name=SMALL, messages=HELLO) for _ in range(50)]
        for job in jobs:
            cp.wait_job(job, timeout=60)
        rows = [cp.job(j) for j in jobs]
        assert all(cp.complete_calls(j) == 1 for j in jobs)
        done = [r for r in rows if r["status"] == "completed"]
        full = [r for r in rows if r["status"] == "failed" and "node full" in r["error"]]
        assert len(done) + len(full) == 50 and len(done) >= 20
        # Never more than 4 generating at once: meta → terminal windows never overlap by 5.
        spans = []
        for job in jobs:
            events = cp.job_events(job)
            if events and events[0]["event_type"] == "meta":
                spans.append((events[0]["id"], events[-1]["id"]))
        points = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        running = peak = 0
        for _, step in points:
            running += step
            peak = max(peak, running)
        assert peak <= 4
        assert max(b["body"]["specs"]["load"]["active_jobs"] for b in verified_beats(cp)) <= 20
    finally:
        watch.stop()


def test_a_job_longer_than_a_poll_interval_runs_once(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL], poll_interval="0.1s")
    server.set_chat(token_delay=0.3)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        assert cp.wait_job(job, timeout=30)["status"] == "completed"
        polls = [r for r in cp.received() if r["path"] == "/api/v1/node/jobs/poll"]
        assert len(polls) > 10  # polled many times while the job ran
        assert kinds(cp, job).count("meta") == 1
        chats = [r for r in server.requests() if _chat(r)]
        assert [c["body"]["options"]["num_predict"] for c in chats] == [1, 512]  # canary, job
    finally:
        watch.stop()


def test_a_removed_model_is_withdrawn_then_drained_then_deleted(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL, QWEN], drain_timeout="1s")
    server.set_chat(token_delay=0.5, reply_tokens=200, model=QWEN)
    watch = Watch(node)
    try:
        wait_for("the models advertised", advertising(cp, SMALL, QWEN))
        job = cp.create_job(pubkey, model_name=QWEN, messages=HELLO)
        wait_for("the job streaming", lambda: "token" in kinds(cp, job))
        configure(node, cp, [SMALL], drain_timeout="1s")
        row = cp.wait_job(job, timeout=30)
        assert row["status"] == "failed" and "model removed" in row["error"]
        wait_for("the weights deleted", lambda: QWEN not in node.installed())
        # The heartbeat without it went out before the job was failed and the weights went.
        beats = verified_beats(cp)
        withdrawn = next(b["time"] for b in beats if QWEN not in _served(b))
        assert withdrawn <= cp.job(job)["completions"][0]["time"]
        again = cp.create_job(pubkey, model_name=QWEN)
        assert cp.wait_job(again, timeout=15)["status"] == "failed"
    finally:
        watch.stop()


def test_sigterm_says_goodbye_then_fails_running_jobs_and_answers_them(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL], drain_timeout="2s")
    server.set_chat(token_delay=0.5, reply_tokens=200)
    watch = Watch(node)
    wait_for("the model advertised", advertising(cp, SMALL))
    job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
    wait_for("the job streaming", lambda: "token" in kinds(cp, job))
    took = watch.stop()
    assert took < 2 + 5, took
    row = cp.job(job)
    assert row["status"] == "failed" and row["error"] == "node shutting down"
    assert kinds(cp, job)[-1] == "error" and cp.complete_calls(job) == 1
    offline = [b for b in verified_beats(cp) if b["body"].get("status") == "offline"]
    assert offline and offline[0]["time"] <= row["completions"][0]["time"]


def test_a_job_cut_off_by_sigkill_is_answered_failed_once_after_restart(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    server.set_chat(token_delay=0.5, reply_tokens=200)
    watch = Watch(node)
    wait_for("the model advertised", advertising(cp, SMALL))
    job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
    wait_for("the job streaming", lambda: "token" in kinds(cp, job))
    watch.stop(signal.SIGKILL)
    server.reset_chat()
    again = Watch(node, "watch-2")
    try:
        row = cp.wait_job(job, timeout=20)
        assert row["status"] == "failed" and "interrupted by a restart" in row["error"]
        time.sleep(1.0)
        assert cp.complete_calls(job) == 1
        assert kinds(cp, job).count("meta") == 1  # never run a second time
    finally:
        again.stop()


def test_an_outage_mid_stream_loses_no_token_and_completes_once(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    server.set_chat(token_delay=0.1, reply_tokens=30)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        wait_for("the job streaming", lambda: "token" in kinds(cp, job))
        cp.job_fault("events", "error", times=3, status=503)  # answered: nothing stored
        cp.job_fault("complete", "error", times=2, status=503)
        row = cp.wait_job(job, timeout=60)
        assert row["status"] == "completed"
        assert cp.token_text(job) == row["result"]["text"]  # every token, none twice
        assert cp.complete_calls(job) == 1
    finally:
        watch.stop()


def test_with_jobs_off_the_node_advertises_a_cap_of_0_and_takes_no_job(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    configure(node, cp, [SMALL], enabled=False)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        load = last_load(cp)
        assert (load["active_jobs"], load["concurrency_cap"]) == (0, 0)
        job = cp.create_job(pubkey, model_name=SMALL)
        time.sleep(1.5)
        assert cp.job(job)["status"] == "assigned"  # left for a node that serves
        assert not [r for r in cp.received() if r["path"] == "/api/v1/node/jobs/poll"]
    finally:
        watch.stop()


def test_a_heartbeat_from_apply_reports_the_daemons_jobs_or_a_cap_of_0(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, _pubkey = serving
    configure(node, cp, [SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    load = last_load(cp)
    assert (load["active_jobs"], load["concurrency_cap"]) == (0, 0)  # nothing serves jobs
    watch = Watch(node)
    try:
        wait_for("the daemon's beat", lambda: last_load(cp).get("concurrency_cap") == 4)
        out = node.run("apply", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        assert last_load(cp)["concurrency_cap"] == 4  # the daemon's figures, from the store
    finally:
        watch.stop()


def test_a_model_that_fails_its_canary_is_not_advertised_and_says_why(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, _pubkey = serving
    server = needs_fake(node)
    server.chat_fault(QWEN, "chat_error", 0, message="model requires more system memory")
    configure(node, cp, [SMALL, QWEN])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "did not answer a one-token test generation" in out.stdout + out.stderr
    beat = verified_beats(cp)[-1]["body"]["specs"]
    assert beat["served_models"] == [SMALL]
    assert any("more system memory" in e for e in beat["reconciler"]["errors"])
    status = json.loads(node.run("status", "--json").stdout)
    assert status["advertised"] == [SMALL]
    assert any("more system memory" in u for u in status["unserved"])
    plan = node.run("plan")
    assert "did not answer" in plan.stdout
    server.clear_faults()


def test_the_canary_runs_once_per_digest(serving: tuple[Node, ControlPlaneServer, str]) -> None:
    node, cp, _pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    assert node.run("apply", "--yes").returncode == 0
    assert node.run("apply", "--yes").returncode == 0
    chats = [r for r in server.requests() if _chat(r)]
    assert len(chats) == 1
    assert chats[0]["body"]["options"]["num_predict"] == 1


def test_one_watch_serves_chats_on_ollama_llamacpp_and_an_engine(
    node: Node, cp: ControlPlaneServer, tmp_path: Path
) -> None:
    """A node running only ``infernet watch`` serves chats end to end on every backend: the
    Ollama test server, the real llama-server router, and an engine started from the hub cache."""
    needs_fake(node)
    pubkey = keygen(node)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    write_tiny_gguf(tmp_path / "tiny-chat.gguf", name="tiny-chat")
    hub = start_hub_server(tmp_path / "hub", tmp_path / "hub-root")
    router = start_router(tmp_path / "router", gguf)
    node.env.update(hub.client_env(tmp_path / "hf-home"))
    node.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # engines run elsewhere
    publish_repo(hub.root)
    engine_port = free_port()
    served = [
        SMALL,
        {
            "name": "tiny-chat.gguf",
            "backend": "llamacpp",
            "source": f"file://{tmp_path / 'tiny-chat.gguf'}",
        },
        {"name": REPO, "backend": "vllm", "advertise_as": "tiny-llm"},
    ]
    node.write_config(
        served,
        backends={
            "ollama": {
                "url": node.url,
                "registry": node.registry,
                "models_dir": str(node.models_dir),
            },
            "llamacpp": {"models_dir": str(gguf), "url": router.url},
            "hf": {
                "cache_dir": str(tmp_path / "hf-cache"),
                "url": f"http://127.0.0.1:{engine_port}",
                "gpu_memory_utilization": 0.3,
                "commands": {"vllm": ENGINE},
            },
        },
        control_plane={
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "heartbeat_interval": "1s",
        },
        jobs={"poll_interval": "0.2s"},
        budget={"vram": "24GiB", "disk_reserve": "1MiB"},
    )
    watch = Watch(node)
    try:
        wait_for("every model advertised", advertising(cp, SMALL, "tiny-chat.gguf", "tiny-llm"), 90)
        engines = {}
        for model in (SMALL, "tiny-chat.gguf", "tiny-llm"):
            job = cp.create_job(pubkey, model_name=model, messages=HELLO, max_tokens=8)
            row = cp.wait_job(job, timeout=60)
            assert row["status"] == "completed", (model, row)
            events = cp.job_events(job)
            assert events[0]["event_type"] == "meta" and events[-1]["event_type"] == "done"
            assert cp.token_text(job) == events[-1]["data"]["text"] == row["result"]["text"]
            assert cp.complete_calls(job) == 1
            engines[model] = events[0]["data"]["engine"]
        assert engines == {SMALL: "ollama", "tiny-chat.gguf": "llamacpp", "tiny-llm": "vllm"}
    finally:
        watch.stop()
        for proc in psutil.process_iter(["cmdline"]):
            if "tests.servers.fake_engine" in " ".join(proc.info.get("cmdline") or []):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        router.close()
        hub.close()


def test_a_backend_killed_mid_job_fails_that_job_once_and_serving_goes_on(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    server.set_chat(token_delay=0.3, reply_tokens=100)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        wait_for("the job streaming", lambda: "token" in kinds(cp, job))
        server.restart(kill=True)
        back = time.time()
        row = cp.wait_job(job, timeout=30)
        assert row["status"] == "failed" and kinds(cp, job)[-1] == "error"
        assert "done" not in kinds(cp, job) and cp.complete_calls(job) == 1
        # While Ollama was down the model may have been withdrawn; once a beat lists it again
        # it serves again.
        wait_for(
            "advertised again",
            lambda: any(b["time"] > back and SMALL in _served(b) for b in verified_beats(cp)),
        )
        after = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        assert cp.wait_job(after, timeout=30)["status"] == "completed"
    finally:
        watch.stop()
    assert "Traceback" not in watch.text()


def test_event_answers_lost_after_storing_never_duplicate_a_token(
    serving: tuple[Node, ControlPlaneServer, str],
) -> None:
    node, cp, pubkey = serving
    server = needs_fake(node)
    configure(node, cp, [SMALL])
    server.set_chat(token_delay=0.05, reply_tokens=40)
    watch = Watch(node)
    try:
        wait_for("the model advertised", advertising(cp, SMALL))
        cp.job_fault("events", "drop", times=2)  # stored, then the connection drops
        cp.job_fault("complete", "close", times=1)  # never reached the server
        job = cp.create_job(pubkey, model_name=SMALL, messages=HELLO)
        row = cp.wait_job(job, timeout=60)
        assert row["status"] == "completed"
        assert cp.token_text(job) == row["result"]["text"]  # none twice
        assert kinds(cp, job).count("done") >= 1 and cp.complete_calls(job) == 1
    finally:
        watch.stop()
