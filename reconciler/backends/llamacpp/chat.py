"""Chats on llama.cpp: the router's ``/v1/chat/completions``, streamed (``backends.chat``).

The router routes by ``model`` (its id for a GGUF file) and loads the model on demand, so a
canary is one token (or one embedding); a model that is not pinned is unloaded after it, as a
request with ``keep_alive: 0`` would be (llama.cpp takes no keep-alive per request).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from reconciler import httpsafe
from reconciler.backends import chat
from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.backends.llamacpp.router import RouterClient, model_id
from reconciler.errors import BackendError, ChatFailed


class LlamacppChats:
    """The chats and canaries of one router."""

    def __init__(self, url: str, router: RouterClient, *, stall_timeout: float) -> None:
        self.url = url
        self.router = router
        self.stall_timeout = stall_timeout

    def _who(self, model: Served) -> str:
        return f"{model.name} on llama-server at {httpsafe.redact(self.url)}"

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream the router's ``/v1/chat/completions``."""
        chat.refuse_embedding(model)
        body = chat.openai_body(model_id(model.name), request)
        url = f"{self.url}/v1/chat/completions"
        who = self._who(model)
        stall = self.stall_timeout
        yield from chat.stream_openai(
            url, body, ending, cancel, who=who, model=model.name, stall=stall
        )

    def canary(self, model: Served) -> None:
        """One token (the router autoloads the model) or one embedding; then the model is
        unloaded unless it is pinned (a failed canary's unload is best effort)."""
        deadline = max(self.stall_timeout, httpsafe.default_deadline())
        try:
            if model.embedding:
                url, mid = f"{self.url}/v1/embeddings", model_id(model.name)
                who = self._who(model)
                chat.openai_embed(url, mid, who=who, model=model.name, deadline=deadline)
            else:
                chat.drain(self.chat(model, chat.CANARY, Ending(), threading.Event()))
        except ChatFailed:
            if not chat.pinned(model):
                with contextlib.suppress(BackendError):
                    self.router.unload(model_id(model.name), model.name)
            raise
        if not chat.pinned(model):
            try:
                self.router.unload(model_id(model.name), model.name)
            except BackendError as exc:
                message = f"{model.name} answered but did not unload: {exc}"
                raise ChatFailed(message, model=model.name) from exc
