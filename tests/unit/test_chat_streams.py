"""The chat streams' pure parts: Server-Sent Events, OpenAI chunks as llama-server and vLLM send
them (recorded), the error texts kept, the Ollama request options, and hanging up on cancel."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.backends.chat import (
    Hangup,
    openai_body,
    openai_deltas,
    peer_message,
    pinned,
    sse_data,
)
from reconciler.backends.ollama.chat import options
from reconciler.errors import ChatFailed
from reconciler.limits import PEER_TEXT
from reconciler.model import FOREVER

WHO = "tiny-a.gguf on llama-server at http://127.0.0.1:8080"


def events(*chunks: object) -> list[str]:
    """Server-Sent Events as the backends write them: ``data: <compact JSON>`` and a blank line."""
    lines = []
    for chunk in chunks:
        data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
        lines += [f"data: {data}", ""]
    return lines


def llama_chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
    frame = {"choices": choices, "created": 1, "id": "chatcmpl-g", "model": "tiny-a"}
    return frame | {"system_fingerprint": "b43-4ed30a2", "object": "chat.completion.chunk"} | extra


def vllm_chunk(choices: list[Any], **extra: Any) -> dict[str, Any]:
    frame = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
    return frame | {"model": "tiny-instruct", "choices": choices} | extra


# llama-server b43, recorded (ids and times shortened): a role chunk with content null, text,
# finish_reason on an extra chunk with an empty delta, usage with timings, [DONE].
LLAMA_SERVER = events(
    llama_chunk(
        [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}]
    ),
    llama_chunk([{"finish_reason": None, "index": 0, "delta": {"content": "\ufffd"}}]),
    llama_chunk([{"finish_reason": None, "index": 0, "delta": {"content": "F"}}]),
    llama_chunk([{"finish_reason": "length", "index": 0, "delta": {}}]),
    llama_chunk(
        [],
        usage={
            "completion_tokens": 3,
            "prompt_tokens": 56,
            "total_tokens": 59,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
        timings={
            "cache_n": 0,
            "prompt_n": 56,
            "prompt_ms": 3.815,
            "predicted_n": 3,
            "predicted_ms": 1.39,
            "predicted_per_second": 719.42,
        },
    ),
    "[DONE]",
)

# vLLM: a role chunk with content "", the last token in the chunk that carries finish_reason.
VLLM = events(
    vllm_chunk(
        [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
    ),
    vllm_chunk(
        [{"index": 0, "delta": {"content": "You"}, "logprobs": None, "finish_reason": None}]
    ),
    vllm_chunk(
        [
            {
                "index": 0,
                "delta": {"content": " said:"},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ]
    ),
    vllm_chunk([], usage={"prompt_tokens": 12, "total_tokens": 14, "completion_tokens": 2}),
    "[DONE]",
)

ENGINE_FAILED = "EngineCore encountered an issue. See stack trace (above) for the root cause."
VLLM_ERROR = [
    *VLLM[2:4],
    *events(
        {
            "error": {
                "message": ENGINE_FAILED,
                "type": "InternalServerError",
                "param": None,
                "code": 500,
            }
        },
        "[DONE]",
    ),
]


def read(lines: list[str]) -> tuple[list[str], Ending]:
    ending = Ending()
    return list(openai_deltas(sse_data(lines), ending, who=WHO)), ending


def read_until_failure(lines: list[str]) -> tuple[list[str], ChatFailed, Ending]:
    ending, got = Ending(), []
    with pytest.raises(ChatFailed) as failed:
        for delta in openai_deltas(sse_data(lines), ending, who=WHO):
            got.append(delta)
    return got, failed.value, ending


def test_llama_server_stream_gives_its_text_finish_tokens_and_time() -> None:
    got, ending = read(LLAMA_SERVER)
    assert got == ["\ufffd", "F"]  # the role chunk's null content is no delta
    assert (ending.reason, ending.tokens, ending.seconds) == ("length", 3, 0.00139)


def test_llama_server_stream_without_its_role_chunk_is_read_the_same() -> None:
    got, ending = read(LLAMA_SERVER[2:])  # the request that autoloaded the model has none
    assert got == ["\ufffd", "F"] and ending.reason == "length"


def test_vllm_last_token_comes_with_the_finish_reason_and_is_kept() -> None:
    got, ending = read(VLLM)
    assert got == ["You", " said:"]
    assert (ending.reason, ending.tokens, ending.seconds) == ("length", 2, None)


def test_an_error_chunk_fails_the_chat_after_the_deltas_before_it() -> None:
    got, failure, ending = read_until_failure(VLLM_ERROR)
    assert got == ["You"]
    assert str(failure) == f"{WHO} failed after 1 deltas: {ENGINE_FAILED}"
    assert ending.reason is None  # the [DONE] after it does not make it a success


def test_an_error_object_in_the_old_vllm_shape_fails_the_chat() -> None:
    old = {"object": "error", "message": "The model `x` does not exist.", "code": 404}
    _, failure, _ = read_until_failure(events(old))
    assert "The model `x` does not exist." in str(failure)


def test_a_stream_that_is_only_done_ends_well_and_empty() -> None:
    got, ending = read(events("[DONE]"))
    assert got == [] and ending.reason == "stop"


def test_a_finish_reason_without_done_ends_well() -> None:
    got, ending = read(VLLM[:6])
    assert got == ["You", " said:"] and ending.reason == "length"


@pytest.mark.parametrize("cut", [1, 3, 4])
def test_a_stream_cut_before_finish_and_done_is_a_failure(cut: int) -> None:
    got, failure, ending = read_until_failure(VLLM[:cut])
    assert "cut off after" in str(failure) and ending.reason is None
    assert len(got) <= 1


def test_an_event_cut_in_the_middle_of_its_json_is_a_failure() -> None:
    _, failure, _ = read_until_failure([VLLM[0], "", VLLM[2][:40]])
    assert "not JSON" in str(failure)


def test_an_event_that_is_not_an_object_is_a_failure() -> None:
    _, failure, _ = read_until_failure(["data: [1, 2]", ""])
    assert "not a JSON object" in str(failure)


def test_sse_framing_comments_other_fields_bare_data_and_multi_line_data() -> None:
    lines = [
        ": keep-alive",
        "event: message",
        "id: 7",
        'data:{"a":',
        "data: 1}",
        "",
        "",
        "data",
        "",
        "retry: 10",
        "data: [DONE]",
    ]
    assert list(sse_data(lines)) == ['{"a":\n1}', "", "[DONE]"]


def test_the_backends_error_text_is_kept_on_one_short_line() -> None:
    long = "line one\nline two " + "x" * 500
    text = peer_message({"error": {"message": long, "code": 500}})
    assert "\n" not in text and len(text) == PEER_TEXT and text.startswith("line one line two")
    assert peer_message({"error": "model 'nope' not found"}) == "model 'nope' not found"
    assert peer_message({"detail": "Not Found"}) == "Not Found"
    assert peer_message({"message": "busy"}) == "busy"
    assert peer_message(["no"], "Bad Request") == "Bad Request"
    line = "data: " + json.dumps({"error": {"message": long}})
    _, failure, _ = read_until_failure([line, ""])
    assert "\n" not in str(failure) and len(str(failure)) < len(WHO) + PEER_TEXT + 40


def test_openai_body_sends_limits_only_when_set_and_asks_for_usage() -> None:
    messages = ({"role": "user", "content": "hi"},)
    assert openai_body("tiny-a", ChatRequest(messages)) == {
        "model": "tiny-a",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body = openai_body("m", ChatRequest(messages, max_tokens=5, temperature=0.0))
    assert (body["max_tokens"], body["temperature"]) == (5, 0.0)


def test_ollama_options_carry_context_max_tokens_and_temperature_when_set() -> None:
    messages = ({"role": "user", "content": "hi"},)
    assert options(Served("m", "m"), ChatRequest(messages)) is None
    served = Served("m", "m", keep_alive=FOREVER, context=8192)
    assert options(served, ChatRequest(messages, max_tokens=0, temperature=0.0)) == {
        "num_ctx": 8192,
        "num_predict": 0,
        "temperature": 0.0,
    }


def test_pinned_means_a_negative_keep_alive() -> None:
    assert pinned(Served("m", "m", keep_alive=FOREVER))
    assert not pinned(Served("m", "m", keep_alive=0.0))
    assert not pinned(Served("m", "m", keep_alive=300.0))
    assert not pinned(Served("m", "m"))


class _Stream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, info: str) -> Any:
        return self.sock if info == "socket" else None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _blocked_read(sock: socket.socket) -> tuple[threading.Thread, dict[str, Any]]:
    seen: dict[str, Any] = {}

    def read() -> None:
        seen["data"] = sock.recv(100)
        seen["at"] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, seen


def test_hangup_wakes_a_read_that_waits_once_cancel_is_set(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _peer = pair
    cancel = threading.Event()
    hangup = Hangup(cancel)
    hangup.trace("connection.connect_tcp.complete", {"return_value": _Stream(ours)})
    with hangup:
        reader, seen = _blocked_read(ours)
        time.sleep(0.2)
        assert reader.is_alive()  # the read waits: nothing came
        cancelled = time.monotonic()
        cancel.set()
        reader.join(2.0)
    assert seen["data"] == b"" and seen["at"] - cancelled < 0.5


def test_hangup_shuts_a_connection_made_after_cancel(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _peer = pair
    cancel = threading.Event()
    hangup = Hangup(cancel)
    with hangup:
        cancel.set()
        time.sleep(0.2)  # the watcher has seen it
        hangup.trace("connection.connect_tcp.complete", {"return_value": _Stream(ours)})
        assert ours.recv(100) == b""


def test_hangup_leaves_the_connection_alone_when_the_chat_ends_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, peer = pair
    cancel = threading.Event()
    with Hangup(cancel) as hangup:
        hangup.trace("connection.connect_tcp.complete", {"return_value": _Stream(ours)})
        hangup.trace("http11.send_request_headers.started", {"request": None})  # ignored
    time.sleep(0.2)  # the watcher has gone
    cancel.set()
    time.sleep(0.2)
    peer.sendall(b"still open")
    assert ours.recv(100) == b"still open"
