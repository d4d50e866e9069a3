"""Chats and canaries on vLLM, SGLang and MAX: the engine serving the model, over its
OpenAI-compatible ``/v1/chat/completions`` (``backends.chat`` parses the stream).

The engine is found from its record (the port infernet started it on, and the name it serves
the model under), without a probe: a chat learns at once whether it answers, and only then is
the engine's state read to say why not. A model served by an engine infernet did not start (at
``backends.hf.url``) is chatted with there. An engine has no per-request keep-alive or
context: both are its command line's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from reconciler import httpsafe
from reconciler.backends import chat
from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.backends.hf.engines import Engines
from reconciler.errors import ChatFailed
from reconciler.model import BackendKind


class EngineChats:
    """Chats of one engine kind's models."""

    def __init__(self, kind: BackendKind, engines: Engines, outside_url: str, stall: float) -> None:
        self.kind = kind
        self.engines = engines
        self.outside_url = outside_url.rstrip("/")
        self.stall = stall

    def _key(self, model: Served) -> str:
        return f"{self.kind.value}:{model.name}"

    def address(self, model: Served) -> tuple[str, str]:
        """``(url, served name)`` of the engine serving ``model``; ``ChatFailed`` when none is."""
        found = self.engines.address(self._key(model))
        if found is not None:
            return found
        if model.advertise_as in self.engines.foreign(self.outside_url):
            return self.outside_url, model.advertise_as
        raise ChatFailed(
            f"the {self.kind.value} engine for {model.name} is not running: infernet starts it "
            "when the model is loaded (keep_alive: -1)",
            model=model.name,
        )

    def _down(self, model: Served) -> Callable[[], ChatFailed]:
        def why() -> ChatFailed:
            status = self.engines.status(self._key(model))
            state = status.state if status is not None else "not recorded"
            code = status.exit_code if status is not None else None
            more = f", exit code {code}" if code is not None else ""
            return ChatFailed(
                f"the {self.kind.value} engine for {model.name} is not running ({state}{more}); "
                "`infernet status` shows its log",
                model=model.name,
                retryable=state == "starting",
            )

        return why

    def _who(self, model: Served, url: str) -> str:
        return f"{model.name} on the {self.kind.value} engine at {httpsafe.redact(url)}"

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream the engine's ``/v1/chat/completions`` for ``model``."""
        chat.refuse_embedding(model)
        url, served = self.address(model)
        yield from chat.stream_openai(
            f"{url}/v1/chat/completions",
            chat.openai_body(served, request),
            ending,
            cancel,
            who=self._who(model, url),
            model=model.name,
            stall=self.stall,
            trust_env=False,  # an engine is local, as the supervision's probes are
            down=self._down(model),
        )

    def canary(self, model: Served) -> None:
        """One token (one embedding for an embedding model) from the running engine; the
        engine is left as it is: it runs exactly while the model is loaded."""
        if not model.embedding:
            chat.drain(self.chat(model, chat.CANARY, Ending(), threading.Event()))
            return
        url, served = self.address(model)
        chat.openai_embed(
            f"{url}/v1/embeddings",
            served,
            who=self._who(model, url),
            model=model.name,
            deadline=max(self.stall, httpsafe.default_deadline()),
            trust_env=False,
        )
