"""vLLM, SGLang and MAX: HuggingFace repositories in the hub cache, each served by an engine.

* **Inventory** is the hub cache (``huggingface_hub.scan_cache_dir``): one installed model per
  cached revision, named ``org/repo@ref`` (or ``@commit`` for a revision no ref points at). A
  revision this tool is still downloading, or that has ``.incomplete`` blobs, is not installed:
  a half repo is never counted.
* **Before a download** ``snapshot_download(dry_run=True)`` lists the files the allow patterns
  take, their sizes and which are cached already; the safetensors metadata gives parameter
  counts by dtype and ``config.json`` the shape, so the budget is checked first.
* **Install** = ``snapshot_download`` of weights, config and tokenizer files only; **remove** =
  the engine stopped, then the revision deleted through the cache API.
* **Chats** go to the engine serving the model (``hf.chat``), under its served name.
* **Serving**: one engine per model, started from the command template of its kind and
  supervised through ``reconciler.backends.hf.engines`` (records in the state folder, so a later
  ``infernet`` process finds the engines again). "Loaded" means the engine's ``/v1/models``
  lists the model. An engine at ``backends.hf.url`` that infernet did not start is observed and
  never touched.

The three kinds share one cache; ``rules.share`` (the family's ``merge_states``) gives each
cached revision to the kind the file (or, for a model that left the file, the state store)
names, so switching a model from vLLM to SGLang never deletes its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from reconciler import httpsafe, limits
from reconciler.backends import hub
from reconciler.backends.base import (
    AdapterContext,
    Backend,
    Cache,
    ChatRequest,
    Ending,
    PullProgress,
    Served,
)
from reconciler.backends.hf.cache import (
    CacheScanner,
    blob_bytes,
    config_facts,
    local_parameter_count,
    split,
    weights,
)
from reconciler.backends.hf.chat import EngineChats
from reconciler.backends.hf.engines import Engines, EngineSpec
from reconciler.backends.hf.settings import HfSettings
from reconciler.errors import BackendError, ModelNotFound, PullFailed
from reconciler.model import (
    BackendKind,
    BackendState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    ModelSpec,
    Upstream,
)

ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""Weights, config and tokenizer files: what vLLM, SGLang and MAX read from a repo."""
IGNORE = ["original/*", "*.pth", "*.bin", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
READY_TIMEOUT = 900.0
"""A 70B model takes minutes to load and compile graphs; the engine exiting fails much sooner."""


class HfBackend:
    """One engine kind (vllm, sglang or max) over the shared hub cache."""

    def __init__(
        self,
        kind: BackendKind,
        settings: HfSettings,
        *,
        engines: Engines,
        cache: Cache | None = None,
        scanner: CacheScanner | None = None,
        stall_timeout: float = 300.0,
    ) -> None:
        self.kind = kind
        self.url = settings.url.rstrip("/")
        self.settings = settings
        self.cache_dir = Path(settings.cache_dir).expanduser()
        self.cache = cache
        self.engines = engines
        # The three kinds share one scanner, so one observation walks the cache once.
        self.scanner = scanner or CacheScanner(self.cache_dir)
        self.chats = EngineChats(kind, engines, self.url, stall_timeout)

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use: each client builds an SSL context (~15 ms), and a node that
        # serves no HF model never needs one. It reads config.json: a deadline and a cap.
        guard = httpsafe.Limits(deadline=httpsafe.default_deadline(), max_body=limits.REGISTRY_BODY)
        return httpsafe.client(guard, timeout=httpx.Timeout(30.0, connect=10.0))

    def close(self) -> None:
        """Release connections."""
        if "_http" in self.__dict__:  # only if it was ever made
            self._http.close()

    def supervised(self) -> list[dict[str, Any]]:
        """The engines infernet started (every kind's: they share one folder), for ``status``."""
        rows = []
        for e in self.engines.list():
            dead = e.state in ("exited", "stopped")
            rows.append(
                {
                    "model": e.key,
                    "state": e.state,
                    "pid": e.pid,
                    "port": e.port,
                    "exit_code": e.exit_code,
                    "restarts": e.restarts,
                    "log": e.log_path,
                    "log_tail": self.engines.log_tail(e.key, 12) if dead else None,
                }
            )
        return rows

    # ---- reading

    def _pending(self, repo: str, revision: str) -> bool:
        return self.cache is not None and bool(self.cache.get("hf.pending", f"{repo}@{revision}"))

    def _scan(self) -> Any:
        return self.scanner.scan()

    def inventory(self) -> BackendState:
        """Every complete cached revision, and the engines of this kind that serve."""
        try:
            info = self._scan()
        except (OSError, ValueError) as exc:
            return BackendState(
                self.kind,
                self.url,
                reachable=False,
                error=f"can't read the hub cache backends.hf.cache_dir {self.cache_dir}: {exc}",
            )
        installed: list[InstalledModel] = []
        incomplete_repos = set()
        if info is not None:
            for partial in getattr(info, "incomplete_files", ()):
                incomplete_repos.add(Path(partial.file_path).parent.parent.name)
            for repo in sorted(info.repos, key=lambda r: r.repo_id):
                if repo.repo_type != "model" or Path(repo.repo_path).name in incomplete_repos:
                    continue
                for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
                    refs = sorted(rev.refs) or [rev.commit_hash]
                    if any(self._pending(repo.repo_id, r) for r in (*refs, rev.commit_hash)):
                        continue
                    facts = ModelFacts(
                        digest=rev.commit_hash, size=rev.size_on_disk, format="safetensors"
                    )
                    for ref in refs:
                        name = f"{repo.repo_id}@{ref}"
                        installed.append(InstalledModel(self.kind, name, name, facts))
        return BackendState(
            self.kind,
            self.url,
            reachable=True,
            installed=tuple(installed),
            loaded=tuple(self._serving(bool(installed))),
        )

    def _serving(self, have_models: bool) -> list[LoadedModel]:
        """Engines of this kind that answer with their model, ours and foreign ones (named by
        the model they serve; ``rules.share`` matches those to the file's entries).
        A node with nothing in the hub cache and no engine records asks no port: the plan of
        an Ollama-only node stays as fast as it was."""
        records = self.engines.list()
        if not have_models and not records:
            return []
        out: list[LoadedModel] = [
            LoadedModel(
                backend=self.kind,
                name=served,
                canonical=served,
                digest=None,
                size=0,
                size_vram=0,
                expires_at=None,
                pinned=True,
                foreign=True,
            )
            for served in self.engines.foreign(self.url)
        ]
        prefix = f"{self.kind.value}:"
        for status in records:
            if not status.key.startswith(prefix) or status.state != "ready":
                continue
            name = status.key.removeprefix(prefix)
            # What the engine really holds is read per process from NVML by the GPU layer;
            # the budget counts the engine's claim either way. Its resident host memory is
            # read here, while observing, so the (pure) planner can show it beside the claim.
            out.append(
                LoadedModel(
                    backend=self.kind,
                    name=name,
                    canonical=name,
                    digest=None,
                    size=0,
                    size_vram=0,
                    expires_at=None,
                    pinned=True,
                    pid=status.pid,
                    rss_bytes=self.engines.rss(status.key),
                )
            )
        return out

    def _snapshot(self, name: str) -> Path | None:
        repo, revision = split(name)
        info = self._scan()
        if info is None:
            return None
        for cached in info.repos:
            if cached.repo_id != repo or cached.repo_type != "model":
                continue
            for rev in cached.revisions:
                if revision in rev.refs or rev.commit_hash == revision:
                    return Path(rev.snapshot_path)
        return None

    def details(self, name: str, digest: str | None) -> ModelFacts:
        """Shape and weights of a cached revision, from its own files."""
        snapshot = self._snapshot(name)
        if snapshot is None:
            raise ModelNotFound(f"{name} is not in the hub cache {self.cache_dir}")
        facts = ModelFacts(digest=digest, format="safetensors")
        config = snapshot / "config.json"
        with contextlib.suppress(OSError, ValueError):  # no config: the claim bounds the budget
            facts = config_facts(json.loads(config.read_text()), facts)
        params, size = weights(local_parameter_count(snapshot))
        if params:
            facts = dataclasses.replace(facts, parameter_count=params, weights_bytes=size)
        return facts

    def upstream(self, spec: ModelSpec) -> Upstream:
        """Files, sizes, cached bytes and parameter counts of the repo, nothing downloaded."""
        from huggingface_hub import HfApi, hf_hub_url, snapshot_download

        repo, revision = spec.name, spec.revision or "main"
        what = f"{spec.name}@{revision}"
        try:
            # model_info first: a dry run hides why a repository can't be read.
            HfApi(endpoint=hub.endpoint()).model_info(repo, revision=revision)
            files = snapshot_download(
                repo,
                revision=revision,
                cache_dir=self.cache_dir,
                allow_patterns=ALLOW,
                ignore_patterns=IGNORE,
                endpoint=hub.endpoint(),
                dry_run=True,
            )
        except hub.http_errors() as exc:
            err = hub.error(what, repo, revision, None, exc)
            return Upstream(self.kind, spec.canonical, ModelFacts(), 0, 0, str(err))
        except (httpx.TransportError, OSError) as exc:
            error = (
                f"{what}: can't reach the hub at {httpsafe.redact(hub.endpoint())} "
                f"({httpsafe.redact(str(exc))})"
            )
            return Upstream(self.kind, spec.canonical, ModelFacts(), 0, 0, error)
        if not any(f.filename.endswith(".safetensors") for f in files):
            error = (
                f"{what}: the repository has no .safetensors weights; vLLM, SGLang and MAX "
                "need them (a GGUF repo is for backend: llamacpp)"
            )
            return Upstream(self.kind, spec.canonical, ModelFacts(), 0, 0, error)
        total = sum(f.file_size or 0 for f in files)
        missing = sum(f.file_size or 0 for f in files if f.will_download)
        commit = files[0].commit_hash if files else None
        facts = ModelFacts(digest=commit, size=total, format="safetensors")
        try:
            url = hf_hub_url(repo, "config.json", revision=revision, endpoint=hub.endpoint())
            resp = self._http.get(url, headers=hub.headers(), follow_redirects=True)
            if resp.status_code == 200:
                facts = config_facts(resp.json(), facts)
            meta = HfApi(endpoint=hub.endpoint()).get_safetensors_metadata(repo, revision=revision)
            params, size = weights(meta.parameter_count)
            facts = dataclasses.replace(facts, parameter_count=params, weights_bytes=size)
        except Exception:  # the shape is an extra: the engine's claim bounds the budget
            pass
        return Upstream(self.kind, spec.canonical, facts, total, missing)

    # ---- changing

    def pull(
        self,
        name: str,
        progress: PullProgress,
        cancel: threading.Event,
        *,
        source: str | None = None,
        digest: str | None = None,
    ) -> None:
        """``snapshot_download`` of the allowed files; a cut download resumes on retry."""
        from huggingface_hub import snapshot_download

        repo, revision = split(name)
        marker = f"{repo}@{revision}"
        if self.cache is not None:
            self.cache.put("hf.pending", marker, True)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["path"] = snapshot_download(
                    repo,
                    revision=revision,
                    cache_dir=self.cache_dir,
                    allow_patterns=ALLOW,
                    ignore_patterns=IGNORE,
                    endpoint=hub.endpoint(),
                )
            except Exception as exc:  # re-raised in the caller's thread below
                result["error"] = exc

        worker = threading.Thread(target=work, name=f"hf-pull {name}", daemon=True)
        worker.start()
        repo_dir = self.cache_dir / ("models--" + repo.replace("/", "--"))
        while worker.is_alive():
            worker.join(0.25)
            progress("downloading", blob_bytes(repo_dir), None)
            if cancel.is_set():
                raise PullFailed(f"download of {name} cancelled; it resumes next time")
        error = result.get("error")
        if isinstance(error, Exception):
            if isinstance(error, hub.http_errors()):
                raise hub.error(f"download of {name}", repo, revision, None, error) from error
            raise PullFailed(
                f"download of {name} failed ({httpsafe.redact(str(error))}); it resumes on retry",
                retryable=True,
            ) from error
        if digest and Path(result["path"]).name != digest:
            raise PullFailed(f"{name}: got revision {Path(result['path']).name}, planned {digest}")
        self.scanner.forget()
        if self.cache is not None:
            self.cache.put("hf.pending", marker, False)
        done = blob_bytes(repo_dir)
        progress("success", done, done)

    def verify(self, name: str, digest: str | None) -> ModelFacts:
        """The revision is cached completely."""
        state = self.inventory()
        if not any(m.canonical == name for m in state.installed):
            raise PullFailed(f"{name} is not complete in the hub cache {self.cache_dir}")
        return self.details(name, digest)

    def _engine_spec(self, name: str, advertise_as: str | None) -> EngineSpec:
        snapshot = self._snapshot(name)
        if snapshot is None:
            raise ModelNotFound(f"{name} is not in the hub cache {self.cache_dir}")
        return EngineSpec(
            key=f"{self.kind.value}:{name}",
            kind=self.kind.value,
            command=self.settings.commands[self.kind.value],
            path=str(snapshot),
            served_name=advertise_as or split(name)[0],
            fraction=self.settings.gpu_memory_utilization,
        )

    def load(
        self,
        name: str,
        *,
        keep_alive: float,
        embedding: bool,
        context: int | None,
        advertise_as: str | None = None,
    ) -> None:
        """Start the model's engine and wait until it lists the model (any keep_alive: an
        engine is the only way these backends serve; a non-negative one stops it)."""
        key = f"{self.kind.value}:{name}"
        if keep_alive >= 0:
            self.engines.stop(key)
            return
        spec = self._engine_spec(name, advertise_as)
        current = self.engines.status(key)
        if current is not None and current.ours and current.spec != spec:
            self.engines.stop(key)  # the file changed how it is served: start it afresh
        # start() returns a running engine as it is and restarts a dead one (same port).
        self.engines.start(spec)
        self.engines.wait_ready(key, READY_TIMEOUT)

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """Stream the chat from the engine serving ``model`` (``hf.chat``)."""
        return self.chats.chat(model, request, ending, cancel)

    def canary(self, model: Served) -> None:
        """One token from the engine serving ``model`` (``hf.chat``)."""
        self.chats.canary(model)

    def remove(self, name: str, *, embedding: bool) -> None:
        """Stop the engine, then delete the revision through the cache API."""
        self.engines.stop(f"{self.kind.value}:{name}")
        repo, revision = split(name)
        info = self._scan()
        commits = [
            rev.commit_hash
            for cached in (info.repos if info is not None else ())
            if cached.repo_id == repo and cached.repo_type == "model"
            for rev in cached.revisions
            if revision in rev.refs or rev.commit_hash == revision
        ]
        if commits and info is not None:
            try:
                info.delete_revisions(*commits).execute()
            except OSError as exc:
                raise BackendError(f"can't delete {name} from {self.cache_dir}: {exc}") from exc
            finally:
                self.scanner.forget()


def open_backends(
    kinds: Sequence[BackendKind], settings: HfSettings, context: AdapterContext
) -> dict[BackendKind, Backend]:
    """The HF family's adapters (``FAMILY.adapters``): one per engine kind, sharing one engine
    folder (in the state directory; none without one) and one walk of the hub cache."""
    if context.state_dir is None:
        return {}
    engines = Engines(context.state_dir / "engines", base_port=_port(settings.url))
    scanner = CacheScanner(Path(settings.cache_dir).expanduser())
    return {
        kind: HfBackend(
            kind,
            settings,
            engines=engines,
            cache=context.cache,
            scanner=scanner,
            stall_timeout=context.stall_timeout,
        )
        for kind in sorted(kinds)
    }


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)
