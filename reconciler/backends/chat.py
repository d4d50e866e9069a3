"""What every backend's chat shares: hanging up on cancel, OpenAI-compatible streams, canaries.

* **Cancel** must end a chat at once, also while a read waits on a backend that is loading a
  model or has stalled: httpx can't interrupt a blocked read, so ``Hangup`` shuts the chat's
  own socket down (one fresh connection per chat, caught through httpcore's ``trace``
  extension) and the read returns. The backend sees the client gone and stops generating.
* **OpenAI-compatible streams** (the llama.cpp router, vLLM, SGLang, MAX) are parsed here once:
  ``sse_data`` splits Server-Sent Events, ``openai_deltas`` reads the chunks. A stream ends
  well only with ``data: [DONE]`` or a ``finish_reason``; an ``error`` chunk, a cut stream and
  a stall raise ``ChatFailed``, never a quiet empty end. The last delta may come in the chunk
  that carries ``finish_reason`` (vLLM), a role chunk may carry ``content: null``
  (llama-server), usage may come in a ``choices: []`` chunk after the finish.
* A fresh connection per chat also avoids llama-server's habit of closing a kept-alive
  connection right after a streamed answer (the next request on it fails with "Server
  disconnected without sending a response").
* **Limits**: the answer must start within the stall window (a big model takes minutes to
  load, and a backend sends nothing until it has) and every stall window must bring a byte
  (``httpsafe``'s ``window``); the body is capped at ``limits.CHAT_BODY``. The window is the
  adapters' ``stall_timeout`` (``INFERNET_PULL_STALL_TIMEOUT``, 300 s).
* Messages keep a local backend's own error text, one line, at most ``limits.PEER_TEXT``
  characters, never more of its body (docs/security.md).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import httpx

from reconciler import httpsafe, limits
from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.errors import ChatFailed, one_line

CANARY = ChatRequest(messages=({"role": "user", "content": "Say hi."},), max_tokens=1)
"""The canary's chat: one token proves the model loads and answers."""
CANARY_INPUT = "hi"
"""What an embedding model's canary embeds."""
HANGUP_POLL = 0.05
"""Seconds between two looks at a chat's cancel flag while it streams."""
CONNECT_TIMEOUT = 5.0
"""A local backend accepts a connection at once or not at all."""
DONE = "[DONE]"


def pinned(model: Served) -> bool:
    """Pinned models stay loaded after their canary; the others are left unloaded."""
    return model.keep_alive is not None and model.keep_alive < 0


def refuse_embedding(model: Served) -> None:
    """An embedding model has no chat: refused before anything is sent."""
    if model.embedding:
        raise ChatFailed(f"{model.name} is an embedding model; it does not chat", model=model.name)


def drain(deltas: Iterable[str]) -> None:
    """Read a chat to its end (a canary keeps nothing of the answer)."""
    for _ in deltas:
        pass


def peer_message(body: object, fallback: str = "") -> str:
    """A backend's own error text from an OpenAI-style error body, one line and short:
    ``{"error": {"message"}}``, ``{"error": "..."}``, ``{"message"}`` or ``{"detail"}``."""
    text: object = None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            text = error.get("message")
        elif isinstance(error, str):
            text = error
        if not isinstance(text, str):
            text = body.get("message") if isinstance(body.get("message"), str) else None
        if text is None:
            detail = body.get("detail")
            text = detail if isinstance(detail, str) else None
    return one_line(text if isinstance(text, str) else fallback, limits.PEER_TEXT)


# --------------------------------------------------------------------------- cancel


def _shut(stream: object) -> None:
    get = getattr(stream, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # already closed: nothing left to wake
            sock.shutdown(socket.SHUT_RDWR)


class Hangup:
    """Shuts a chat's connection down as soon as ``cancel`` is set, even mid-read.

    Pass ``trace`` as the request's httpcore ``trace`` extension on a client whose connection
    serves this chat only; ``with hangup:`` watches ``cancel`` while the chat runs."""

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._lock = threading.Lock()
        self._streams: list[object] = []
        self._hung_up = False
        self._over = threading.Event()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace callback: remember each connection this chat opens."""
        if event != "connection.connect_tcp.complete":
            return
        stream = info.get("return_value")
        with self._lock:
            self._streams.append(stream)
            late = self._hung_up
        if late:  # cancelled while connecting
            _shut(stream)

    def hook(self, request: httpx.Request) -> None:
        """An httpx ``request`` event hook adding ``trace`` (for clients built elsewhere)."""
        request.extensions["trace"] = self.trace

    def __enter__(self) -> Hangup:
        if not self._cancel.is_set():
            threading.Thread(target=self._watch, name="chat-hangup", daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._over.set()

    def _watch(self) -> None:
        while not self._over.is_set():
            if self._cancel.wait(HANGUP_POLL):
                with self._lock:
                    self._hung_up = True
                    streams = list(self._streams)
                for stream in streams:
                    _shut(stream)
                return


# --------------------------------------------------------------------------- SSE


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (several ``data:`` lines joined by newlines);
    comments and other fields are skipped; an event still open at the end is given too (a cut
    one fails as JSON, or as a missing end)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _note_counts(chunk: Mapping[str, Any], ending: Ending) -> None:
    """Tokens and generation time, as the backend counts them: ``usage`` (with
    ``stream_options.include_usage``), llama-server's ``timings``."""
    usage = chunk.get("usage")
    if (
        isinstance(usage, Mapping)
        and (tokens := _count(usage.get("completion_tokens"))) is not None
    ):
        ending.tokens = tokens
    timings = chunk.get("timings")
    if isinstance(timings, Mapping):
        if ending.tokens is None and (n := _count(timings.get("predicted_n"))) is not None:
            ending.tokens = n
        ms = timings.get("predicted_ms")
        if isinstance(ms, int | float) and not isinstance(ms, bool) and ms >= 0:
            ending.seconds = ms / 1000.0


def _first_choice(chunk: Mapping[str, Any]) -> Mapping[str, Any] | None:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, Mapping) and choice.get("index", 0) == 0:
            return choice
    return None


def openai_deltas(payloads: Iterable[str], ending: Ending, *, who: str) -> Iterator[str]:
    """Text deltas of an OpenAI ``chat.completion.chunk`` stream; fills ``ending``.

    ``who`` names the backend and the model in messages. Ends at ``[DONE]`` (reason: the last
    ``finish_reason``, else ``stop``) or at the end of the stream after a ``finish_reason``;
    raises ``ChatFailed`` on an error chunk, an event that is not a JSON object, and a stream
    that ends with neither (cut off)."""
    deltas = 0
    for payload in payloads:
        if payload.strip() == DONE:
            if ending.reason is None:
                ending.reason = "stop"
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ChatFailed(
                f"{who} sent an event that is not JSON after {deltas} deltas"
            ) from None
        if not isinstance(chunk, dict):
            raise ChatFailed(f"{who} sent an event that is not a JSON object")
        if chunk.get("error") or chunk.get("object") == "error":
            message = peer_message(chunk, "no message")
            raise ChatFailed(f"{who} failed after {deltas} deltas: {message}")
        _note_counts(chunk, ending)
        choice = _first_choice(chunk)
        if choice is None:
            continue
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            ending.reason = finish  # before the delta it came with: that one is the last
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, Mapping) else None
        if isinstance(content, str) and content:
            deltas += 1
            yield content
    if ending.reason is None:
        raise ChatFailed(
            f"{who}: the answer was cut off after {deltas} deltas (no finish_reason, no [DONE])"
        )


# --------------------------------------------------------------------------- OpenAI over HTTP


def openai_body(model_id: str, request: ChatRequest) -> dict[str, Any]:
    """``/v1/chat/completions`` streamed; ``max_tokens``/``temperature`` only when set."""
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [dict(m) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},  # token counts for the node's speed
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    return body


def chat_limits(stall: float) -> httpsafe.Limits:
    """A chat's limits: started within ``stall`` seconds, a byte every ``stall`` seconds."""
    return httpsafe.Limits(deadline=None, max_body=limits.CHAT_BODY, window=stall, min_bytes=1)


def chat_timeout(stall: float) -> httpx.Timeout:
    return httpx.Timeout(30.0, connect=CONNECT_TIMEOUT, read=max(stall, 1.0))


def stream_openai(
    url: str,
    body: Mapping[str, Any],
    ending: Ending,
    cancel: threading.Event,
    *,
    who: str,
    model: str,
    stall: float,
    trust_env: bool = True,
    down: Callable[[], ChatFailed] | None = None,
) -> Iterator[str]:
    """POST ``body`` to ``url`` (an OpenAI-compatible ``/v1/chat/completions``) on a fresh
    connection and yield its deltas; quiet end on ``cancel``. ``down`` words the failure when
    nothing accepts the connection (else "can't reach ``who``")."""
    if cancel.is_set():
        ending.reason = "cancel"
        return
    hangup = Hangup(cancel)
    guard = chat_limits(stall)
    client = httpsafe.client(guard, timeout=chat_timeout(stall), trust_env=trust_env)
    deltas = 0
    try:
        with (
            hangup,
            client.stream("POST", url, json=dict(body), extensions={"trace": hangup.trace}) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                verb = "failed on" if resp.status_code >= 500 else "refused"
                raise ChatFailed(
                    f"{who} {verb} the chat (HTTP {resp.status_code}): {_message(resp)}",
                    model=model,
                    retryable=resp.status_code in (429, 503),
                )
            for delta in openai_deltas(sse_data(resp.iter_lines()), ending, who=who):
                if cancel.is_set():
                    break
                deltas += 1
                yield delta
    except ChatFailed as exc:
        if not cancel.is_set():
            exc.model = exc.model or model
            raise
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        if not cancel.is_set():
            raise transport_failure(exc, who, model, deltas=deltas, stall=stall, down=down) from exc
    finally:
        client.close()
    if cancel.is_set():
        ending.reason = "cancel"


def _message(resp: httpx.Response) -> str:
    try:
        return peer_message(resp.json(), resp.reason_phrase)
    except ValueError:
        return one_line(resp.text or resp.reason_phrase, limits.PEER_TEXT)


def transport_failure(
    exc: BaseException,
    who: str,
    model: str,
    *,
    deltas: int,
    stall: float,
    down: Callable[[], ChatFailed] | None = None,
) -> ChatFailed:
    """One line for a chat's transport error: unreachable, stalled, refused or cut off."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | ConnectionError):
        if down is not None:
            return down()
        return ChatFailed(f"can't reach {who} ({type(exc).__name__})", model=model, retryable=True)
    if isinstance(exc, httpsafe.BodyRefused):
        return ChatFailed(f"{who}: {exc}", model=model)
    if isinstance(exc, httpx.TimeoutException):
        if deltas == 0:
            return ChatFailed(
                f"{who} did not start answering within {stall:g}s (still loading, or stalled)",
                model=model,
                retryable=True,
            )
        return ChatFailed(
            f"{who} stalled: nothing for {stall:g}s after {deltas} deltas", model=model
        )
    return ChatFailed(
        f"{who}: the answer was cut off after {deltas} deltas ({type(exc).__name__})", model=model
    )


def openai_embed(
    url: str, model_id: str, *, who: str, model: str, deadline: float, trust_env: bool = True
) -> None:
    """One embedding from an OpenAI-compatible ``/v1/embeddings``: an embedding model's canary."""
    guard = httpsafe.Limits(deadline=deadline, max_body=limits.BACKEND_BODY)
    body = {"model": model_id, "input": CANARY_INPUT}
    try:
        with httpsafe.client(guard, timeout=chat_timeout(deadline), trust_env=trust_env) as http:
            resp = http.post(url, json=body)
            if resp.status_code != 200:
                raise ChatFailed(
                    f"{who} refused to embed (HTTP {resp.status_code}): {_message(resp)}",
                    model=model,
                )
            data = resp.json().get("data")
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        raise transport_failure(exc, who, model, deltas=0, stall=deadline) from exc
    except (ValueError, AttributeError) as exc:
        raise ChatFailed(
            f"{who} answered an embedding with something not JSON", model=model
        ) from exc
    first = data[0] if isinstance(data, list) and data else None
    vector = first.get("embedding") if isinstance(first, Mapping) else None
    if not isinstance(vector, list) or not vector:
        raise ChatFailed(f"{who} answered without an embedding", model=model)
