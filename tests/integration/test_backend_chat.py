"""Every backend serves chats and proves a model answers (``Backend.chat``, ``Backend.canary``).

Real processes over loopback: the Ollama test server streaming ``/api/chat`` (with its chat
faults), the real llama-server router on tiny random-weight GGUF models, and the engine
stand-in started through ``Engines`` as vLLM would be. What is checked: the deltas and the
ending, ``max_tokens``, what reaches the backend (keep_alive, num_ctx), that an error line, a
cut stream and a stall are failures (never a quiet end), that cancel ends a chat at once even
while a read waits, and the canaries (loaded afterwards only when pinned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from reconciler.backends.base import AdapterContext, ChatRequest, Ending, Served
from reconciler.backends.ollama.backend import OllamaBackend, open_backends
from reconciler.backends.ollama.settings import OllamaSettings
from reconciler.errors import ChatFailed
from reconciler.model import FOREVER, BackendKind
from tests.servers.chatreply import reply_tokens
from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server
from tests.servers.ollama_chat import DEFAULT_ERROR

pytestmark = pytest.mark.integration

MODEL = "qwen2.5:0.5b"
EMBEDDER = "all-minilm:latest"
MESSAGES = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain KV"})
STALL = 1.5  # the adapters' stall window in these tests (INFERNET_PULL_STALL_TIMEOUT)


def request(**kw: Any) -> ChatRequest:
    return ChatRequest(messages=MESSAGES, **kw)


def collect(deltas: Iterator[str]) -> list[str]:
    return list(deltas)


def run_until_failure(deltas: Iterator[str]) -> tuple[list[str], ChatFailed]:
    """The deltas received before the chat failed, and the failure (it must fail)."""
    got: list[str] = []
    with pytest.raises(ChatFailed) as failed:
        for delta in deltas:
            got.append(delta)
    return got, failed.value


def cancel_after(cancel: threading.Event, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, cancel.set)
    timer.start()
    return timer


# --------------------------------------------------------------------------- Ollama


@pytest.fixture(scope="module")
def ollama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OllamaServer]:
    tmp = tmp_path_factory.mktemp("ollama-chat")
    with start_ollama_server(tmp, DEFAULT_CATALOGUE) as server:
        with ollama.Client(server.url, trust_env=False) as client:
            for name in (MODEL, EMBEDDER):
                client.pull(name)
        yield server


@pytest.fixture
def ollama_backend(ollama_server: OllamaServer) -> Iterator[OllamaBackend]:
    ollama_server.clear_faults()
    ollama_server.reset_chat()
    settings = OllamaSettings(url=ollama_server.url, registry=ollama_server.registry_url)
    adapters = open_backends([BackendKind.OLLAMA], settings, AdapterContext(stall_timeout=STALL))
    backend = adapters[BackendKind.OLLAMA]
    assert isinstance(backend, OllamaBackend)
    try:
        yield backend
    finally:
        for name in (MODEL, EMBEDDER):  # unload whatever a test left loaded
            backend.load(name, keep_alive=0, embedding=name == EMBEDDER, context=None)
        backend.close()
        ollama_server.reset_requests()


def ps(server: OllamaServer) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(f"{server.url}/api/ps").json()["models"]}


def chats_sent(server: OllamaServer) -> list[dict[str, Any]]:
    return [r["body"] for r in server.requests() if r["path"] == "/api/chat"]


def test_ollama_chat_streams_the_deltas_and_fills_the_ending(ollama_backend: OllamaBackend) -> None:
    ending = Ending()
    got = collect(ollama_backend.chat(Served(MODEL, MODEL), request(), ending, threading.Event()))
    assert got == reply_tokens(list(MESSAGES))
    assert ending.reason == "stop"
    assert ending.tokens == len(got)
    assert ending.seconds is not None and ending.seconds > 0


def test_ollama_chat_sends_keep_alive_context_max_tokens_and_temperature(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    served = Served(MODEL, MODEL, keep_alive=600.0, context=4096)
    ending = Ending()
    got = collect(
        ollama_backend.chat(
            served, request(max_tokens=3, temperature=0.2), ending, threading.Event()
        )
    )
    assert got == reply_tokens(list(MESSAGES))[:3]
    assert (ending.reason, ending.tokens) == ("length", 3)
    (body,) = chats_sent(ollama_server)
    assert body["keep_alive"] == 600
    assert body["options"] == {"num_ctx": 4096, "num_predict": 3, "temperature": 0.2}
    assert body["stream"] is True
    loaded = ps(ollama_server)[MODEL]
    assert loaded["context_length"] == 4096
    assert 500 < time_left(loaded["expires_at"]) <= 600  # the model's own keep_alive holds


def time_left(expires_at: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(expires_at).timestamp() - time.time()


def test_ollama_chat_without_keep_alive_or_limits_sends_none(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    collect(ollama_backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event()))
    (body,) = chats_sent(ollama_server)
    assert "keep_alive" not in body and "options" not in body  # Ollama's defaults apply


def test_ollama_error_line_mid_stream_fails_the_chat_with_ollamas_message(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_error", after_tokens=2, times=1)
    ending = Ending()
    got, failure = run_until_failure(
        ollama_backend.chat(Served(MODEL, MODEL), request(), ending, threading.Event())
    )
    assert got == reply_tokens(list(MESSAGES))[:2]
    assert DEFAULT_ERROR in str(failure) and "after 2 deltas" in str(failure)
    assert "\n" not in str(failure)
    cause = failure.__cause__
    assert isinstance(cause, ollama.ResponseError) and cause.status_code == -1  # the client's
    assert ending.reason is None  # never an (empty) done


def test_ollama_error_before_the_first_token_fails_the_chat(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_error", after_tokens=0, times=1, message="out of memory")
    got, failure = run_until_failure(
        ollama_backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event())
    )
    assert got == []
    assert "HTTP 500" in str(failure) and "out of memory" in str(failure)


def test_ollama_cut_stream_fails_the_chat(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_cut", after_tokens=3, times=1)
    got, failure = run_until_failure(
        ollama_backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event())
    )
    assert len(got) == 3
    assert "cut off after 3 deltas" in str(failure)


def test_ollama_stall_fails_the_chat_within_the_stall_window(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_stall", after_tokens=2, seconds=30, times=1)
    started = time.monotonic()
    got, failure = run_until_failure(
        ollama_backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event())
    )
    took = time.monotonic() - started
    assert len(got) == 2
    assert "stalled" in str(failure) and f"{STALL:g}s" in str(failure)
    assert STALL <= took < STALL + 3


def test_ollama_cancel_ends_the_chat_between_tokens(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.set_chat(token_delay=0.05, reply_tokens=200, model=MODEL)
    cancel, ending = threading.Event(), Ending()
    got: list[str] = []
    for delta in ollama_backend.chat(Served(MODEL, MODEL), request(), ending, cancel):
        got.append(delta)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3 and ending.reason == "cancel"


def test_ollama_cancel_ends_a_chat_whose_read_waits_and_frees_the_backend(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    # The backend stalls for 30 s (the stall window is longer): only hanging up ends the wait.
    slow = OllamaSettings(url=ollama_server.url, registry=ollama_server.registry_url)
    backend = OllamaBackend(slow, stall_timeout=60.0)
    ollama_server.chat_fault(MODEL, "chat_stall", after_tokens=2, seconds=30, times=1)
    cancel, ending = threading.Event(), Ending()
    got: list[str] = []
    try:
        timer = cancel_after(cancel, 0.5)
        started = time.monotonic()
        for delta in backend.chat(Served(MODEL, MODEL), request(), ending, cancel):
            got.append(delta)
        took = time.monotonic() - started
        timer.join()
    finally:
        backend.close()
    assert len(got) == 2 and ending.reason == "cancel"
    assert took < 2.0
    # The server saw the client go and freed its only slot: the next chat answers at once.
    started = time.monotonic()
    collect(ollama_backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event()))
    assert time.monotonic() - started < 2.0


def test_ollama_cancel_before_the_answer_starts(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_stall", after_tokens=0, seconds=30, times=1)
    backend = OllamaBackend(
        OllamaSettings(url=ollama_server.url, registry=ollama_server.registry_url),
        stall_timeout=60.0,
    )
    cancel, ending = threading.Event(), Ending()
    try:
        timer = cancel_after(cancel, 0.3)
        started = time.monotonic()
        got = collect(backend.chat(Served(MODEL, MODEL), request(), ending, cancel))
        took = time.monotonic() - started
        timer.join()
    finally:
        backend.close()
    assert got == [] and ending.reason == "cancel" and took < 1.5


def test_ollama_canary_leaves_an_unpinned_model_unloaded_and_a_pinned_one_loaded(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_backend.canary(Served(MODEL, MODEL))
    (body,) = chats_sent(ollama_server)
    assert body["keep_alive"] == 0 and body["options"] == {"num_predict": 1}
    assert MODEL not in ps(ollama_server)
    ollama_backend.canary(Served(MODEL, MODEL, keep_alive=FOREVER, context=2048))
    loaded = ps(ollama_server)[MODEL]
    assert loaded["context_length"] == 2048 and time_left(loaded["expires_at"]) > 10**8


def test_ollama_canary_of_a_missing_model_says_ollama_has_none(
    ollama_backend: OllamaBackend,
) -> None:
    with pytest.raises(ChatFailed, match=r"Ollama has no model .llama3\.2:1b.*not found"):
        ollama_backend.canary(Served("llama3.2:1b", "llama3.2:1b"))


def test_ollama_canary_fails_on_an_error_inside_its_answer(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    ollama_server.chat_fault(MODEL, "chat_cut", after_tokens=0, times=1)
    with pytest.raises(ChatFailed, match="cut off"):
        ollama_backend.canary(Served(MODEL, MODEL))


def test_ollama_embedding_canary_embeds_once_and_chat_is_refused_without_asking(
    ollama_backend: OllamaBackend, ollama_server: OllamaServer
) -> None:
    embedder = Served(EMBEDDER, EMBEDDER, embedding=True)
    ollama_backend.canary(embedder)
    embeds = [r["body"] for r in ollama_server.requests() if r["path"] == "/api/embed"]
    assert embeds == [{"model": EMBEDDER, "input": "hi", "keep_alive": 0}]
    assert EMBEDDER not in ps(ollama_server)
    ollama_server.reset_requests()
    with pytest.raises(ChatFailed, match="is an embedding model; it does not chat"):
        collect(ollama_backend.chat(embedder, request(), Ending(), threading.Event()))
    assert ollama_server.requests() == []


def test_ollama_chat_with_ollama_down_is_a_retryable_failure(tmp_path: Path) -> None:
    backend = OllamaBackend(OllamaSettings(url="http://127.0.0.1:9"), stall_timeout=STALL)
    try:
        with pytest.raises(ChatFailed, match="can't reach Ollama") as failed:
            collect(backend.chat(Served(MODEL, MODEL), request(), Ending(), threading.Event()))
    finally:
        backend.close()
    assert failed.value.retryable
