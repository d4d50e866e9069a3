"""The stand-in's model store, in Ollama's on-disk layout under ``--models-dir``.

``blobs/sha256-<hex>`` (downloads in progress: ``-partial`` plus ``-partial-<N>`` part files)
and ``manifests/<host>/<ns>/<model>/<tag>`` holding the registry's manifest bytes verbatim.
Everything is read from disk, so a restarted server sees exactly what the last one left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers.ollama_catalogue import MEDIA_PREFIX, read_gguf_kv
from tests.servers.ollama_names import Name

DIGEST_RE = re.compile(r"sha256[:-][0-9a-fA-F]{64}")
_BLOB_FILE_RE = re.compile(r"sha256-[0-9a-fA-F]{64}")


@dataclass
class LocalManifest:
    name: Name
    path: Path
    raw: bytes
    data: dict[str, Any]
    mtime_ns: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.data.get("layers") or [])

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.data.get("config") or {})

    def digests(self) -> list[str]:
        found = [la.get("digest", "") for la in self.layers] + [self.config.get("digest", "")]
        return [d for d in found if d]

    def size(self) -> int:
        return sum(int(la.get("size", 0)) for la in [*self.layers, self.config])


@dataclass
class LocalModel:
    """What Ollama's `GetModel` reads: config, GGUF metadata and the text layers."""

    manifest: LocalManifest
    config: dict[str, Any]
    kv: dict[str, Any]
    weights_digest: str
    weights_path: Path
    weights_size: int
    projectors: list[Path]
    template: str
    system: str
    license: list[str]
    params: dict[str, Any]

    @property
    def arch(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def kv_int(self, key: str) -> int:
        value = self.kv.get(f"{self.arch}.{key}", 0)
        return int(value) if isinstance(value, (int, float)) else 0

    def capabilities(self) -> list[str]:
        caps = ["embedding" if f"{self.arch}.pooling_type" in self.kv else "completion"]
        if f"{self.arch}.vision.block_count" in self.kv:
            caps.append("vision")
        if self.template:
            if ".Tools" in self.template:
                caps.append("tools")
            if ".Suffix" in self.template:
                caps.append("insert")
        if self.projectors:
            caps.append("vision")
        if ".Think" in self.template:
            caps.append("thinking")
        return caps

    def details(self) -> dict[str, Any]:
        out = details(self.config)
        for key in ("context_length", "embedding_length"):
            if self.kv_int(key):
                out[key] = self.kv_int(key)
        return out


def details(config: dict[str, Any]) -> dict[str, Any]:
    """`api.ModelDetails` from a config blob (`model.ConfigV2`)."""
    return {
        "parent_model": "",
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": config.get("model_families"),
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.lock = threading.RLock()
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def manifests_list(self) -> list[LocalManifest]:
        out = []
        for path in sorted(self._manifest_paths()):
            name = Name(*path.relative_to(self.manifests).parts)
            if not path.is_file() or not name.is_valid():
                continue
            try:
                raw = path.read_bytes()
                data = json.loads(raw)
                mtime = path.stat().st_mtime_ns
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(LocalManifest(name, path, raw, data, mtime))
        return out

    def _manifest_paths(self) -> list[Path]:
        """``manifests/*/*/*/*``; a folder a delete removes meanwhile is skipped, as Ollama's
        listing does (``Path.glob`` raised, and ``/api/tags`` answered 500 during a delete)."""
        for _ in range(10):
            try:
                return list(self.manifests.glob("*/*/*/*"))
            except FileNotFoundError:
                continue
        return []

    def find(self, name: Name) -> LocalManifest | None:
        """The manifest for ``name``, matched case-insensitively."""
        exact = [m for m in self.manifests_list() if m.name.key() == name.key()]
        preferred = [m for m in exact if m.name == name]
        found = preferred or exact
        return found[0] if found else None

    def existing_name(self, name: Name) -> Name:
        """`getExistingName`: adopt, part by part, the casing of stored manifests."""
        host, ns, model, tag = name.path_parts()
        for m in self.manifests_list():
            e = m.name
            host = e.host if e.host.lower() == host.lower() else host
            ns = e.namespace if e.namespace.lower() == ns.lower() else ns
            model = e.model if e.model.lower() == model.lower() else model
            tag = e.tag if e.tag.lower() == tag.lower() else tag
        return Name(host, ns, model, tag)

    def write_manifest(self, name: Name, raw: bytes) -> None:
        with self.lock:
            existing = self.find(name)
            path = existing.path if existing else self.manifests.joinpath(*name.path_parts())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".tmp-{path.name}-{threading.get_ident()}"
            tmp.write_bytes(raw)
            os.replace(tmp, path)

    def copy(self, src: LocalManifest, dst: Name) -> None:
        with self.lock:
            path = self.manifests.joinpath(*dst.path_parts())
            if path == src.path:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(src.raw)

    def delete(self, manifest: LocalManifest) -> None:
        """Remove a manifest and every blob no other manifest references."""
        with self.lock:
            manifest.path.unlink(missing_ok=True)
            self._prune_dirs(manifest.path.parent)
            self.remove_unused(set(manifest.digests()))

    def remove_unused(self, digests: set[str]) -> None:
        with self.lock:
            in_use = {d for m in self.manifests_list() for d in m.digests()}
            for digest in digests - in_use:
                self.blob_path(digest).unlink(missing_ok=True)

    def _prune_dirs(self, directory: Path) -> None:
        while directory != self.manifests and self.manifests in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def prune_on_start(self) -> None:
        """Ollama ≥0.21's start-up prune: spares files modified within the last hour."""
        if os.environ.get("OLLAMA_NOPRUNE"):
            return
        in_use = {d.replace(":", "-") for m in self.manifests_list() for d in m.digests()}
        cutoff = time.time() - 3600
        for path in self.blobs.iterdir():
            with contextlib.suppress(OSError):
                if path.stat().st_mtime >= cutoff:
                    continue
                if not _BLOB_FILE_RE.fullmatch(path.name) or path.name not in in_use:
                    path.unlink()
        for directory in sorted(self.manifests.glob("**/"), key=lambda p: -len(p.parts)):
            self._prune_dirs(directory)

    def _text(self, layers: list[dict[str, Any]], kind: str) -> list[str]:
        out = []
        for layer in layers:
            if layer.get("mediaType") == MEDIA_PREFIX + kind:
                with contextlib.suppress(OSError):
                    out.append(self.blob_path(layer["digest"]).read_text("utf-8", "replace"))
        return out

    def config(self, manifest: LocalManifest) -> dict[str, Any] | None:
        """The decoded config blob; None when missing or unreadable."""
        digest = manifest.config.get("digest")
        if not digest:
            return {}
        try:
            value = json.loads(self.blob_path(digest).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def load(self, manifest: LocalManifest) -> LocalModel:
        """Read a model's parts; raises FileNotFoundError when a blob is missing."""
        layers = manifest.layers
        weights = [la for la in layers if la.get("mediaType") == MEDIA_PREFIX + "model"]
        if not weights:
            raise FileNotFoundError("model layer missing")
        weights_path = self.blob_path(weights[0]["digest"])
        config = self.config(manifest)
        if config is None:
            raise FileNotFoundError("config blob missing")
        params_text = self._text(layers, "params")
        return LocalModel(
            manifest=manifest,
            config=config,
            kv=read_gguf_kv(weights_path),
            weights_digest=weights[0]["digest"],
            weights_path=weights_path,
            weights_size=weights_path.stat().st_size,
            projectors=[
                self.blob_path(la["digest"])
                for la in layers
                if la.get("mediaType") == MEDIA_PREFIX + "projector"
            ],
            template=("".join(self._text(layers, "template"))),
            system="".join(self._text(layers, "system")),
            license=self._text(layers, "license"),
            params=json.loads(params_text[0]) if params_text else {},
        )
