"""Chats and canaries on the OpenAI-compatible backends: the real llama-server router (tiny
random-weight GGUF models) and an engine (the stand-in, started through ``Engines`` as vLLM
would be, and one infernet did not start).

Random weights answer garbage, so on llama.cpp what is checked is streaming and termination;
the engine stand-in answers a known text and injects the faults (error event, cut, stall).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.backends.base import AdapterContext, ChatRequest, Ending, Served
from reconciler.backends.hf.backend import HfBackend
from reconciler.backends.hf.backend import open_backends as open_hf
from reconciler.backends.hf.engines import Engines, EngineSpec
from reconciler.backends.hf.settings import HfSettings
from reconciler.backends.llamacpp.backend import LlamacppBackend
from reconciler.backends.llamacpp.settings import LlamacppSettings
from reconciler.errors import ChatFailed
from reconciler.model import FOREVER, BackendKind
from tests.servers import llamabuild
from tests.servers.chatreply import reply_tokens
from tests.servers.engine_harness import EngineControl, start_fake_engine
from tests.servers.llamacpp_harness import Router, start_router
from tests.servers.openai_chat import DEFAULT_ERROR
from tests.servers.tinygguf import corrupt_gguf, write_tiny_gguf

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"})
STALL = 1.5  # the adapters' stall window in these tests (INFERNET_PULL_STALL_TIMEOUT)


def request(**kw: object) -> ChatRequest:
    return ChatRequest(messages=MESSAGES, **kw)  # type: ignore[arg-type]


def run_until_failure(deltas: Iterator[str]) -> tuple[list[str], ChatFailed]:
    """The deltas received before the chat failed, and the failure (it must fail)."""
    got: list[str] = []
    with pytest.raises(ChatFailed) as failed:
        for delta in deltas:
            got.append(delta)
    return got, failed.value


# --------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    binary = llamabuild.build()
    tmp = tmp_path_factory.mktemp("llama-chat")
    models = tmp / "models"
    models.mkdir()
    write_tiny_gguf(models / "tiny-a.gguf", name="tiny-a")
    write_tiny_gguf(models / "tiny-b.gguf", name="tiny-b", hidden=128, ff=256)
    corrupt_gguf(models / "broken.gguf", kind="truncated")
    with start_router(tmp / "router", models, binary=binary, models_max=2) as r:
        yield r


@pytest.fixture
def llama(router: Router) -> Iterator[LlamacppBackend]:
    settings = LlamacppSettings(models_dir=str(router.models_dir), url=router.url)
    backend = LlamacppBackend(settings, stall_timeout=30.0)
    try:
        yield backend
    finally:
        for model in ("tiny-a", "tiny-b"):
            router.unload(model)
        backend.close()


def status(router: Router, model: str) -> str:
    entry = router.model(model)
    assert entry is not None
    return str(entry["status"]["value"])


def test_llamacpp_chat_streams_to_its_finish_within_max_tokens(
    llama: LlamacppBackend, router: Router
) -> None:
    ending = Ending()
    served = Served("tiny-b.gguf", "tiny-b.gguf")
    got = list(
        llama.chat(served, request(max_tokens=5, temperature=0.7), ending, threading.Event())
    )
    assert ending.reason in ("length", "stop")
    assert ending.tokens is not None and 1 <= ending.tokens <= 5  # usage: honoured max_tokens
    assert ending.seconds is not None  # llama-server's own timings
    assert len(got) <= 5 and all(got)
    assert status(router, "tiny-b") == "loaded"  # autoloaded by the chat


def test_llamacpp_chats_in_a_row_never_meet_a_closed_kept_alive_connection(
    llama: LlamacppBackend,
) -> None:
    # llama-server may close a kept-alive connection right after a streamed answer; each chat
    # has a connection of its own, so none of these fails.
    served = Served("tiny-a.gguf", "tiny-a.gguf")
    for _ in range(40):
        ending = Ending()
        list(llama.chat(served, request(max_tokens=2), ending, threading.Event()))
        assert ending.reason in ("length", "stop")


def test_llamacpp_chat_with_an_unknown_model_is_the_routers_refusal(
    llama: LlamacppBackend,
) -> None:
    got, failure = run_until_failure(
        llama.chat(Served("nope.gguf", "nope.gguf"), request(), Ending(), threading.Event())
    )
    assert got == []
    assert "HTTP 400" in str(failure) and "model 'nope' not found" in str(failure)


def test_llamacpp_canary_unloads_an_unpinned_model_and_keeps_a_pinned_one(
    llama: LlamacppBackend, router: Router
) -> None:
    llama.canary(Served("tiny-a.gguf", "tiny-a.gguf", keep_alive=300.0))
    assert status(router, "tiny-a") == "unloaded"
    llama.canary(Served("tiny-a.gguf", "tiny-a.gguf", keep_alive=FOREVER))
    assert status(router, "tiny-a") == "loaded"


def test_llamacpp_canary_of_a_damaged_file_says_it_failed_to_load(
    llama: LlamacppBackend, router: Router
) -> None:
    with pytest.raises(ChatFailed, match=r"HTTP 500.*failed to load") as failed:
        llama.canary(Served("broken.gguf", "broken.gguf"))
    assert "\n" not in str(failed.value)
    assert status(router, "broken") == "unloaded"


def test_llamacpp_cancelled_before_it_starts_sends_nothing(llama: LlamacppBackend) -> None:
    cancel, ending = threading.Event(), Ending()
    cancel.set()
    assert list(llama.chat(Served("tiny-a.gguf", "x"), request(), ending, cancel)) == []
    assert ending.reason == "cancel"


def test_llamacpp_embedding_model_does_not_chat(llama: LlamacppBackend) -> None:
    served = Served("tiny-a.gguf", "tiny-a.gguf", embedding=True)
    with pytest.raises(ChatFailed, match="is an embedding model; it does not chat"):
        list(llama.chat(served, request(), Ending(), threading.Event()))


# --------------------------------------------------------------------------- engines

NAME = "acme/Tiny-Instruct@main"
SERVED = "tiny-instruct"
TEMPLATE = (
    "{python} -m tests.servers.fake_engine serve {path} --served-model-name {advertise_as} "
    "--port {port} --gpu-memory-utilization {fraction}"
)


def free_base(count: int = 8) -> int:
    """A port below the ephemeral range with ``count`` free ports from it."""
    for _ in range(200):
        base = random.randrange(30000, 32000)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def engine_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engines, Path]]:
    """An engine serving ``NAME`` as ``SERVED``, started by ``Engines`` (the product's way)."""
    tmp = tmp_path_factory.mktemp("engine-chat")
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    base = free_base()
    engines = Engines(tmp / "state" / "engines", base_port=base, env={"PYTHONPATH": str(ROOT)})
    spec = EngineSpec(
        key=f"vllm:{NAME}",
        kind="vllm",
        command=TEMPLATE,
        path=str(model),
        served_name=SERVED,
        fraction=0.5,
    )
    try:
        engines.start(spec)
        engines.wait_ready(spec.key, 30)
        yield engines, tmp
    finally:
        for found in engines.list():
            engines.stop(found.key, timeout=5)
        engines.close()


def hf_backend(engines: Engines, tmp: Path, url: str = "http://127.0.0.1:9") -> HfBackend:
    settings = HfSettings(cache_dir=str(tmp / "hub"), url=url)
    backend = HfBackend(BackendKind.VLLM, settings, engines=engines, stall_timeout=STALL)
    return backend


@pytest.fixture
def engine(engine_world: tuple[Engines, Path]) -> Iterator[tuple[HfBackend, EngineControl]]:
    engines, tmp = engine_world
    status = engines.status(f"vllm:{NAME}")
    assert status is not None and status.state == "ready"
    with EngineControl(status.url) as control:
        control.clear_faults()
        control.set_chat(token_delay=0, reply_tokens=0, finish_style="vllm")
        yield hf_backend(engines, tmp), control


def model(**kw: object) -> Served:
    return Served(NAME, SERVED, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("style", ["vllm", "openai"])
def test_engine_chat_streams_every_delta_and_the_finish(
    engine: tuple[HfBackend, EngineControl], style: str
) -> None:
    backend, control = engine
    control.set_chat(finish_style=style)
    ending = Ending()
    got = list(backend.chat(model(), request(max_tokens=3), ending, threading.Event()))
    # vLLM sends the last token in the chunk carrying finish_reason: it is not lost
    assert got == reply_tokens(list(MESSAGES))[:3]
    assert (ending.reason, ending.tokens) == ("length", 3)
    ending = Ending()
    got = list(backend.chat(model(), request(), ending, threading.Event()))
    assert got == reply_tokens(list(MESSAGES))
    assert (ending.reason, ending.tokens) == ("stop", len(got))


def test_engine_error_event_fails_the_chat_with_the_engines_message(
    engine: tuple[HfBackend, EngineControl],
) -> None:
    backend, control = engine
    control.chat_fault("error", after_tokens=2, times=1)
    ending = Ending()
    got, failure = run_until_failure(backend.chat(model(), request(), ending, threading.Event()))
    assert len(got) == 2 and ending.reason is None
    assert DEFAULT_ERROR in str(failure) and failure.model == NAME


def test_engine_cut_stream_fails_the_chat(engine: tuple[HfBackend, EngineControl]) -> None:
    backend, control = engine
    control.chat_fault("cut", after_tokens=3, times=1)
    got, failure = run_until_failure(backend.chat(model(), request(), Ending(), threading.Event()))
    assert len(got) == 3 and "cut off after 3 deltas" in str(failure)


def test_engine_stall_fails_the_chat_within_the_stall_window(
    engine: tuple[HfBackend, EngineControl],
) -> None:
    backend, control = engine
    control.chat_fault("stall", after_tokens=1, seconds=20, times=1)
    started = time.monotonic()
    got, failure = run_until_failure(backend.chat(model(), request(), Ending(), threading.Event()))
    took = time.monotonic() - started
    assert len(got) == 1 and "stalled" in str(failure)
    assert STALL <= took < STALL + 3


def test_engine_cancel_ends_a_chat_whose_read_waits(
    engine_world: tuple[Engines, Path], engine: tuple[HfBackend, EngineControl]
) -> None:
    engines, tmp = engine_world
    _, control = engine
    patient = HfBackend(
        BackendKind.VLLM,
        HfSettings(cache_dir=str(tmp / "hub")),
        engines=engines,
        stall_timeout=60.0,
    )
    control.chat_fault("stall", after_tokens=2, seconds=20, times=1)
    cancel, ending = threading.Event(), Ending()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    started = time.monotonic()
    got = list(patient.chat(model(), request(), ending, cancel))
    took = time.monotonic() - started
    timer.join()
    assert len(got) == 2 and ending.reason == "cancel" and took < 2.0


def test_engine_canary_answers_and_leaves_the_engine_running(
    engine_world: tuple[Engines, Path], engine: tuple[HfBackend, EngineControl]
) -> None:
    backend, _ = engine
    backend.canary(model())
    found = engine_world[0].status(f"vllm:{NAME}")
    assert found is not None and found.state == "ready"


def test_engine_not_running_is_a_clear_failure(
    engine_world: tuple[Engines, Path], tmp_path: Path
) -> None:
    engines, tmp = engine_world
    backend = hf_backend(engines, tmp)
    other = Served("acme/Other@main", "other")
    with pytest.raises(ChatFailed, match="vllm engine for acme/Other@main is not running"):
        list(backend.chat(other, request(), Ending(), threading.Event()))
    with pytest.raises(ChatFailed, match="is not running"):
        backend.canary(other)


def test_engine_that_died_is_named_not_running_with_its_state(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    engines = Engines(tmp_path / "engines", base_port=free_base(), env={"PYTHONPATH": str(ROOT)})
    spec = EngineSpec(
        key=f"vllm:{NAME}",
        kind="vllm",
        command=TEMPLATE,
        path=str(model_dir),
        served_name=SERVED,
        fraction=0.5,
    )
    try:
        engines.start(spec)
        ready = engines.wait_ready(spec.key, 30)
        assert ready.pid is not None
        os.kill(ready.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (found := engines.status(spec.key)) is not None and found.state != "exited":
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        backend = hf_backend(engines, tmp_path)
        with pytest.raises(ChatFailed, match=r"is not running \(exited, exit code 137\)"):
            list(backend.chat(model(), request(), Ending(), threading.Event()))
    finally:
        engines.stop(spec.key, timeout=5)
        engines.close()


def test_a_model_served_by_an_engine_infernet_did_not_start_chats_there(tmp_path: Path) -> None:
    with start_fake_engine(tmp_path, "outside-model") as outside:
        backend = open_hf(
            [BackendKind.SGLANG],
            HfSettings(cache_dir=str(tmp_path / "hub"), url=outside.url),
            AdapterContext(state_dir=tmp_path / "state", stall_timeout=STALL),
        )[BackendKind.SGLANG]
        served = Served("acme/Outside@main", "outside-model")
        ending = Ending()
        got = list(backend.chat(served, request(max_tokens=2), ending, threading.Event()))
        assert got == reply_tokens(list(MESSAGES))[:2] and ending.reason == "length"
        backend.canary(served)
        assert isinstance(backend, HfBackend)
        backend.close()
        backend.engines.close()  # the family's adapters share it; closing them leaves it open


def test_hf_backend_reads_the_stall_window_from_the_adapter_context(tmp_path: Path) -> None:
    adapters = open_hf(
        [BackendKind.VLLM],
        HfSettings(cache_dir=str(tmp_path / "hub")),
        AdapterContext(state_dir=tmp_path / "state", stall_timeout=7.0),
    )
    backend = adapters[BackendKind.VLLM]
    assert isinstance(backend, HfBackend) and backend.chats.stall == 7.0
    backend.engines.close()
