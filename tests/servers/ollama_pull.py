"""`PullModel` (`server/images.go`) and the response side of `PullHandler`.

The stream is: ``pulling manifest``; per layer (config last) progress lines from the shared
download, or one cache-hit line; ``verifying sha256 digest`` (only blobs fetched by this pull);
``writing manifest``; ``removing unused layers`` when the old manifest had layers the new one
lacks; ``success``. Errors after the first line are a final ``{"error": ...}`` line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

from tests.servers.ollama_download import (
    Cancelled,
    DownloadError,
    DownloadManager,
    http_request,
    progress,
    registry_status_error,
)
from tests.servers.ollama_http import Handler
from tests.servers.ollama_names import Name, go_json
from tests.servers.ollama_registry import Registry
from tests.servers.ollama_store import Store

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"

Emit = Callable[[dict[str, Any]], None]


class Puller:
    def __init__(
        self, store: Store, downloads: DownloadManager, registry: Registry, registry_url: str
    ) -> None:
        self.store = store
        self.downloads = downloads
        self.registry = registry
        self.registry_url = registry_url

    def _repo_url(self, name: Name) -> str:
        return f"{self.registry_url}/v2/{name.namespace}/{name.model}"

    def _fetch_manifest(self, name: Name) -> tuple[bytes, dict[str, Any]]:
        headers = self.downloads.headers() | {"Accept": MANIFEST_ACCEPT}
        url = f"{self._repo_url(name)}/manifests/{name.tag}"
        try:
            status, _, body = http_request("GET", url, headers, follow=True)
            if status >= 400:
                raise registry_status_error(status, body)
            data = json.loads(body)
        except ValueError as e:
            raise DownloadError(f"pull model manifest: {e}") from e
        except DownloadError as e:
            raise DownloadError(f"pull model manifest: {e}") from e
        if not isinstance(data, dict):
            raise DownloadError("pull model manifest: unexpected manifest")
        return body, data

    def pull(self, name: Name, emit: Emit, gone: Callable[[], bool]) -> None:
        """Run one pull; raises DownloadError (reported to the client) or Cancelled."""
        old = self.store.find(name)
        delete = set(old.digests()) if old else set()
        self.registry.begin_pull(name)
        emit({"status": "pulling manifest"})
        raw, manifest = self._fetch_manifest(name)
        layers = list(manifest.get("layers") or [])
        config = dict(manifest.get("config") or {})
        if config.get("digest"):
            layers.append(config)
        fetched: list[str] = []
        for layer in layers:
            digest = str(layer.get("digest", ""))
            if gone():
                raise Cancelled
            if not self._download(name, digest, emit, gone):
                fetched.append(digest)
            delete.discard(digest)
        delete.discard(str(config.get("digest", "")))
        emit({"status": "verifying sha256 digest"})
        for digest in fetched:
            self._verify(digest)
        emit({"status": "writing manifest"})
        self.store.write_manifest(name, raw)
        if delete and not os.environ.get("OLLAMA_NOPRUNE"):
            emit({"status": "removing unused layers"})
            self.store.remove_unused(delete)
        emit({"status": "success"})

    def _download(self, name: Name, digest: str, emit: Emit, gone: Callable[[], bool]) -> bool:
        """`downloadBlob`: True on a cache hit."""
        if not digest:
            raise DownloadError(f"{name.namespace}/{name.model}: digest is empty")
        path = self.store.blob_path(digest)
        if path.is_file():
            size = path.stat().st_size
            emit(progress(digest, size, size))
            return True
        url = f"{self._repo_url(name)}/blobs/{digest}"
        self.downloads.get(digest, path, url).wait(gone, emit)
        return False

    def _verify(self, digest: str) -> None:
        path = self.store.blob_path(digest)
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            path.unlink(missing_ok=True)
            raise DownloadError(
                f"digest mismatch, file must be downloaded again: want {digest}, got {got}"
            )


class ProgressSink:
    """Writes progress as NDJSON (``stream``) or keeps the last object (``waitForStream``)."""

    def __init__(self, handler: Handler, stream: bool) -> None:
        self.handler = handler
        self.stream = stream
        self.started = False
        self.broken = False
        self.latest: dict[str, Any] = {}

    def emit(self, value: dict[str, Any]) -> None:
        if not self.stream:
            self.latest = value
            return
        if not self.started:
            self.handler.start_chunked(200, "application/x-ndjson")
            self.started = True
        if not self.handler.write_chunk(go_json(value) + b"\n"):
            self.broken = True

    def gone(self) -> bool:
        return self.broken or self.handler.client_gone()

    def error(self, message: str) -> None:
        if self.started:
            self.handler.write_chunk(go_json({"error": message}) + b"\n")
            self.handler.end_chunked()
        else:
            self.handler.reply_error(500, message)

    def finish(self) -> None:
        if not self.stream:
            self.handler.reply_json(200, self.latest)
            return
        if not self.started:
            self.handler.start_chunked(200, "application/x-ndjson")
        self.handler.end_chunked()

    def run(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Cancelled:
            self.handler.close_connection = True
            return
        except DownloadError as e:
            self.error(str(e))
            return
        self.finish()
