"""llama.cpp as a backend: the GGUF files of ``backends.llamacpp.models_dir``, served by
``llama-server`` in router mode (``--models-dir`` pointing at the same folder).

* The inventory is the folder itself, so it is readable with the router down; the router adds
  what is loaded, and its failures (a damaged file) are reported per file.
* A model's name is its file name (``qwen2.5-7b-instruct-q4_k_m.gguf``); the router's id is
  the name without ``.gguf``.
* Pin = ``POST /models/load`` and wait; unpin = ``POST /models/unload``. The router has no
  per-model ``keep_alive``: a finite ``keep_alive`` cannot be set per model (the router's own
  ``--sleep-idle-seconds`` applies to all), and ``keep_alive: 0`` means "unload now". A pinned
  model that the router dropped (a restart, LRU eviction past ``--models-max``) is loaded again
  by the next reconcile.
* ``context`` can't be set per model either: children run with the router's ``-c`` and
  ``-np`` (read from the router's per-model arguments, ``run_settings``, and used for the
  estimate: every slot's KV cache counts). With the router down, ``backends.llamacpp.parallel``
  says how many slots it runs.
* Chats go to the router's ``/v1/chat/completions`` with the file's router id as ``model``
  (the router autoloads it), without keep_alive or context (the router's flags rule).
* Measured memory: the router reports only weight bytes, so the child process is found and
  its resident memory read (the GPU layer replaces it with the process's VRAM when NVML can
  attribute it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from reconciler import httpsafe, limits
from reconciler.backends import sources
from reconciler.backends.base import (
    AdapterContext,
    Backend,
    Cache,
    ChatRequest,
    Ending,
    PullProgress,
    Served,
)
from reconciler.backends.gguf import meta as ggufmeta
from reconciler.backends.llamacpp import rules
from reconciler.backends.llamacpp.chat import LlamacppChats
from reconciler.backends.llamacpp.router import (
    AUTO_PARALLEL,
    RouterClient,
    RouterModel,
    child_memory,
    model_id,
    run_settings,
)
from reconciler.backends.llamacpp.settings import LlamacppSettings
from reconciler.errors import (
    BackendError,
    BackendUnreachable,
    ModelNotFound,
    PullFailed,
)
from reconciler.model import (
    BackendKind,
    BackendState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    ModelSpec,
    Upstream,
)

_LOADED = ("loaded", "loading", "sleeping")
FACTS_CACHE = "llamacpp.facts.v2"  # v2: vocabulary size and feed-forward width


def _facts_doc(facts: ModelFacts) -> dict[str, Any]:
    return dataclasses.asdict(facts)


def _facts_from_doc(doc: dict[str, Any]) -> ModelFacts:
    known = {f.name for f in dataclasses.fields(ModelFacts)}
    values = {k: v for k, v in doc.items() if k in known}
    values["capabilities"] = tuple(values.get("capabilities") or ())
    return ModelFacts(**values)


class LlamacppBackend:
    """The GGUF folder plus the router serving it."""

    kind = BackendKind.LLAMACPP

    def __init__(
        self,
        settings: LlamacppSettings,
        *,
        cache: Cache | None = None,
        stall_timeout: float = 300.0,
        disk_reserve: int = 0,
    ) -> None:
        self.url = settings.url.rstrip("/")
        self.models_dir = Path(settings.models_dir).expanduser()
        self.cache = cache
        self.stall_timeout = stall_timeout
        self.disk_reserve = disk_reserve  # kept free while downloading, not only in the plan
        self.parallel = settings.parallel
        self.router = RouterClient(self.url)
        self.chats = LlamacppChats(self.url, self.router, stall_timeout=stall_timeout)

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use: each client builds an SSL context (~15 ms), and most plans of
        # a node need no download. HEADs and metadata keep the API deadline and cap;
        # downloads and header reads set their own (``sources``, ``ranged``).
        guard = httpsafe.Limits(deadline=httpsafe.default_deadline(), max_body=limits.REGISTRY_BODY)
        return httpsafe.client(guard, timeout=httpx.Timeout(30.0, connect=10.0))

    def close(self) -> None:
        """Release connections."""
        self.router.close()
        if "_http" in self.__dict__:  # only if it was ever made
            self._http.close()

    # ---- reading

    def _stat_key(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"

    def _file_facts(self, path: Path) -> ModelFacts:
        """GGUF facts of a file, cached by path, size and mtime (reading a header is cheap,
        but a big vocabulary still costs tens of milliseconds per file and plan)."""
        stat_key = self._stat_key(path)
        if self.cache is not None and stat_key is not None:
            cached = self.cache.get(FACTS_CACHE, stat_key)
            if isinstance(cached, dict):
                facts = _facts_from_doc(cached)
                return dataclasses.replace(facts, digest=self._digest(path))
        facts = ggufmeta.read_file(path, digest=self._digest(path))
        if self.cache is not None and stat_key is not None:
            self.cache.put(FACTS_CACHE, stat_key, _facts_doc(facts))
        return facts

    def _digest(self, path: Path) -> str | None:
        """The SHA-256 recorded when we downloaded this exact file (hashing every file on
        every plan would read gigabytes), else unknown."""
        stat_key = self._stat_key(path)
        if self.cache is None or stat_key is None:
            return None
        sha = self.cache.get("llamacpp.sha256", stat_key)
        return f"sha256:{sha}" if isinstance(sha, str) else None

    def _files(self) -> list[Path]:
        out = []
        for entry in sorted(self.models_dir.iterdir()):
            name = entry.name
            if name.startswith(".") or not name.endswith(".gguf") or not entry.is_file():
                continue
            if not rules.valid(name):
                continue  # a name we could never write in infernet.yaml: not ours to manage
            out.append(entry)
        return out

    def inventory(self) -> BackendState:
        """The folder's GGUF files, and what the router has loaded (if it answers)."""
        folder = self.models_dir
        if not folder.is_dir():
            return BackendState(
                self.kind,
                self.url,
                reachable=False,
                error=f"backends.llamacpp.models_dir {folder} does not exist or is not a "
                f"folder; create it (mkdir -p {folder}) or fix the path",
            )
        try:
            files = self._files()
        except OSError as exc:
            return BackendState(
                self.kind,
                self.url,
                reachable=False,
                error=f"can't list backends.llamacpp.models_dir {folder}: {exc.strerror or exc}",
            )
        warnings: list[str] = []
        if not os.access(folder, os.W_OK | os.X_OK):
            warnings.append(
                f"backends.llamacpp.models_dir {folder} is not writable by this user: "
                "downloads and removals there will fail"
            )
        serving_error = None
        routed: dict[str, RouterModel] = {}
        try:
            routed = {m.id: m for m in self.router.models(reload=True)}
        except BackendError as exc:
            serving_error = str(exc)
        installed: list[InstalledModel] = []
        loaded: list[LoadedModel] = []
        for path in files:
            installed.append(self._installed(path, routed.get(model_id(path.name))))
            entry = routed.get(model_id(path.name))
            if entry is not None and entry.status in _LOADED:
                loaded.append(self._loaded(path, entry, installed[-1].facts))
        return BackendState(
            self.kind,
            self.url,
            reachable=True,
            installed=tuple(installed),
            loaded=tuple(loaded),
            serving_error=serving_error,
            warnings=tuple(warnings),
        )

    def _installed(self, path: Path, entry: RouterModel | None) -> InstalledModel:
        error = None
        try:
            facts = self._file_facts(path)
        except BackendError as exc:
            facts, error = ModelFacts(size=path.stat().st_size, format="gguf"), str(exc)
        facts = self._runs_as(facts, entry.args if entry is not None else None)
        if entry is not None and entry.failed and error is None:
            error = (
                f"llama-server failed to load {path} (exit code {entry.exit_code}); the "
                "router's log says why"
            )
        return InstalledModel(self.kind, path.name, path.name, facts, error)

    def _runs_as(self, facts: ModelFacts, args: Sequence[str] | None) -> ModelFacts:
        """``facts`` with how the router runs the model: from its arguments for the model
        (every child inherits the router's), else the file's ``parallel``, else llama-server's
        default slots (the router is down or lists nothing yet; the context is then the
        file's, or the trained one)."""
        if args:
            return dataclasses.replace(facts, **run_settings(args, facts.context_length))
        if self.parallel:
            return dataclasses.replace(facts, parallel=self.parallel, kv_unified=False)
        return dataclasses.replace(facts, parallel=AUTO_PARALLEL, kv_unified=True)

    def _loaded(self, path: Path, entry: RouterModel, facts: ModelFacts) -> LoadedModel:
        pid, rss = child_memory(entry) if entry.status != "loading" else (None, None)
        return LoadedModel(
            backend=self.kind,
            name=path.name,
            canonical=path.name,
            digest=facts.digest,
            size=entry.weights or facts.size or 0,
            size_vram=rss or 0,
            expires_at=None,
            pinned=entry.status == "loaded",
            context_length=entry.ctx,
            pid=pid,
        )

    def details(self, name: str, digest: str | None) -> ModelFacts:
        """Facts of an installed file (the inventory already read them)."""
        path = self.models_dir / name
        if not path.is_file():
            raise ModelNotFound(f"{name} is not in {self.models_dir}")
        return self._file_facts(path)

    def upstream(self, spec: ModelSpec) -> Upstream:
        """Size, checksum and GGUF metadata of the spec's source, before downloading it."""

        def refused(error: str) -> Upstream:
            return Upstream(self.kind, spec.canonical, ModelFacts(), 0, 0, error)

        if not spec.source:
            return refused(
                f"{spec.name} is not in {self.models_dir} and has no source: add source: "
                "(hf://, https://, file://) or copy the file there"
            )
        try:
            source = sources.parse(spec.source)
            remote = sources.probe(source, self._http)
        except BackendError as exc:
            return refused(str(exc))
        if spec.sha256 and remote.sha256 and spec.sha256 != remote.sha256:
            return refused(
                f"{spec.name}: sha256 in the file ({spec.sha256}) is not the hub's checksum "
                f"({remote.sha256}) for {httpsafe.redact(spec.source)}; fix one of them"
            )
        expected = spec.sha256 or remote.sha256
        facts = self._runs_as(
            dataclasses.replace(remote.facts, digest=f"sha256:{expected}" if expected else None),
            self._router_args(),
        )
        size = remote.size or 0
        have = sources.partial_bytes(self.models_dir / spec.name, remote.validator)
        return Upstream(self.kind, spec.canonical, facts, size, max(0, size - have))

    def _router_args(self) -> tuple[str, ...] | None:
        """The arguments children inherit (from any listed model's), for a model not yet
        in the folder; None when the router is down or lists nothing."""
        try:
            listed = self.router.models(reload=False)
        except BackendError:
            return None
        return next((m.args for m in listed if m.args), None)

    # ---- changing

    def _writable(self) -> None:
        if not self.models_dir.is_dir():
            raise PullFailed(f"backends.llamacpp.models_dir {self.models_dir} does not exist")
        if not os.access(self.models_dir, os.W_OK | os.X_OK):
            raise PullFailed(
                f"can't write to backends.llamacpp.models_dir {self.models_dir}: run infernet "
                "as the user that owns it, or fix its permissions"
            )

    def pull(
        self,
        name: str,
        progress: PullProgress,
        cancel: threading.Event,
        *,
        source: str | None = None,
        digest: str | None = None,
    ) -> None:
        """Download ``source`` as ``models_dir/name``, verified, then show it to the router."""
        if not source:
            raise PullFailed(f"{name}: no source to download it from")
        self._writable()
        parsed = sources.parse(source)
        remote = sources.probe(parsed, self._http, metadata=False)
        dest = self.models_dir / name
        expected = digest.removeprefix("sha256:") if digest else None
        was_loaded = self._loaded_now(name)
        sha = sources.fetch(
            parsed,
            remote,
            dest,
            http=self._http,
            expected_sha256=expected,
            progress=progress,
            cancel=cancel,
            stall_timeout=self.stall_timeout,
            reserve=self.disk_reserve,
        )
        stat_key = self._stat_key(dest)
        if self.cache is not None and stat_key is not None:
            self.cache.put("llamacpp.sha256", stat_key, sha)
        progress("success", remote.size, remote.size)
        self._rescan()
        if was_loaded:  # an update: the router keeps the old weights until it reloads them
            self.router.unload(model_id(name), name)
            self.router.load(model_id(name), name)

    def _loaded_now(self, name: str) -> bool:
        try:
            found = self.router.find(model_id(name))
        except BackendError:
            return False
        return found is not None and found.status in _LOADED

    def _rescan(self) -> None:
        """Make the router see the folder as it is now (it never rescans by itself)."""
        with contextlib.suppress(BackendError):
            self.router.models(reload=True)

    def verify(self, name: str, digest: str | None) -> ModelFacts:
        """The file is there, a readable GGUF, and (when known) the expected checksum."""
        facts = self.details(name, digest)
        if digest and facts.digest and facts.digest != digest:
            raise PullFailed(f"{name}: installed file has {facts.digest}, expected {digest}")
        return facts

    def load(
        self,
        name: str,
        *,
        keep_alive: float,
        embedding: bool,
        context: int | None,
        advertise_as: str | None = None,
    ) -> None:
        """Pin (load and wait) or, for any other keep_alive, unload: see the module docstring."""
        if keep_alive < 0:
            if not (self.models_dir / name).is_file():
                raise ModelNotFound(f"{name} is not in {self.models_dir}")
            self.router.load(model_id(name), name)
        else:
            self.router.unload(model_id(name), name)

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream the router's ``/v1/chat/completions`` (``llamacpp.chat``)."""
        return self.chats.chat(model, request, ending, cancel)

    def canary(self, model: Served) -> None:
        """One token, or one embedding, then unloaded unless pinned (``llamacpp.chat``)."""
        self.chats.canary(model)

    def tidy(self, keep: Collection[str]) -> list[str]:
        """Delete the unfinished downloads of models not in ``keep``: a download cut off keeps
        its partial so the next try resumes, but once the model left the file there is no next
        try, and the partial would stay in the folder for good."""
        return sources.discard_unfinished(self.models_dir, keep)

    def remove(self, name: str, *, embedding: bool) -> None:
        """Unload through the router, delete the file, then rescan the router's list."""
        with contextlib.suppress(BackendUnreachable):  # no router: no child holds the file
            self.router.unload(model_id(name), name)
        path = self.models_dir / name
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BackendError(f"can't delete {path}: {exc.strerror or exc}") from exc
        sources.discard_partial(path)
        self._rescan()


def open_backends(
    kinds: Sequence[BackendKind], settings: LlamacppSettings, context: AdapterContext
) -> dict[BackendKind, Backend]:
    """The llama.cpp family's adapter (``FAMILY.adapters``)."""
    return {
        kind: LlamacppBackend(
            settings,
            cache=context.cache,
            stall_timeout=context.stall_timeout,
            disk_reserve=context.disk_reserve,
        )
        for kind in kinds
    }
