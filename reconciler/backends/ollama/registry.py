"""Reading the Ollama registry before a pull: manifest, config blob, bytes still missing.

Ollama itself exposes no "what would this pull fetch" call, so we ask the registry the way
Ollama does (``GET /v2/<ns>/<model>/manifests/<tag>``, then the small config blob) and ask the
Ollama server which of the layer blobs it already has (``HEAD /api/blobs/<digest>``). That gives
exact download bytes and the quantization before a single weight byte moves. The weights blob's
GGUF header (layer count, heads, context) is range-read from its first MiBs, as Ollama's own
downloader range-requests parts of it.

The registry is a peer like any other: its answers are read under a deadline and a cap
(``reconciler.httpsafe``: the client passed in keeps them), a manifest or config blob that
isn't what the format says is one line naming the registry, and its error pages are never
quoted (the message goes to the heartbeat and to the dashboard that sent a command).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import httpx

from reconciler import httpsafe
from reconciler.backends import ranged
from reconciler.backends.ollama.names import DEFAULT_HOST, OllamaName
from reconciler.errors import (
    BackendError,
    BackendUnreachable,
    ModelNotFound,
    TransientBackendError,
)

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
WEIGHTS_MEDIA = "application/vnd.ollama.image.model"
PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Layer:
    """One blob of a manifest."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """A parsed registry manifest plus its config blob."""

    digest: str  # hex sha256 of the manifest bytes, as /api/tags reports after a pull
    layers: tuple[Layer, ...]  # config blob included (last), as Ollama downloads it
    config: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        """Bytes on disk once pulled: every layer plus the config blob."""
        return sum(layer.size for layer in self.layers)

    @property
    def weights_bytes(self) -> int:
        """The GGUF weights (and a vision projector, which loads with them)."""
        media = (WEIGHTS_MEDIA, PROJECTOR_MEDIA)
        return sum(layer.size for layer in self.layers if layer.media_type in media)


def registry_base(name: OllamaName, default_registry: str) -> str:
    """The registry URL for ``name``: the configured one for the default host."""
    if name.host.lower() == DEFAULT_HOST:
        return default_registry.rstrip("/")
    return f"{name.scheme}://{name.host}"


def parse_manifest(raw: bytes, config_raw: bytes | None) -> Manifest:
    """Turn the registry's manifest bytes (and config blob bytes) into a ``Manifest``.

    ``ValueError`` (with what is wrong) when either is not what the format says.
    """
    try:
        doc = json.loads(raw)
        layers = [
            Layer(str(item.get("mediaType", "")), str(item["digest"]), _size(item["size"]))
            for item in doc.get("layers") or []
        ]
        cfg = doc.get("config") or {}
        if cfg.get("digest"):
            layers.append(
                Layer(str(cfg.get("mediaType", "")), str(cfg["digest"]), _size(cfg["size"]))
            )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"the manifest is not a valid image manifest ({_why(exc)})") from None
    try:
        config = json.loads(config_raw) if config_raw else {}
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"its config blob is not JSON ({_why(exc)})") from None
    return Manifest(
        digest=hashlib.sha256(raw).hexdigest(),
        layers=tuple(layers),
        config=config if isinstance(config, dict) else {},
    )


def fetch_manifest(http: httpx.Client, name: OllamaName, registry: str) -> Manifest:
    """GET the manifest and config blob; ``ModelNotFound`` when the registry lacks the tag."""
    base = registry_base(name, registry)
    shown = httpsafe.redact(base)
    url = f"{base}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
    try:
        resp = http.get(url, headers={"Accept": MANIFEST_ACCEPT})
        if resp.status_code == 404:
            raise ModelNotFound(
                f"model '{name.display}' is not in the registry {shown} "
                "(check the name and tag on ollama.com/library)",
                model=name.display,
            )
        if resp.status_code >= 400:
            # The status only: the registry's page is not ours to repeat to anyone.
            raise TransientBackendError(
                f"registry {shown} answered HTTP {resp.status_code} for {name.display}",
                model=name.display,
            )
        raw = resp.content
        config_raw: bytes | None = None
        cfg = _config_ref(raw)
        if cfg is not None:
            blob = f"{base}/v2/{name.namespace}/{name.model}/blobs/{cfg}"
            cresp = http.get(blob, follow_redirects=True)
            if cresp.status_code < 400:
                config_raw = cresp.content
        return parse_manifest(raw, config_raw)
    except httpx.TimeoutException as exc:
        raise TransientBackendError(
            f"the registry {shown} did not answer for {name.display} in time ({exc}); will retry",
            model=name.display,
        ) from exc
    except httpsafe.BodyRefused as exc:
        raise BackendError(f"registry {shown}, {name.display}: {exc}", model=name.display) from exc
    except httpx.TransportError as exc:
        raise BackendUnreachable(
            f"can't reach the registry {shown} for {name.display}: "
            f"{httpsafe.redact(str(exc)) or type(exc).__name__}; "
            "check the network or backends.ollama.registry",
            model=name.display,
        ) from exc
    except ValueError as exc:  # garbage from a proxy or captive portal, or a broken registry
        raise BackendError(
            f"registry {shown} sent an unreadable answer for {name.display}: {exc}",
            model=name.display,
        ) from exc


def _config_ref(raw: bytes) -> str | None:
    """The config blob's digest named by a manifest, if it names one it can be fetched by."""
    try:
        doc = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return None  # parse_manifest says what is wrong
    cfg = doc.get("config") if isinstance(doc, dict) else None
    digest = cfg.get("digest") if isinstance(cfg, dict) else None
    if not isinstance(digest, str) or not digest.replace(":", "").isalnum():
        return None
    return digest


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a layer size of {str(value)[:20]!r}")
    return value


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


def missing_bytes(http: httpx.Client, ollama_url: str, manifest: Manifest) -> int:
    """Bytes of the manifest's blobs that the Ollama server doesn't have yet."""
    missing = 0
    seen: set[str] = set()
    for layer in manifest.layers:
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        resp = http.head(f"{ollama_url.rstrip('/')}/api/blobs/{layer.digest}")
        if resp.status_code != 200:
            missing += layer.size
    return missing


def fetch_gguf_header(
    http: httpx.Client,
    name: OllamaName,
    registry: str,
    layer: Layer,
    *,
    limit: int = 8 * MiB,
    first: int = 256 * 1024,
) -> dict[str, Any]:
    """The VRAM-relevant GGUF metadata of a weights blob, from a ranged GET of its prefix.

    Reads ``first`` bytes and doubles up to ``limit`` while the metadata is cut short and the
    keys the estimate needs are still missing; gives back what was read by then. Empty when
    the registry refuses the blob; ``NotGGUF`` for a blob that is not GGUF; transport errors
    propagate (the caller treats all of these as "no header").
    """
    base = registry_base(name, registry)
    url = f"{base}/v2/{name.namespace}/{name.model}/blobs/{layer.digest}"
    return ranged.fetch_gguf_metadata(http, url, size=layer.size, limit=limit, first=first)
