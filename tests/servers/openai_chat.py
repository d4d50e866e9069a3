"""``POST /v1/chat/completions`` the way vLLM answers it, for the fake engine.

The answer is :mod:`tests.servers.chatreply`'s (the last user message echoed). With
``stream: true`` it is Server-Sent Events over a chunked response, each event
``data: <json>`` and a blank line:

- ``{"id","object":"chat.completion.chunk","created","model","choices":[{"index":0,
  "delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}``;
- one chunk per token, ``"delta":{"content":<token>}``; vLLM puts ``finish_reason``
  (``stop``, or ``length`` when ``max_tokens`` cut the answer) on the chunk of the *last*
  token (``finish_style: "vllm"``, the default); ``"openai"`` (also llama-server's way) sends
  it on an extra chunk with ``"delta":{}``;
- with ``stream_options.include_usage`` a chunk with ``"choices":[]`` and ``usage``;
- ``data: [DONE]``.

Without streaming, one ``chat.completion`` object with the whole message and ``usage``.
``max_tokens`` (or ``max_completion_tokens``) over the context gives vLLM's 400.

Controls (:class:`Controls`; environment at start, ``/_test/…`` routes later): ``token_delay``
seconds before each token, ``reply_tokens`` an exact answer length, ``finish_style``, and one
fault for the next ``times`` chats (until cleared when None), acting after ``after_tokens``
tokens (past the end: just before the finish):

- ``error``: a ``data: {"error": {...}}`` event, then ``data: [DONE]`` (HTTP 200 already
  sent); without streaming a 500 with the same error object;
- ``cut``: the connection closes: no finish, no ``[DONE]``;
- ``stall``: nothing for ``seconds``, then the rest.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.servers import chatreply

FAULT_KINDS = ("error", "cut", "stall")
FINISH_STYLES = ("vllm", "openai")
DEFAULT_ERROR = "EngineCore encountered an issue. See stack trace (above) for the root cause."


@dataclass
class Fault:
    kind: str
    after_tokens: int = 0
    seconds: float = 5.0
    message: str = DEFAULT_ERROR
    times: int | None = None


def _env_float(name: str) -> float:
    try:
        return float(os.environ.get(name, "") or 0)
    except ValueError:
        return 0.0


def parse_fault(text: str) -> Fault | None:
    """``FAKE_ENGINE_CHAT_FAULT``: ``error:K``, ``cut:K`` or ``stall:K:SECONDS`` (every chat)."""
    parts = text.split(":") if text else []
    if not parts or parts[0] not in FAULT_KINDS:
        return None
    after = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    seconds = float(parts[2]) if len(parts) > 2 and parts[2] else 5.0
    return Fault(parts[0], after, seconds)


class Controls:
    """Answer pacing and the chat fault; starts from ``FAKE_ENGINE_*`` variables."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.token_delay = _env_float("FAKE_ENGINE_TOKEN_DELAY")
        self.reply_tokens = int(_env_float("FAKE_ENGINE_REPLY_TOKENS")) or None
        style = os.environ.get("FAKE_ENGINE_FINISH_STYLE", "vllm")
        self.finish_style = style if style in FINISH_STYLES else "vllm"
        self.fault = parse_fault(os.environ.get("FAKE_ENGINE_CHAT_FAULT", ""))

    def configure(self, body: dict[str, Any]) -> None:
        with self._lock:
            if "token_delay" in body:
                self.token_delay = float(body["token_delay"] or 0)
            if "reply_tokens" in body:
                self.reply_tokens = int(body["reply_tokens"] or 0) or None
            if body.get("finish_style") in FINISH_STYLES:
                self.finish_style = str(body["finish_style"])

    def set_fault(self, fault: Fault | None) -> None:
        with self._lock:
            self.fault = fault

    def take_fault(self) -> Fault | None:
        with self._lock:
            fault = self.fault
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.fault = None
            return fault


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _bad_request(message: str) -> tuple[int, dict[str, Any]]:
    return 400, error_body(message, "BadRequestError", 400)


def _cap(request: dict[str, Any]) -> tuple[int | None, str | None]:
    """``max_completion_tokens`` or ``max_tokens``: (cap or None, error or None)."""
    value = request.get("max_completion_tokens", request.get("max_tokens"))
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"max_tokens: Input should be a valid integer, got {value!r}"
    if value < 1:
        return None, f"max_tokens must be at least 1, got {value}."
    return value, None


class Answer:
    """One chat request, checked; :meth:`run` writes it."""

    def __init__(
        self, request: dict[str, Any], name: str, max_model_len: int, controls: Controls
    ) -> None:
        self.request = request
        self.name = name
        self.controls = controls
        self.error: tuple[int, dict[str, Any]] | None = None
        messages = request.get("messages")
        cap, problem = _cap(request)
        prompt = chatreply.prompt_tokens(messages)
        if not isinstance(messages, list) or not messages:
            self.error = _bad_request("messages: Field required (a non-empty list)")
        elif problem is not None:
            self.error = _bad_request(problem)
        elif cap is not None and prompt + cap > max_model_len:
            self.error = _bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {prompt + cap} tokens ({prompt} in the messages, {cap} in the "
                "completion). Please reduce the length of the messages or completion."
            )
        tokens = chatreply.reply_tokens(messages, controls.reply_tokens)
        self.finish = "stop"
        if cap is not None and cap < len(tokens):
            tokens, self.finish = tokens[:cap], "length"
        self.tokens = tokens
        self.prompt = prompt
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + completion,
            "completion_tokens": completion,
        }

    def run(self, handler: BaseHTTPRequestHandler) -> None:
        fault = self.controls.take_fault()
        delay = self.controls.token_delay
        if self.request.get("stream") is True:
            SseWriter(handler, self, fault, delay).run()
            return
        sent: list[str] = []
        for index in range(len(self.tokens) + 1):
            if fault is not None and index == min(fault.after_tokens, len(self.tokens)):
                if fault.kind == "error":
                    _send_json(handler, 500, error_body(fault.message, "InternalServerError", 500))
                    return
                if fault.kind == "cut":
                    _cut(handler)
                    return
                time.sleep(fault.seconds)
            if index < len(self.tokens):
                time.sleep(delay)
                sent.append(self.tokens[index])
        message = {"role": "assistant", "content": "".join(sent)}
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.name,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
            ],
            "usage": self.usage(len(sent)),
        }
        _send_json(handler, 200, body)


class SseWriter:
    def __init__(
        self,
        handler: BaseHTTPRequestHandler,
        answer: Answer,
        fault: Fault | None,
        delay: float,
    ) -> None:
        self.h = handler
        self.answer = answer
        self.fault = fault
        self.delay = delay
        self.started = False

    def event(self, payload: str) -> None:
        if not self.started:
            self.h.send_response(200)
            self.h.send_header("content-type", "text/event-stream; charset=utf-8")
            self.h.send_header("Transfer-Encoding", "chunked")
            self.h.end_headers()
            self.started = True
        data = f"data: {payload}\n\n".encode()
        self.h.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.h.wfile.flush()

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} | extra
        self.event(json.dumps(self._frame([choice])))

    def _frame(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        a = self.answer
        return {
            "id": a.id,
            "object": "chat.completion.chunk",
            "created": a.created,
            "model": a.name,
            "choices": choices,
        }

    def run(self) -> None:
        a = self.answer
        tokens = a.tokens
        vllm = a.controls.finish_style == "vllm"
        try:
            for index in range(len(tokens) + 1):
                if self.fault is not None and index == min(self.fault.after_tokens, len(tokens)):
                    if self.fault.kind == "error":
                        body = error_body(self.fault.message, "InternalServerError", 500)
                        self.event(json.dumps(body))
                        self.event("[DONE]")
                        self._end()
                        return
                    if self.fault.kind == "cut":
                        if not self.started:
                            self.event(json.dumps(self._frame([])))  # headers out, then cut
                        _cut(self.h)
                        return
                    time.sleep(self.fault.seconds)
                if index == len(tokens):
                    break
                time.sleep(self.delay)
                if index == 0:  # vLLM sends the role with the first output
                    self.chunk({"role": "assistant", "content": ""})
                last = index == len(tokens) - 1
                if vllm and last:
                    self.chunk({"content": tokens[index]}, a.finish, stop_reason=None)
                else:
                    self.chunk({"content": tokens[index]})
            if not tokens:
                self.chunk({"role": "assistant", "content": ""})
            if not vllm or not tokens:
                self.chunk({}, a.finish)
            options = a.request.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage"):
                self.event(json.dumps(self._frame([]) | {"usage": a.usage(len(tokens))}))
            self.event("[DONE]")
            self._end()
        except OSError:
            self.h.close_connection = True  # the client went away

    def _end(self) -> None:
        self.h.wfile.write(b"0\r\n\r\n")
        self.h.wfile.flush()


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _cut(handler: BaseHTTPRequestHandler) -> None:
    handler.close_connection = True
    try:
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
