"""The fake engine's ``/v1/chat/completions``: vLLM's SSE chunks, ``max_tokens``, faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import sse
from tests.servers.chatreply import reply_text, reply_tokens
from tests.servers.engine_harness import FakeEngine, start_fake_engine

NAME = "tiny-instruct"
MESSAGES = [{"role": "user", "content": "count to three"}]
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeEngine]:
    with start_fake_engine(tmp_path_factory.mktemp("engine"), NAME, max_model_len=64) as eng:
        yield eng


@pytest.fixture
def http(engine: FakeEngine) -> Iterator[httpx.Client]:
    engine.clear_faults()
    engine.set_chat(token_delay=0, reply_tokens=0, finish_style="vllm")
    with httpx.Client(base_url=engine.url, timeout=30.0, trust_env=False) as client:
        yield client


def body(**extra: Any) -> dict[str, Any]:
    return {"model": NAME, "messages": MESSAGES, "stream": True} | extra


def test_a_streamed_chat_is_vllm_sse(http: httpx.Client) -> None:
    resp, events = sse.stream_chat(http, URL, body())
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert events[-1] == sse.DONE
    chunks = events[:-1]
    assert len(chunks) == 1 + len(reply_tokens(MESSAGES))  # role chunk, then one per token
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith(
        "chatcmpl-"
    )
    for chunk in chunks:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert (chunk["object"], chunk["model"]) == ("chat.completion.chunk", NAME)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"]["content"] == " all."
    assert sse.content(events) == reply_text(MESSAGES)


def test_raw_frames_are_data_lines_and_blank_lines(http: httpx.Client) -> None:
    with http.stream("POST", URL, json=body(max_tokens=1)) as resp:
        raw = resp.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: {") for f in frames[:-2])


def test_openai_style_finishes_on_an_empty_delta(engine: FakeEngine, http: httpx.Client) -> None:
    engine.set_chat(finish_style="openai")
    _, events = sse.stream_chat(http, URL, body(max_tokens=2))
    final = events[-2]["choices"][0]
    assert (final["delta"], final["finish_reason"]) == ({}, "length")
    assert sse.content(events) == reply_text(MESSAGES, 2)


@pytest.mark.parametrize(("cap", "reason"), [(1, "length"), (4, "length"), (50, "stop")])
def test_max_tokens_caps_the_answer(http: httpx.Client, cap: int, reason: str) -> None:
    _, events = sse.stream_chat(http, URL, body(max_tokens=cap))
    assert sse.content(events) == reply_text(MESSAGES, cap)
    assert sse.finish_reasons(events) == [reason]
    _, events = sse.stream_chat(http, URL, body(max_completion_tokens=cap))
    assert sse.finish_reasons(events) == [reason]


def test_usage_chunk_when_asked(http: httpx.Client) -> None:
    _, events = sse.stream_chat(
        http, URL, body(max_tokens=3, stream_options={"include_usage": True})
    )
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_without_streaming_one_answer_with_usage(http: httpx.Client) -> None:
    resp = http.post(URL, json=body(stream=False, max_tokens=3, temperature=None))
    answer = resp.json()
    assert resp.status_code == 200 and answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": reply_text(MESSAGES, 3)}
    assert choice["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + 3


@pytest.mark.parametrize(
    ("extra", "status", "fragment"),
    [
        ({"model": "other"}, 404, "The model `other` does not exist."),
        ({"messages": []}, 400, "messages"),
        ({"max_tokens": "8"}, 400, "valid integer"),
        ({"max_tokens": 0}, 400, "at least 1"),
        ({"max_tokens": 60}, 400, "maximum context length is 64 tokens"),
    ],
)
def test_bad_requests(
    http: httpx.Client, extra: dict[str, Any], status: int, fragment: str
) -> None:
    resp = http.post(URL, json=body(**extra))
    assert resp.status_code == status
    assert fragment in resp.json()["error"]["message"]


# faults and pacing -----------------------------------------------------------------------------


def test_an_error_chunk_then_done(engine: FakeEngine, http: httpx.Client) -> None:
    engine.chat_fault("error", after_tokens=2, message="engine died")
    _, events = sse.stream_chat(http, URL, body())
    assert sse.content(events) == reply_text(MESSAGES, 2)
    error = {"message": "engine died", "type": "InternalServerError", "param": None, "code": 500}
    assert events[-2] == {"error": error}
    assert events[-1] == sse.DONE and sse.finish_reasons(events) == []
    resp = http.post(URL, json=body(stream=False))
    assert resp.status_code == 500 and resp.json()["error"]["message"] == "engine died"


def test_a_cut_stream_has_no_finish_and_no_done(engine: FakeEngine, http: httpx.Client) -> None:
    engine.chat_fault("cut", after_tokens=2, times=1)
    payloads: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError), http.stream("POST", URL, json=body()) as resp:
        for line in resp.iter_lines():
            payloads.extend(sse.data_payloads([line]))
    events = sse.decode(payloads)
    assert sse.content(events) == reply_text(MESSAGES, 2)
    assert sse.DONE not in events and sse.finish_reasons(events) == []
    assert sse.stream_chat(http, URL, body())[1][-1] == sse.DONE  # times=1: used up


def test_a_stall_then_the_rest(engine: FakeEngine, http: httpx.Client) -> None:
    engine.chat_fault("stall", after_tokens=1, seconds=0.5)
    start = time.monotonic()
    _, events = sse.stream_chat(http, URL, body())
    assert time.monotonic() - start >= 0.5
    assert sse.content(events) == reply_text(MESSAGES)


def test_token_delay_and_reply_length(engine: FakeEngine, http: httpx.Client) -> None:
    engine.set_chat(token_delay=0.03, reply_tokens=20)
    start = time.monotonic()
    _, events = sse.stream_chat(http, URL, body())
    assert time.monotonic() - start >= 20 * 0.03
    assert sse.content(events) == reply_text(MESSAGES, length=20)


def test_environment_sets_the_start_up_fault(tmp_path: Path) -> None:
    env = {"FAKE_ENGINE_CHAT_FAULT": "error:1", "FAKE_ENGINE_FINISH_STYLE": "openai"}
    with (
        start_fake_engine(tmp_path, NAME, env=env) as eng,
        httpx.Client(base_url=eng.url, trust_env=False) as http,
    ):
        for _ in range(2):  # every chat, not once
            _, events = sse.stream_chat(http, URL, body())
            assert "error" in events[-2] and sse.content(events) == "You"
        eng.clear_faults()
        _, events = sse.stream_chat(http, URL, body(max_tokens=1))
        assert events[-2]["choices"][0]["delta"] == {}  # the openai finish style
