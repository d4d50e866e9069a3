"""Chats and canaries on Ollama, through the official client's ``/api/chat`` stream.

* Every request carries the model's ``keep_alive`` (so a per-model keep-alive holds for
  unpinned models too; none: Ollama's default) and its ``context`` as ``options.num_ctx`` (a
  chat with another ``num_ctx`` would reload the model); ``max_tokens`` is ``num_predict``.
* Ollama reports an error after its first line as a last ``{"error": ...}`` line with HTTP 200
  already sent; the client raises ``ResponseError`` (status -1) on it, which becomes
  ``ChatFailed``, never an empty done. A body that ends without ``done: true`` was cut off.
* Each chat has a client and a connection of its own, so ``Hangup`` can shut it on cancel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from reconciler import httpsafe, limits
from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.backends.chat import CANARY_INPUT, Hangup, transport_failure
from reconciler.errors import ChatFailed, one_line

if TYPE_CHECKING:
    import ollama

ClientFactory = Callable[[Hangup], "ollama.Client"]
"""A fresh client for one chat, its requests traced by the chat's ``Hangup``."""


def options(model: Served, request: ChatRequest) -> dict[str, Any] | None:
    """``options`` of a chat: ``num_ctx``, ``num_predict``, ``temperature`` when set."""
    found: dict[str, Any] = {}
    if model.context:
        found["num_ctx"] = model.context
    if request.max_tokens is not None:
        found["num_predict"] = request.max_tokens
    if request.temperature is not None:
        found["temperature"] = request.temperature
    return found or None


class OllamaChats:
    """Chats and canaries of one Ollama server at ``url``."""

    def __init__(self, url: str, make_client: ClientFactory, *, stall: float) -> None:
        self.url = url
        self.make_client = make_client
        self.stall = stall

    def failure(self, exc: BaseException, model: str, deltas: int) -> ChatFailed:
        """One line for what went wrong in a chat (``ResponseError`` or transport)."""
        import ollama

        if isinstance(exc, ChatFailed):
            return exc
        if isinstance(exc, ollama.ResponseError):
            text = one_line(str(exc.error), limits.PEER_TEXT)  # Ollama's own words, short
            if exc.status_code == -1:
                return ChatFailed(
                    f"Ollama failed while answering with '{model}' after {deltas} deltas: {text}",
                    model=model,
                )
            if exc.status_code == 404:
                return ChatFailed(f"Ollama has no model '{model}': {text}", model=model)
            verb = "failed on" if exc.status_code >= 500 else "refused"
            return ChatFailed(
                f"Ollama {verb} the chat with '{model}' (HTTP {exc.status_code}): {text}",
                model=model,
                retryable=exc.status_code in (429, 503),
            )
        if isinstance(exc, ValueError):  # a line that is not JSON, or not a chat answer
            return ChatFailed(
                f"Ollama sent a line that is not a chat answer for '{model}' after {deltas} deltas",
                model=model,
            )
        who = f"Ollama at {httpsafe.redact(self.url)} (model '{model}')"
        return transport_failure(exc, who, model, deltas=deltas, stall=self.stall)

    def stream(
        self,
        model: Served,
        request: ChatRequest,
        ending: Ending,
        cancel: threading.Event,
        *,
        keep_alive: float | None,
    ) -> Iterator[str]:
        """Stream ``/api/chat`` for ``model``; yields content deltas and fills ``ending``."""
        import ollama

        if cancel.is_set():
            ending.reason = "cancel"
            return
        hangup = Hangup(cancel)
        client = self.make_client(hangup)
        parts: Iterator[ollama.ChatResponse] | None = None
        deltas = 0
        try:
            with hangup:
                parts = client.chat(
                    model=model.name,
                    messages=[dict(m) for m in request.messages],
                    stream=True,
                    options=options(model, request),
                    keep_alive=keep_alive,
                )
                for part in parts:
                    if cancel.is_set():
                        break
                    if part.done:
                        ending.reason = part.done_reason or "stop"
                        ending.tokens = part.eval_count
                        if part.eval_duration:
                            ending.seconds = part.eval_duration / 1e9
                    text = part.message.content if part.message is not None else None
                    if text:
                        deltas += 1
                        yield text
                    if part.done:
                        return
        except (ollama.ResponseError, httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            if not cancel.is_set():
                raise self.failure(e, model.name, deltas) from e
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()  # drops the connection: Ollama stops generating for nobody
            client._client.close()  # (the client's own close() is untyped)
        if cancel.is_set():
            ending.reason = "cancel"
            return
        raise ChatFailed(
            f"Ollama's answer with '{model.name}' was cut off after {deltas} deltas (no done line)",
            model=model.name,
        )

    def embed(self, client: ollama.Client, model: Served, *, keep_alive: float) -> None:
        """One embedding: an embedding model's canary."""
        import ollama

        num_ctx = {"num_ctx": model.context} if model.context else None
        try:
            answer = client.embed(
                model=model.name, input=CANARY_INPUT, keep_alive=keep_alive, options=num_ctx
            )
        except (ollama.ResponseError, httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            raise self.failure(e, model.name, 0) from e
        vectors = answer.embeddings
        if not vectors or not vectors[0]:
            raise ChatFailed(f"Ollama answered no embedding for '{model.name}'", model=model.name)
