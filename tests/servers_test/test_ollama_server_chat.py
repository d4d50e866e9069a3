"""``POST /api/chat`` with messages on the Ollama test server: NDJSON streaming, caps, faults."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import ollama
import pytest

from tests.servers.chatreply import reply_text, reply_tokens
from tests.servers.harness import OllamaServer
from tests.servers.ollama_chat import DEFAULT_ERROR
from tests.servers_test._support import pull_lines, wait_until

MODEL = "qwen2.5:0.5b"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Explain paged attention"},
]
FINAL_KEYS = [
    "model",
    "created_at",
    "message",
    "done_reason",
    "done",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
]


@pytest.fixture
def pulled(http: httpx.Client) -> httpx.Client:
    assert pull_lines(http, MODEL)[0] == 200
    return http


def chat_lines(
    http: httpx.Client, **body: Any
) -> tuple[int, str, list[dict[str, Any]], list[float]]:
    """Stream a chat to the end: (status, content type, decoded lines, arrival times)."""
    payload = {"model": MODEL, "messages": MESSAGES} | body
    lines, times = [], []
    with http.stream("POST", "/api/chat", json=payload) as resp:
        for line in resp.iter_lines():
            if line:
                lines.append(json.loads(line))
                times.append(time.monotonic())
    return resp.status_code, resp.headers.get("content-type", ""), lines, times


def ps(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in http.get("/api/ps").json()["models"]}


def test_a_chat_streams_one_token_per_line_then_a_done_line(pulled: httpx.Client) -> None:
    status, ctype, lines, _ = chat_lines(pulled)
    assert (status, ctype) == (200, "application/x-ndjson")
    *tokens, final = lines
    assert len(tokens) == len(reply_tokens(MESSAGES)) >= 5
    for line in tokens:
        assert list(line) == ["model", "created_at", "message", "done"]
        assert line["model"] == MODEL and line["done"] is False
        assert line["message"]["role"] == "assistant"
        datetime.fromisoformat(line["created_at"])
    text = "".join(line["message"]["content"] for line in tokens)
    assert text == reply_text(MESSAGES) == "You said: Explain paged attention That is all."
    assert list(final) == FINAL_KEYS
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["done"], final["done_reason"]) == (True, "stop")
    assert final["eval_count"] == len(tokens)
    assert final["total_duration"] >= final["load_duration"] > 0
    assert final["prompt_eval_count"] > 0 and final["eval_duration"] > 0


def test_without_streaming_one_object_carries_the_whole_answer(pulled: httpx.Client) -> None:
    resp = pulled.post("/api/chat", json={"model": MODEL, "messages": MESSAGES, "stream": False})
    body = resp.json()
    assert (resp.status_code, list(body)) == (200, FINAL_KEYS)
    assert body["message"] == {"role": "assistant", "content": reply_text(MESSAGES)}
    assert body["done_reason"] == "stop"


@pytest.mark.parametrize(("cap", "reason"), [(1, "length"), (3, "length"), (100, "stop")])
def test_num_predict_caps_the_answer(pulled: httpx.Client, cap: int, reason: str) -> None:
    _, _, lines, _ = chat_lines(pulled, options={"num_predict": cap, "temperature": 0.2})
    *tokens, final = lines
    assert "".join(t["message"]["content"] for t in tokens) == reply_text(MESSAGES, cap)
    assert (final["done_reason"], final["eval_count"]) == (reason, len(tokens))


def test_num_predict_of_zero_or_less_means_no_cap(pulled: httpx.Client) -> None:
    for cap in (0, -1, -2):
        _, _, lines, _ = chat_lines(pulled, options={"num_predict": cap})
        assert lines[-1]["done_reason"] == "stop"


def test_a_bad_option_type_is_a_500(pulled: httpx.Client) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "options": {"num_predict": "many"}}
    resp = pulled.post("/api/chat", json=body)
    assert (resp.status_code, resp.json()) == (
        500,
        {"error": 'option "num_predict" must be of type integer'},
    )


def test_keep_alive_and_num_ctx_load_the_model_like_any_request(pulled: httpx.Client) -> None:
    before = time.time()
    chat_lines(pulled, keep_alive="10m", options={"num_ctx": 2048})
    entry = ps(pulled)[MODEL]
    assert entry["context_length"] == 2048
    expires = datetime.fromisoformat(entry["expires_at"]).timestamp()
    assert before + 590 < expires < time.time() + 610
    chat_lines(pulled, keep_alive=-1, options={"num_ctx": 2048})
    assert datetime.fromisoformat(ps(pulled)[MODEL]["expires_at"]).year >= 2300
    chat_lines(pulled, keep_alive=0, options={"num_ctx": 2048})
    assert MODEL not in ps(pulled)


def test_unknown_and_embedding_only_models_are_refused(http: httpx.Client) -> None:
    pull_lines(http, "all-minilm")
    missing = http.post("/api/chat", json={"model": "ghost:7b", "messages": MESSAGES})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'ghost:7b' not found"})
    embed_only = http.post("/api/chat", json={"model": "all-minilm", "messages": MESSAGES})
    assert (embed_only.status_code, embed_only.json()) == (
        400,
        {"error": '"all-minilm" does not support chat'},
    )


def test_an_embedding_model_answers_one_embedding(http: httpx.Client) -> None:
    pull_lines(http, "all-minilm")
    resp = http.post("/api/embed", json={"model": "all-minilm", "input": "canary"})
    body = resp.json()
    assert resp.status_code == 200 and body["model"] == "all-minilm"
    assert [len(v) for v in body["embeddings"]] == [384]
    assert "all-minilm:latest" in ps(http)


def test_the_official_client_streams_a_chat(pulled: httpx.Client, client: ollama.Client) -> None:
    parts = list(client.chat(MODEL, messages=MESSAGES, stream=True, options={"num_predict": 4}))
    assert "".join(p.message.content or "" for p in parts) == reply_text(MESSAGES, 4)
    assert parts[-1].done and parts[-1].done_reason == "length"


# faults ----------------------------------------------------------------------------------------


def test_a_mid_stream_error_line_ends_the_stream(
    server: OllamaServer, pulled: httpx.Client
) -> None:
    server.chat_fault(MODEL, "chat_error", after_tokens=2, message="runner crashed")
    status, _, lines, _ = chat_lines(pulled)
    assert status == 200
    assert [line["message"]["content"] for line in lines[:2]] == reply_tokens(MESSAGES)[:2]
    assert lines[2:] == [{"error": "runner crashed"}]  # no done line


def test_the_official_client_raises_on_a_mid_stream_error(
    server: OllamaServer, pulled: httpx.Client, client: ollama.Client
) -> None:
    server.chat_fault(MODEL, "chat_error", after_tokens=1)
    with pytest.raises(ollama.ResponseError) as caught:
        list(client.chat(MODEL, messages=MESSAGES, stream=True))
    assert caught.value.status_code == -1
    assert "llama runner process has terminated" in caught.value.error


def test_an_error_before_the_first_token_is_a_500(
    server: OllamaServer, pulled: httpx.Client
) -> None:
    server.chat_fault(MODEL, "chat_error", after_tokens=0)
    status, _, lines, _ = chat_lines(pulled)
    assert (status, lines) == (500, [{"error": DEFAULT_ERROR}])
    server.chat_fault(MODEL, "chat_error", after_tokens=3)
    resp = pulled.post("/api/chat", json={"model": MODEL, "messages": MESSAGES, "stream": False})
    assert resp.status_code == 500


def test_a_cut_stream_has_no_done_line(server: OllamaServer, pulled: httpx.Client) -> None:
    server.chat_fault(MODEL, "chat_cut", after_tokens=2)
    lines: list[dict[str, Any]] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        pulled.stream("POST", "/api/chat", json={"model": MODEL, "messages": MESSAGES}) as resp,
    ):
        lines.extend(json.loads(line) for line in resp.iter_lines() if line)
    assert resp.status_code == 200 and len(lines) == 2
    assert not any(line.get("done") for line in lines)


def test_a_cut_after_every_token_loses_only_the_done_line(
    server: OllamaServer, pulled: httpx.Client
) -> None:
    server.chat_fault("*", "chat_cut", after_tokens=1000)
    with pytest.raises(httpx.RemoteProtocolError):
        chat_lines(pulled)


def test_a_stall_sends_nothing_for_a_while_then_goes_on(
    server: OllamaServer, pulled: httpx.Client
) -> None:
    server.chat_fault(MODEL, "chat_stall", after_tokens=1, seconds=0.6, times=1)
    _, _, lines, times = chat_lines(pulled)
    assert times[1] - times[0] >= 0.55
    assert lines[-1]["done"] is True
    _, _, _, again = chat_lines(pulled)  # times=1: used up
    assert again[-1] - again[0] < 0.5


def test_faults_are_per_model_until_cleared(server: OllamaServer, pulled: httpx.Client) -> None:
    pull_lines(pulled, "smollm2:135m")
    server.chat_fault(MODEL, "chat_error", after_tokens=1)
    assert chat_lines(pulled)[2][-1] == {
        "error": "llama runner process has terminated: exit status 2"
    }
    assert chat_lines(pulled)[2][-1].get("error")  # no times: until cleared
    assert chat_lines(pulled, model="smollm2:135m")[2][-1]["done"] is True
    server.clear_faults()
    assert chat_lines(pulled)[2][-1]["done"] is True


# pacing, queueing --------------------------------------------------------------------------------


def test_token_delay_and_reply_length(server: OllamaServer, pulled: httpx.Client) -> None:
    server.set_chat(token_delay=0.05, reply_tokens=12)
    start = time.monotonic()
    _, _, lines, _ = chat_lines(pulled)
    assert time.monotonic() - start >= 12 * 0.05
    assert len(lines) == 13 and "".join(line["message"]["content"] for line in lines) == reply_text(
        MESSAGES, length=12
    )
    server.reset_chat()
    assert len(chat_lines(pulled)[2]) == len(reply_tokens(MESSAGES)) + 1


def test_one_parallel_slot_queues_the_second_chat(
    server: OllamaServer, pulled: httpx.Client
) -> None:
    server.set_chat(token_delay=0.1, model=MODEL)
    done: dict[str, tuple[datetime, datetime]] = {}

    def run(tag: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
            _, _, lines, _ = chat_lines(http)
            stamps = [datetime.fromisoformat(line["created_at"]) for line in lines]
            done[tag] = (stamps[0], stamps[-1])

    first = threading.Thread(target=run, args=("first",))
    first.start()
    wait_until(lambda: MODEL in ps(pulled))  # loaded, and held while it generates
    run("second")
    first.join()
    # on the server's own clock the two answers never overlap: one waited for the other
    (s1, e1), (s2, e2) = done["first"], done["second"]
    assert s2 >= e1 or s1 >= e2


def test_a_client_that_hangs_up_frees_the_slot(server: OllamaServer, pulled: httpx.Client) -> None:
    server.set_chat(token_delay=0.1)
    with pulled.stream("POST", "/api/chat", json={"model": MODEL, "messages": MESSAGES}) as resp:
        next(resp.iter_lines())
    server.set_chat(token_delay=0)
    start = time.monotonic()
    assert chat_lines(pulled)[2][-1]["done"] is True
    assert time.monotonic() - start < 1.0
