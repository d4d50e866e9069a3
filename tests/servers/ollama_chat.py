"""``POST /api/chat`` with messages: a streamed answer the way `ChatHandler` writes it.

The answer is :mod:`tests.servers.chatreply`'s (the last user message echoed), one token per
NDJSON line ``{"model","created_at","message":{"role":"assistant","content":<delta>},
"done":false}``, then ``{…,"message":{"role":"assistant","content":""},"done_reason":"stop"|
"length","done":true,"total_duration","load_duration","prompt_eval_count",
"prompt_eval_duration","eval_count","eval_duration"}`` (Go's field order; zero metrics are
omitted). ``stream: false`` gives the final object with the whole text as its content.
``options.num_predict`` > 0 caps the tokens (``done_reason: "length"``).

The request holds its runner (no expiry) and one of its ``OLLAMA_NUM_PARALLEL`` slots while
it generates, so with the default of 1 a second chat on the same model waits for the first,
as on a real Ollama. Tokens come ``token_delay`` seconds apart (0 by default).

Test controls (:class:`ChatControl`, through ``/_test/chat`` and ``/_test/faults``):
``token_delay`` and ``reply_tokens`` (an exact answer length), per model or for all; faults
per model (``*``: any), used by the next ``times`` chats (until cleared when None); one
``after_tokens`` past the answer's length acts just before the done line:

- ``chat_error``: after ``after_tokens`` tokens a ``{"error": message}`` line ends the stream
  (HTTP 200 already sent); before the first token it is a 500, as ``streamResponse`` does;
  without streaming a 500;
- ``chat_cut``: after ``after_tokens`` tokens the connection closes: no done line, no final
  chunk;
- ``chat_stall``: after ``after_tokens`` tokens nothing is sent for ``seconds``, then the
  answer goes on.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from tests.servers import chatreply
from tests.servers.ollama_http import Handler
from tests.servers.ollama_names import Name, go_json, go_time
from tests.servers.ollama_scheduler import Runner, Scheduler
from tests.servers.ollama_store import LocalModel

CHAT_FAULT_KINDS = ("chat_error", "chat_cut", "chat_stall")
DEFAULT_ERROR = "llama runner process has terminated: exit status 2"
ModelKey = tuple[str, str, str] | None
_METRICS = ("prompt_eval_count", "eval_count")


@dataclass
class ChatFault:
    key: ModelKey  # Name.repo_key() of the model as requested; None: every model
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


class ChatControl:
    """Per-model answer settings and chat faults (one fault per model, as for pulls)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[ModelKey, ChatFault] = {}
        self._settings: dict[ModelKey, dict[str, Any]] = {}
        self.reset_settings()

    def reset_settings(self) -> None:
        """Back to the start-up values (``OLLAMA_TEST_TOKEN_DELAY``, ``…_REPLY_TOKENS``)."""
        with self._lock:
            self._settings = {
                None: {
                    "token_delay": _env_float("OLLAMA_TEST_TOKEN_DELAY"),
                    "reply_tokens": int(_env_float("OLLAMA_TEST_REPLY_TOKENS")) or None,
                }
            }

    def configure(self, key: ModelKey, values: dict[str, Any]) -> None:
        with self._lock:
            entry = self._settings.setdefault(key, {})
            if "token_delay" in values:
                entry["token_delay"] = float(values["token_delay"] or 0)
            if "reply_tokens" in values:
                entry["reply_tokens"] = int(values["reply_tokens"] or 0) or None

    def setting(self, key: ModelKey, name: str) -> Any:
        with self._lock:
            own = self._settings.get(key, {})
            return own[name] if name in own else self._settings[None].get(name)

    def set_fault(self, fault: ChatFault) -> None:
        with self._lock:
            self._faults[fault.key] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, key: ModelKey) -> ChatFault | None:
        """The fault for this chat (the model's own first, then ``*``), counted once."""
        with self._lock:
            for candidate in (key, None):
                fault = self._faults.get(candidate)
                if fault is None:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[candidate]
                return fault
        return None


class Cut(Exception):
    """Close the connection now (a cut fault, or the client has gone)."""


class Stream:
    """Writes one chat answer: NDJSON lines, or the merged object when not streaming."""

    def __init__(self, h: Handler, streaming: bool) -> None:
        self.h = h
        self.streaming = streaming
        self.started = False

    def line(self, value: dict[str, Any]) -> None:
        if not self.streaming:
            return
        if not self.started:
            self.h.start_chunked(200, "application/x-ndjson")
            self.started = True
        if not self.h.write_chunk(go_json(value) + b"\n"):
            raise Cut

    def error(self, message: str) -> None:
        if self.started:
            self.h.write_chunk(go_json({"error": message}) + b"\n")
            self.h.end_chunked()
        else:
            self.h.reply_error(500, message)

    def cut(self) -> None:
        self.h.close_connection = True
        try:
            self.h.wfile.flush()
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _sleep(h: Handler, seconds: float) -> None:
    """Wait, unless the client hangs up first."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if h.client_gone():
            raise Cut
        time.sleep(min(left, 0.05))


def _wait_slot(h: Handler, runner: Runner) -> None:
    while not runner.slots.acquire(timeout=0.05):
        if h.client_gone():
            raise Cut


def respond(
    h: Handler,
    scheduler: Scheduler,
    control: ChatControl,
    *,
    model: LocalModel,
    name: Name,
    req: dict[str, Any],
    num_ctx: int | None,
    num_predict: int | None,
    started_ns: int,
) -> None:
    """Load (through the scheduler), queue for a slot, then stream the answer."""
    text = req.get("model", "")
    key = name.repo_key()
    stream = Stream(h, req.get("stream", True) is not False)
    fault = control.take_fault(key)
    messages = req.get("messages") or []
    tokens = chatreply.reply_tokens(messages, control.setting(key, "reply_tokens"))
    reason = "stop"
    if num_predict is not None and 0 < num_predict < len(tokens):
        tokens, reason = tokens[:num_predict], "length"
    delay = float(control.setting(key, "token_delay") or 0)

    runner = scheduler.acquire(model, name.display_shortest(), req.get("keep_alive"), num_ctx)
    loaded_ns = time.monotonic_ns()
    slot = False
    try:
        _wait_slot(h, runner)
        slot = True
        prompt_ns = time.monotonic_ns()
        sent: list[str] = []
        for index in range(len(tokens) + 1):
            # A fault after more tokens than the answer has acts just before the done line.
            if fault is not None and index == min(fault.after_tokens, len(tokens)):
                if fault.kind == "chat_error":
                    stream.error(fault.message)
                    return
                if fault.kind == "chat_cut":
                    raise Cut
                _sleep(h, fault.seconds)
            if index == len(tokens):
                break
            if delay:
                _sleep(h, delay)
            sent.append(tokens[index])
            message = {"role": "assistant", "content": tokens[index]}
            stream.line({"model": text, "created_at": _now(), "message": message, "done": False})
        end_ns = time.monotonic_ns()
        final = {
            "model": text,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": reason,
            "done": True,
            "total_duration": max(1, end_ns - started_ns),
            "load_duration": max(1, loaded_ns - started_ns),
            "prompt_eval_count": chatreply.prompt_tokens(messages),
            "prompt_eval_duration": max(1, prompt_ns - loaded_ns),
            "eval_count": len(sent),
            "eval_duration": max(1, end_ns - prompt_ns),
        }
        final = {k: v for k, v in final.items() if v != 0 or k not in _METRICS}  # omitempty
        if not stream.streaming:
            final["message"]["content"] = "".join(sent)
            h.reply_json(200, final)
            return
        stream.line(final)
        h.end_chunked()
    except Cut:
        stream.cut()
    finally:
        if slot:
            runner.slots.release()
        scheduler.release(runner)


def _now() -> str:
    return go_time(time.time_ns(), utc=True)
