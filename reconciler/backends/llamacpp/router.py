"""llama.cpp's ``llama-server`` in router mode (``--models-dir``): its model list and loads.

The router serves every ``*.gguf`` of a folder and starts one child ``llama-server`` per loaded
model. Facts this client is built on (``shared/reference/llamacpp-router.md``):

* the list is rescanned only on ``GET /models?reload=1``; a reload also unloads models whose
  file is gone;
* ``POST /models/load`` and ``/models/unload`` are asynchronous: ``{"success": true}`` means
  "spawned", so the list is polled until ``loaded``, or ``failed``/``exit_code`` (a corrupt file
  is accepted and fails about 60 ms later);
* memory is not reported beyond the weights' bytes (``meta.size``) and child PIDs are not in
  the API, so children are found by their ``--alias`` and ``--port`` arguments (psutil).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from reconciler import httpsafe, limits
from reconciler.errors import (
    BackendError,
    BackendUnreachable,
    ModelNotFound,
    PullFailed,
    one_line,
)

if TYPE_CHECKING:
    import psutil

LOAD_TIMEOUT = 600.0
"""A 70B model from a cold disk takes minutes; the child reports failure much sooner."""
POLL = 0.05


@dataclass(frozen=True)
class RouterModel:
    """One entry of ``GET /models``."""

    id: str
    status: str  # unloaded | loading | loaded | sleeping | downloading
    failed: bool
    exit_code: int | None
    args: tuple[str, ...]
    path: str | None  # --model
    port: int | None  # the child's --port once loaded
    ctx: int | None  # --ctx-size in the args, or meta.n_ctx once loaded
    parallel: int | None  # --parallel
    weights: int | None  # meta.size


AUTO_PARALLEL = 4
"""llama-server's ``-np`` auto (its default): four slots sharing one unified KV cache."""


def _arg(args: Sequence[str], *flags: str) -> str | None:
    """The value after the last of ``flags`` in ``args`` (llama's parser: the last one wins)."""
    found = None
    for i, item in enumerate(args[:-1]):
        if item in flags:
            found = args[i + 1]
    return found


def _int_arg(args: Sequence[str], *flags: str) -> int | None:
    return _int(_arg(args, *flags))


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def run_settings(args: Sequence[str], trained: int | None) -> dict[str, Any]:
    """What a router child started with ``args`` runs, as ``ModelFacts`` fields.

    llama.cpp's rules (``common/arg.cpp``, ``tools/server/server.cpp``, ``llama-context.cpp``):
    ``-c`` is the total over the slots (absent or 0: the model's trained context), rounded up
    to 256; ``-np`` absent or negative is "auto": 4 slots and a unified KV cache; otherwise
    each slot gets ``-c / -np`` cells rounded up to 256, unless ``--kv-unified`` makes them
    share one pool. ``-ub`` and ``-b`` size the micro-batch.
    """
    parallel = _int_arg(args, "--parallel", "-np")
    unified = False
    for item in args:  # the last of the pair wins
        if item in ("--kv-unified", "-kvu"):
            unified = True
        elif item in ("--no-kv-unified", "-no-kvu"):
            unified = False
    if parallel is None or parallel < 0:
        parallel, unified = AUTO_PARALLEL, True
    parallel = max(1, parallel)
    total = _int_arg(args, "--ctx-size", "-c")
    per_slot = _int_arg(args, "--kv-unified-per-slot") or 0
    if total is None and per_slot > 0:
        total = parallel * per_slot  # the pool sized from the per-slot cap
    if not total or total < 0:
        total = trained or 0
    context = None
    if total:
        cells = _pad256(total)
        context = cells if unified else _pad256(cells // parallel)
    batch = _int_arg(args, "--batch-size", "-b")
    ubatch = _int_arg(args, "--ubatch-size", "-ub")
    sizes = [n for n in (batch, ubatch) if n and n > 0]
    return {
        "run_context": context,
        "parallel": parallel,
        "kv_unified": unified,
        "ubatch": min(sizes) if sizes else None,
    }


def model_id(name: str) -> str:
    """The router's id for a file: its name without ``.gguf``."""
    return name.removesuffix(".gguf")


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def parse_models(raw: Mapping[str, Any]) -> list[RouterModel]:
    """``GET /models`` → entries (the router's own HF-cache entries included)."""
    out = []
    for item in raw.get("data") or []:
        status = item.get("status") or {}
        args = tuple(str(a) for a in status.get("args") or ())
        meta = item.get("meta") or {}
        port = _int(_arg(args, "--port"))
        parallel = _int(_arg(args, "--parallel", "-np"))
        ctx = meta.get("n_ctx") if isinstance(meta.get("n_ctx"), int) else None  # per slot
        if ctx is None and (total := _int(_arg(args, "--ctx-size", "-c"))):
            ctx = total // parallel if parallel else total  # -c is the total over the slots
        out.append(
            RouterModel(
                id=str(item.get("id")),
                status=str(status.get("value") or "unloaded"),
                failed=bool(status.get("failed")),
                exit_code=status.get("exit_code"),
                args=args,
                path=_arg(args, "--model", "-m"),
                port=port or None,
                ctx=ctx or None,
                parallel=parallel,
                weights=meta.get("size") if isinstance(meta.get("size"), int) else None,
            )
        )
    return out


class RouterClient:
    """HTTP client of one router."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use (an SSL context costs ~15 ms; a node without GGUF files never asks).
        # Each call ends within ``timeout`` in all, however slowly the router answers.
        guard = httpsafe.Limits(deadline=self._timeout, max_body=limits.BACKEND_BODY)
        return httpsafe.client(guard, base_url=self.url, timeout=self._timeout)

    def close(self) -> None:
        """Release the connection pool."""
        if "_http" in self.__dict__:  # only if it was ever made
            self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise BackendUnreachable(
                f"llama-server router at {self.url} is not answering ({exc}); start it with "
                "`llama-server --models-dir <backends.llamacpp.models_dir>` or fix "
                "backends.llamacpp.url",
                retryable=False,  # a stopped router stays stopped: retrying only delays the news
            ) from exc

    def models(self, *, reload: bool = True) -> list[RouterModel]:
        """The router's list; ``reload`` rescans the folder first (new and deleted files)."""
        resp = self._call("GET", "/models", params={"reload": "1"} if reload else None)
        if resp.status_code != 200:
            raise BackendError(
                f"llama-server at {self.url} answered {resp.status_code} to GET /models: is it "
                "running in router mode (--models-dir)?"
            )
        try:
            return parse_models(resp.json())
        except ValueError as exc:
            raise BackendError(f"llama-server at {self.url}: GET /models is not JSON") from exc

    def find(self, model_id: str, *, reload: bool = False) -> RouterModel | None:
        """The entry for ``model_id``, if the router lists it."""
        return next((m for m in self.models(reload=reload) if m.id == model_id), None)

    def _message(self, resp: httpx.Response) -> str:
        """The router's own error message, one line and short (it ends up in heartbeats)."""
        try:
            text = str(resp.json().get("error", {}).get("message") or resp.text)
        except (ValueError, AttributeError):
            text = resp.text
        return one_line(text, limits.PEER_TEXT)

    def load(self, model_id: str, file: str, *, timeout: float = LOAD_TIMEOUT) -> RouterModel:
        """Load and wait until it is loaded; ``PullFailed`` naming the file when it can't be."""
        resp = self._call("POST", "/models/load", json={"model": model_id})
        if resp.status_code == 404:  # not listed yet: the router only rescans on request
            self.models(reload=True)
            resp = self._call("POST", "/models/load", json={"model": model_id})
        if resp.status_code == 404:
            raise ModelNotFound(f"llama-server at {self.url} does not list {file}")
        if resp.status_code == 400 and "already running" in self._message(resp):
            found = self.find(model_id)
            if found is not None and found.status == "sleeping":
                self._wake(model_id)
        elif resp.status_code != 200:
            raise BackendError(
                f"llama-server at {self.url} refused to load {file}: {self._message(resp)}"
            )
        return self._wait(model_id, file, ("loaded",), timeout)

    def _wake(self, model_id: str) -> None:
        """A sleeping child frees its weights; one token of work brings them back."""
        self._call(
            "POST",
            "/completion",
            json={"model": model_id, "prompt": "", "n_predict": 1},
            timeout=LOAD_TIMEOUT,
            extensions=httpsafe.limits(deadline=LOAD_TIMEOUT, max_body=limits.BACKEND_BODY),
        )

    def unload(self, model_id: str, file: str, *, timeout: float = 60.0) -> None:
        """Unload and wait until the child is gone (a model that isn't running is fine)."""
        resp = self._call("POST", "/models/unload", json={"model": model_id})
        message = self._message(resp) if resp.status_code != 200 else ""
        if resp.status_code == 400 and ("not running" in message or "not found" in message):
            return
        if resp.status_code not in (200, 404):
            raise BackendError(f"llama-server at {self.url} refused to unload {file}: {message}")
        if resp.status_code == 200:
            self._wait(model_id, file, ("unloaded",), timeout)

    def _wait(
        self, model_id: str, file: str, wanted: tuple[str, ...], timeout: float
    ) -> RouterModel:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(model_id)
            if found is None:
                if "unloaded" in wanted:
                    return RouterModel(
                        model_id, "unloaded", False, None, (), None, None, None, None, None
                    )
                raise ModelNotFound(f"llama-server at {self.url} no longer lists {file}")
            if found.failed and "loaded" in wanted:
                raise PullFailed(
                    f"llama-server failed to load {file} (exit code {found.exit_code}): the "
                    "file is damaged or too big for this node; the router's log has the reason"
                )
            if found.status in wanted:
                return found
            if time.monotonic() > deadline:
                raise BackendError(
                    f"llama-server did not finish with {file} within {timeout:.0f}s "
                    f"(status {found.status})"
                )
            time.sleep(POLL)


def child_process(model: RouterModel) -> psutil.Process | None:
    """The child ``llama-server`` serving ``model`` (matched on ``--alias`` and ``--port``)."""
    if model.port is None:
        return None
    import psutil  # ~15 ms to import, and only a router with a loaded model needs it

    want_port = str(model.port)
    for proc in psutil.process_iter(["cmdline"]):
        args = tuple(proc.info.get("cmdline") or ())
        if _arg(args, "--alias", "-a") == model.id and _arg(args, "--port") == want_port:
            return proc
    return None


def child_memory(model: RouterModel) -> tuple[int | None, int | None]:
    """``(pid, resident bytes)`` of the child serving ``model``, when it can be read."""
    proc = child_process(model)
    if proc is None:
        return None, None
    import psutil

    try:
        return proc.pid, int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return proc.pid, None
