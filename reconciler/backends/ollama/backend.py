"""The Ollama backend, on the official ``ollama`` client.

Fetch and parse are separate: ``parse`` holds pure functions of the server's JSON (tested from
recorded responses); ``OllamaBackend`` does the I/O. Facts that shape the code:

* ``DELETE /api/delete`` never unloads a runner, so ``remove`` unloads first (``keep_alive: 0``),
  as the ``ollama rm`` CLI has done since 0.3.13.
* A pull answers HTTP 200 and then may fail on any later line, so every line is checked (the
  client raises ``ResponseError`` with status -1), and a watchdog fails a pull whose summed
  ``completed`` stops growing: Ollama keeps sending identical lines while parts stall.
* Embedding-only models refuse ``/api/generate``; they are loaded and unloaded through embed.
* Chats and canaries are ``ollama/chat.py``'s: ``/api/chat`` streamed, with the model's
  keep_alive and context on every request.
* Every request has an overall deadline and a body cap (``reconciler.httpsafe``): API calls
  ``INFERNET_HTTP_TIMEOUT`` (30 s), a load the stall timeout (a big model takes minutes to
  load and Ollama answers only then), a pull none but its stall watchdog; the registry's
  manifests and config blobs are read up to 4 MiB.
* Observing (``/api/tags``, ``/api/ps``, ``/api/show``) is three JSON reads that ``parse``
  reads as the server wrote them (``reference/ollama-api.md``); they go through the guarded
  HTTP client, not the ``ollama`` client, whose import (pydantic) is the slowest part of a
  plan's start-up: a plan or an Ansible no-op that changes nothing never imports it. Pulls,
  loads, deletes and chats are the client's.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from reconciler import httpsafe, limits
from reconciler.backends.base import (
    AdapterContext,
    Backend,
    Cache,
    ChatRequest,
    Ending,
    PullProgress,
    Served,
)
from reconciler.backends.chat import CANARY, Hangup, chat_limits, drain, refuse_embedding
from reconciler.backends.gguf import header as gguf_header
from reconciler.backends.ollama import chat, registry
from reconciler.backends.ollama.names import OllamaName, parse_ollama
from reconciler.backends.ollama.parse import (
    apply_gguf_header,
    parse_config_blob,
    parse_ps,
    parse_show,
    parse_tags,
)
from reconciler.backends.ollama.settings import OllamaSettings
from reconciler.errors import (
    BackendError,
    BackendUnreachable,
    ModelNotFound,
    PullFailed,
    PullStalled,
    TransientBackendError,
    one_line,
)
from reconciler.model import (
    BackendKind,
    BackendState,
    ModelFacts,
    ModelSpec,
    Upstream,
)

if TYPE_CHECKING:
    import ollama

_T = TypeVar("_T")
log = logging.getLogger(__name__)
_RETRYABLE_PULL = ("max retries exceeded", "digest mismatch", "connection reset", "timeout")


# --------------------------------------------------------------------------- I/O


class OllamaBackend:
    """An Ollama server at ``settings.url``, and the registry it pulls from."""

    kind = BackendKind.OLLAMA

    def __init__(
        self,
        settings: OllamaSettings,
        *,
        cache: Cache | None = None,
        stall_timeout: float = 300.0,
    ) -> None:
        self.url = settings.url.rstrip("/")
        self.registry = settings.registry
        self._cache = cache
        self._stall = stall_timeout
        api = httpsafe.default_deadline()
        self._api_limits = httpsafe.Limits(deadline=api, max_body=limits.BACKEND_BODY)
        self._reads = httpsafe.client(
            self._api_limits,
            timeout=httpx.Timeout(30.0, connect=5.0),
            follow_redirects=False,
        )
        self._http = httpsafe.client(
            httpsafe.Limits(deadline=api, max_body=limits.REGISTRY_BODY),
            timeout=httpx.Timeout(30.0, connect=5.0),
            follow_redirects=False,
        )

    @functools.cached_property
    def _ollama(self) -> Any:
        """The ``ollama`` module, imported on first use (a change, a chat, a client error)."""
        import ollama

        return ollama

    @functools.cached_property
    def _client(self) -> ollama.Client:
        return self._ollama_client(self._api_limits)

    def _ollama_client(self, limits: httpsafe.Limits, **extra: Any) -> ollama.Client:
        timeout = httpx.Timeout(30.0, read=max(self._stall, 30.0), connect=5.0)
        made: ollama.Client = self._ollama.Client(
            host=self.url,
            timeout=timeout,
            headers=httpsafe.identity(),
            trust_env=False,
            transport=httpsafe.transport(limits),
            **extra,
        )
        return made

    def _chat_client(self, hangup: Hangup) -> ollama.Client:
        """One chat's own client (and connection): started within the stall window, a byte
        every stall window after that, traced so that a cancel can hang it up."""
        return self._ollama_client(chat_limits(self._stall), event_hooks={"request": [hangup.hook]})

    @functools.cached_property
    def _loader(self) -> ollama.Client:
        """For loads: Ollama answers once the model is in memory, minutes for a big one."""
        deadline = max(self._stall, httpsafe.default_deadline())
        return self._ollama_client(httpsafe.Limits(deadline=deadline, max_body=limits.BACKEND_BODY))

    @functools.cached_property
    def _puller(self) -> ollama.Client:
        """For pulls, which take hours: no deadline, but something every stall period (the
        pull loop's watchdog judges whether that something is progress)."""
        return self._ollama_client(
            httpsafe.Limits(deadline=None, max_body=None, window=self._stall, min_bytes=1)
        )

    def close(self) -> None:
        """Close the HTTP connection pools."""
        self._reads.close()
        for made in ("_client", "_loader", "_puller"):
            if made in self.__dict__:  # only if it was ever made
                self.__dict__[made]._client.close()
        self._http.close()

    # ---- errors

    def _unreachable(self, exc: BaseException) -> BackendUnreachable:
        return BackendUnreachable(
            f"can't reach Ollama at {self.url} ({type(exc).__name__}): start it, or point "
            "backends.ollama.url / OLLAMA_HOST at it"
        )

    def _translate(self, exc: Exception, model: str) -> BackendError:
        """Map client and httpx errors onto our tree; the message names model and server."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, ConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
            return self._unreachable(exc)
        if isinstance(exc, self._ollama.ResponseError):
            # Ollama's own words, one line and short: they reach heartbeats and dashboards.
            text = one_line(str(exc.error), limits.PEER_TEXT)
            if exc.status_code == 404 or "file does not exist" in text or "not found" in text:
                return ModelNotFound(f"Ollama has no model '{model}': {text}", model=model)
            if exc.status_code >= 500 or exc.status_code in (429, 503):
                return TransientBackendError(f"Ollama failed on '{model}': {text}", model=model)
            return BackendError(f"Ollama refused '{model}': {text}", model=model)
        if isinstance(exc, httpx.TransportError):
            return TransientBackendError(
                f"Ollama at {self.url} broke off on '{model}': {type(exc).__name__} {exc}",
                model=model,
            )
        if isinstance(exc, ValueError):  # a line that is not JSON
            return TransientBackendError(f"Ollama sent garbage for '{model}': {exc}", model=model)
        raise exc

    # ---- observe

    @staticmethod
    def _idempotent(call: Callable[[], _T]) -> _T:
        """Run a read once more when a pooled keep-alive connection turned out to be closed."""
        try:
            return call()
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return call()

    def inventory(self) -> BackendState:
        """``/api/tags`` and ``/api/ps``; never raises for an unreachable server."""
        try:
            tags = self._idempotent(lambda: self._read("GET", "/api/tags"))
            ps = self._idempotent(lambda: self._read("GET", "/api/ps"))
            installed, loaded = tuple(parse_tags(tags)), tuple(parse_ps(ps))
        except (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout) as exc:
            err = self._unreachable(exc)
            return BackendState(BackendKind.OLLAMA, self.url, reachable=False, error=str(err))
        except httpx.TransportError as exc:
            msg = f"Ollama at {self.url} broke off the connection ({type(exc).__name__}: {exc})"
            return BackendState(BackendKind.OLLAMA, self.url, reachable=False, error=msg)
        except self._ollama.ResponseError as exc:
            msg = f"Ollama at {self.url} answered {exc.status_code}: {exc.error}"
            return BackendState(BackendKind.OLLAMA, self.url, reachable=False, error=msg)
        except (ValueError, TypeError, AttributeError) as exc:
            msg = f"Ollama at {self.url} sent a listing that is not Ollama's ({type(exc).__name__})"
            return BackendState(BackendKind.OLLAMA, self.url, reachable=False, error=msg)
        return BackendState(
            BackendKind.OLLAMA, self.url, reachable=True, installed=installed, loaded=loaded
        )

    def _read(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON object from the API; an error answer raises ``ollama.ResponseError`` with
        the server's ``error`` text, as the client would."""
        response = self._reads.request(method, self.url + path, json=body)
        if response.status_code >= 400:
            try:
                error = str(response.json()["error"])
            except (ValueError, KeyError, TypeError):
                error = response.text
            raise self._ollama.ResponseError(error, response.status_code)
        data = response.json()
        if not isinstance(data, dict):
            raise ValueError(f"{path} answered {type(data).__name__}, not an object")
        return data

    def details(self, name: str, digest: str | None) -> ModelFacts:
        """``/api/show`` for ``name``, cached by manifest digest (a digest never changes)."""
        cached = self._cache.get("ollama.show", digest) if self._cache and digest else None
        if isinstance(cached, dict):
            raw: dict[str, Any] = cached
        else:
            try:
                raw = self._read("POST", "/api/show", {"model": name})
            except Exception as exc:
                raise self._translate(exc, name) from exc
            raw = {k: raw.get(k) for k in ("model_info", "details", "capabilities", "modelfile")}
            if self._cache and digest:
                self._cache.put("ollama.show", digest, raw)
        try:
            return parse_show(raw, digest=digest, size=None)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"Ollama at {self.url} answered /api/show for '{name}' with something that is "
                f"not Ollama's ({type(exc).__name__})",
                model=name,
            ) from exc

    def upstream(self, spec: ModelSpec) -> Upstream:
        """Registry manifest, config blob and GGUF header, and which blobs Ollama lacks."""
        name = parse_ollama(spec.name)
        try:
            manifest = registry.fetch_manifest(self._http, name, self.registry)
            missing = registry.missing_bytes(self._http, self.url, manifest)
            header = self._gguf_header(name, manifest)
        except BackendError as exc:
            return Upstream(BackendKind.OLLAMA, spec.canonical, ModelFacts(), 0, 0, error=str(exc))
        except httpx.TransportError as exc:
            err = str(self._unreachable(exc))
            return Upstream(BackendKind.OLLAMA, spec.canonical, ModelFacts(), 0, 0, error=err)
        facts = apply_gguf_header(parse_config_blob(manifest.config, manifest), header)
        return Upstream(BackendKind.OLLAMA, spec.canonical, facts, manifest.total_bytes, missing)

    def _gguf_header(self, name: OllamaName, manifest: registry.Manifest) -> dict[str, Any]:
        """The weights' GGUF metadata, cached by weights digest; empty when unreadable."""
        layer = next((x for x in manifest.layers if x.media_type == registry.WEIGHTS_MEDIA), None)
        if layer is None:
            return {}
        cached = self._cache.get("ollama.gguf", layer.digest) if self._cache else None
        if isinstance(cached, dict):
            return cached
        try:
            header = registry.fetch_gguf_header(self._http, name, self.registry, layer)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            log.debug("no GGUF header for %s (%s): %s", name.display, layer.digest, exc)
            return {}
        if self._cache and gguf_header.has_essentials(header):  # not a stalled read's scraps
            self._cache.put("ollama.gguf", layer.digest, header)
        return header

    # ---- change

    def pull(
        self,
        name: str,
        progress: PullProgress,
        cancel: threading.Event,
        *,
        source: str | None = None,
        digest: str | None = None,
    ) -> None:
        """Stream ``/api/pull``; fail on an error line, a stall, or ``cancel``.

        ``source`` is unused (Ollama pulls from its registry); ``digest`` is checked by
        ``verify`` afterwards."""
        completed: dict[str, int] = {}
        totals: dict[str, int] = {}
        last_sum, last_move = -1, time.monotonic()
        stream: Iterator[Any] | None = None
        try:
            stream = self._puller.pull(name, stream=True)
            for part in stream:
                if cancel.is_set():
                    raise PullFailed(f"pull of '{name}' cancelled", model=name)
                status = str(part.status or "")
                if part.digest and part.total:
                    totals[part.digest] = int(part.total)
                    completed[part.digest] = int(part.completed or 0)
                done, total = sum(completed.values()), sum(totals.values())
                now = time.monotonic()
                if done != last_sum or not status.startswith("pulling "):
                    last_sum, last_move = done, now
                elif now - last_move > self._stall:
                    raise PullStalled(
                        f"pull of '{name}' stalled at {done}/{total} bytes for "
                        f"{self._stall:.0f}s; it will resume from there on the next try",
                        model=name,
                    )
                progress(status, done if totals else None, total if totals else None)
                if status == "success":
                    return
        except BackendError:
            raise
        except httpx.ReadTimeout as exc:
            raise PullStalled(
                f"pull of '{name}': Ollama sent nothing for {self._stall:.0f}s", model=name
            ) from exc
        except Exception as exc:
            err = self._translate(exc, name)
            text = str(err)
            if isinstance(err, ModelNotFound):
                raise ModelNotFound(
                    f"'{name}' is not in the registry: {text.split(': ', 1)[-1]} "
                    "(check the name and tag on ollama.com/library)",
                    model=name,
                ) from exc
            retry = err.retryable or any(t in text for t in _RETRYABLE_PULL)
            raise PullFailed(
                f"pull of '{name}' failed: {text}", model=name, retryable=retry
            ) from exc
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # drops the connection: Ollama cancels a download nobody awaits
        raise PullFailed(f"pull of '{name}' ended without 'success'", model=name, retryable=True)

    def verify(self, name: str, digest: str | None) -> ModelFacts:
        """Installed under ``name`` (and ``digest`` when given), answering ``show``."""
        state = self.inventory()
        if not state.reachable:
            raise BackendUnreachable(state.error or f"can't reach Ollama at {self.url}")
        wanted = parse_ollama(name).canonical
        for model in state.installed:
            if model.canonical == wanted:
                if digest and model.facts.digest and model.facts.digest != digest:
                    raise PullFailed(
                        f"'{name}' is installed with digest {model.facts.digest[:12]}, "
                        f"expected {digest[:12]} (the tag moved during the pull?)",
                        model=name,
                    )
                shown = self.details(model.name, model.facts.digest)
                # The listing's facts, with what only ``show`` knows (an embedding model?).
                return dataclasses.replace(model.facts, capabilities=shown.capabilities)
        raise PullFailed(f"'{name}' is not listed by Ollama after its pull", model=name)

    def load(
        self,
        name: str,
        *,
        keep_alive: float,
        embedding: bool,
        context: int | None,
        advertise_as: str | None = None,
    ) -> None:
        """Preload (or unload, with 0) through generate, or embed for embedding models."""
        options = {"num_ctx": context} if context else None
        try:
            if embedding:
                self._loader.embed(model=name, input="", keep_alive=keep_alive, options=options)
            else:
                self._loader.generate(model=name, keep_alive=keep_alive, options=options)
        except self._ollama.ResponseError as exc:
            if not embedding and "does not support generate" in str(exc.error):
                self.load(name, keep_alive=keep_alive, embedding=True, context=context)
                return
            raise self._translate(exc, name) from exc
        except Exception as exc:
            raise self._translate(exc, name) from exc

    @functools.cached_property
    def _chats(self) -> chat.OllamaChats:
        return chat.OllamaChats(self.url, self._chat_client, stall=self._stall)

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream ``/api/chat`` with the model's keep_alive and context (``ollama.chat``)."""
        refuse_embedding(model)
        yield from self._chats.stream(model, request, ending, cancel, keep_alive=model.keep_alive)

    def canary(self, model: Served) -> None:
        """One token (one embedding for an embedding model), sent with the model's keep_alive
        when it has one, else 0: a model not pinned and without one is unloaded after."""
        keep_alive = model.keep_alive if model.keep_alive is not None else 0.0
        if model.embedding:
            self._chats.embed(self._loader, model, keep_alive=keep_alive)
            return
        drain(self._chats.stream(model, CANARY, Ending(), threading.Event(), keep_alive=keep_alive))

    def remove(self, name: str, *, embedding: bool) -> None:
        """Unload (delete never does), then delete; an already-absent model is fine."""
        try:
            self.load(name, keep_alive=0, embedding=embedding, context=None)
        except ModelNotFound:
            return
        try:
            self._client.delete(name)
        except self._ollama.ResponseError as exc:
            if exc.status_code == 404:
                return
            raise self._translate(exc, name) from exc
        except Exception as exc:
            raise self._translate(exc, name) from exc


def open_backends(
    kinds: Sequence[BackendKind], settings: OllamaSettings, context: AdapterContext
) -> dict[BackendKind, Backend]:
    """The Ollama family's adapter (``FAMILY.adapters``)."""
    return {
        kind: OllamaBackend(settings, cache=context.cache, stall_timeout=context.stall_timeout)
        for kind in kinds
    }
