"""Chats through the real llama-server router on the tiny random-weight GGUF models.

Random weights produce garbage (byte tokens, U+FFFD, control characters), but the answer must
stream as OpenAI SSE and finish, which is what a job runner depends on. Needs the cached build
(``python -m tests.servers.llamabuild``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import llamabuild, sse
from tests.servers.llamacpp_harness import Router, start_router
from tests.servers.tinygguf import write_tiny_gguf

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    binary = llamabuild.build()
    tmp = tmp_path_factory.mktemp("llama-chat")
    models = tmp / "models"
    models.mkdir()
    write_tiny_gguf(models / "tiny-a.gguf", name="tiny-a")
    write_tiny_gguf(models / "tiny-b.gguf", name="tiny-b", hidden=128, ff=256, f16=True)
    with start_router(tmp / "router", models, binary=binary, models_max=2) as r:
        yield r


def chunks(events: list[Any]) -> list[dict[str, Any]]:
    return [e for e in events if isinstance(e, dict)]


def status(router: Router, model: str) -> str:
    entry = router.model(model)
    assert entry is not None
    return str(entry["status"]["value"])


def test_a_streamed_chat_autoloads_streams_and_finishes(router: Router) -> None:
    assert status(router, "tiny-b") == "unloaded"
    resp, events = router.chat_stream(
        "tiny-b",
        MESSAGES,
        max_tokens=6,
        temperature=0.7,
        ignore_eos=True,
        stream_options={"include_usage": True},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == sse.DONE
    frames = chunks(events)
    assert all(f["object"] == "chat.completion.chunk" and f["model"] == "tiny-b" for f in frames)
    assert len({f["id"] for f in frames}) == 1
    assert sse.finish_reasons(events) == ["length"]
    finish = next(f for f in frames if f["choices"] and f["choices"][0]["finish_reason"])
    assert finish["choices"][0]["delta"] == {}  # an empty delta finishes
    usage = frames[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    deltas = [f["choices"][0]["delta"].get("content") for f in frames if f["choices"]]
    assert any(deltas)  # some text, however random
    assert status(router, "tiny-b") == "loaded"


def test_max_tokens_bounds_a_chat_that_may_stop_early(router: Router) -> None:
    # Without ignore_eos a random model may sample its end token: "stop" then, never more.
    for _ in range(3):
        resp, events = router.chat_stream("tiny-a", MESSAGES, max_tokens=4)
        assert resp.status_code == 200 and events[-1] == sse.DONE
        assert sse.finish_reasons(events) in (["length"], ["stop"])
        content = [
            f["choices"][0]["delta"]["content"]
            for f in chunks(events)
            if f["choices"] and f["choices"][0]["delta"].get("content")
        ]
        assert len(content) <= 4


def test_without_streaming_one_answer_with_usage(router: Router) -> None:
    body = {"model": "tiny-a", "messages": MESSAGES, "max_tokens": 3, "ignore_eos": True}
    resp = router.request("POST", "/v1/chat/completions", json=body)
    answer = resp.json()
    assert resp.status_code == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3


def test_an_unknown_model_is_a_400_before_any_stream(router: Router) -> None:
    resp, events = router.chat_stream("nope", MESSAGES, max_tokens=2)
    assert (resp.status_code, events) == (400, [])
    assert resp.json()["error"]["message"] == "model 'nope' not found"
