"""The fake registry: docker-distribution-style manifests and blobs, a CDN, injected faults.

Manifests are served as text/plain without Content-Length, blobs answer 307 to the CDN path
``/_cdn/sha256:<hex>`` on the same server, which serves bytes with ``Range`` support. The host
part of a name plays no role: this registry stands in for every host.

Faults (set through the Ollama port's ``/_test/faults``) act where a real outage would:
``not_found`` and ``requires`` on the manifest, the others on the weights blob's bytes at the CDN.
A fault lasts until cleared, or, with ``times=N``, until the (N+1)-th pull of that model starts.
Hostile registries: ``trickle`` sends the manifest one byte every ``1/rate`` seconds;
``huge_config`` serves the config blob as ``after_bytes`` bytes (64 MiB when 0) with no
Content-Length; ``bad_config`` serves it as an HTML page, not JSON.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from tests.servers.ollama_catalogue import Catalogue
from tests.servers.ollama_http import Handler, Route, route
from tests.servers.ollama_names import Name

FAULT_KINDS = (
    "stall",
    "error_mid",
    "not_found",
    "requires",
    "digest_mismatch",
    "slow",
    "trickle",
    "huge_config",
    "bad_config",
)
BLOB_FAULTS = ("stall", "error_mid", "digest_mismatch", "slow")
CONFIG_FAULTS = ("huge_config", "bad_config")
REQUIRES_TEXT = (
    "\nThe model you are attempting to pull requires a newer version of Ollama.\n\n"
    "Please download the latest version at:\n\n\thttps://ollama.com/download\n\n"
)
_CHUNK = 16 * 1024


@dataclass
class Fault:
    key: tuple[str, str, str]
    kind: str
    after_bytes: int = 0
    times: int | None = None
    rate: int = 50_000
    pulls: int = 0


def version_key(text: str) -> tuple[int, int, int, int, str]:
    """Order versions like semver: a pre-release sorts before its release."""
    core, _, pre = text.strip().lstrip("v").partition("-")
    nums = [int(n) if n.isdigit() else 0 for n in core.split(".")[:3]]
    nums += [0] * (3 - len(nums))
    return nums[0], nums[1], nums[2], 0 if pre else 1, pre


class Registry:
    """State of the fake registry: the catalogue, active faults and a request log."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._lock = threading.Lock()
        self._faults: dict[tuple[str, str, str], Fault] = {}
        self.log: list[dict[str, Any]] = []

    def set_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults[fault.key] = fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def begin_pull(self, name: Name) -> None:
        """Count a pull of ``name`` against a limited fault; expire it when spent."""
        with self._lock:
            fault = self._faults.get(name.repo_key())
            if fault is None or fault.times is None:
                return
            if fault.pulls >= fault.times:
                del self._faults[fault.key]
            else:
                fault.pulls += 1

    def active(self, fault: Fault) -> bool:
        with self._lock:
            return self._faults.get(fault.key) is fault

    def manifest_fault(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            fault = self._faults.get(key)
        return fault.kind if fault and fault.kind not in BLOB_FAULTS else None

    def blob_fault(self, digest: str) -> Fault | None:
        with self._lock:
            faults = [f for f in self._faults.values() if f.kind in BLOB_FAULTS]
        for fault in faults:
            entry = self.catalogue.resolve(*fault.key)
            if entry is not None and self.catalogue.build(entry).weights_digest == digest:
                return fault
        return None

    def config_fault(self, digest: str) -> Fault | None:
        """The fault on the model whose config blob is ``digest``, if any."""
        with self._lock:
            faults = [f for f in self._faults.values() if f.kind in CONFIG_FAULTS]
        for fault in faults:
            entry = self.catalogue.resolve(*fault.key)
            if entry is None:
                continue
            manifest = json.loads(self.catalogue.build(entry).manifest)
            if manifest["config"]["digest"] == digest:
                return fault
        return None

    def trickle(self, key: tuple[str, str, str]) -> Fault | None:
        with self._lock:
            fault = self._faults.get(key)
        return fault if fault is not None and fault.kind == "trickle" else None

    def record(self, handler: Handler) -> None:
        with self._lock:
            self.log.append(
                {
                    "method": handler.command,
                    "path": handler.path,
                    "range": handler.headers.get("Range"),
                    "user_agent": handler.headers.get("User-Agent"),
                }
            )

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.log)

    def reset(self) -> None:
        with self._lock:
            self.log.clear()


def _registry_error(handler: Handler, status: int, code: str, message: str) -> None:
    handler.reply_json(status, {"errors": [{"code": code, "message": message}]})


def _ua_version(handler: Handler) -> str | None:
    agent = handler.headers.get("User-Agent", "")
    match = re.match(r"ollama/([0-9][^ ]*)", agent)
    return match.group(1) if match else None


def _manifest(handler: RegistryHandler, ns: str, model: str, tag: str) -> None:
    reg = handler.server_registry
    entry = reg.catalogue.resolve(ns, model, tag)
    kind = reg.manifest_fault((ns.lower(), model.lower(), tag.lower()))
    if entry is None or kind == "not_found":
        _registry_error(handler, 404, "MANIFEST_UNKNOWN", "manifest unknown")
        return
    requires = entry.spec.get("requires")
    client = _ua_version(handler)
    too_old = bool(requires and client and version_key(client) < version_key(str(requires)))
    if kind == "requires" or too_old:
        handler.reply(412, REQUIRES_TEXT.encode(), "text/plain; charset=utf-8")
        return
    built = reg.catalogue.build(entry)
    headers = {
        "Docker-Content-Digest": f"sha256:{built.digest}",
        "Ollama-Content-Digest": built.digest,
        "Ollama-Push-Time": str(int(time.time())),
    }
    handler.start_chunked(200, "text/plain; charset=utf-8", headers)
    trickle = reg.trickle((ns.lower(), model.lower(), tag.lower()))
    if trickle is not None:  # a slow-loris registry: every byte its own chunk, far apart
        for byte in built.manifest:
            time.sleep(1 / max(trickle.rate, 1))
            if not handler.write_chunk(bytes([byte])):
                return
        handler.end_chunked()
        return
    if handler.write_chunk(built.manifest):
        handler.end_chunked()


def _blob(handler: RegistryHandler, _ns: str, _model: str, digest: str) -> None:
    if handler.server_registry.catalogue.blob(digest) is None:
        _registry_error(handler, 404, "BLOB_UNKNOWN", "blob unknown to registry")
        return
    host = handler.headers.get("Host") or "127.0.0.1"
    handler.reply(307, b"", None, {"Location": f"http://{host}/_cdn/{digest}"})


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or match.group(1) == "":
        return None
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    return start, min(end, size - 1)


def _cdn(handler: RegistryHandler, digest: str) -> None:
    reg = handler.server_registry
    data = reg.catalogue.blob(digest)
    if data is None:
        handler.reply(404, b"NoSuchKey", "text/plain")
        return
    config_fault = reg.config_fault(digest)
    if config_fault is not None:
        _bad_config(handler, config_fault)
        return
    size = len(data)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{digest[7:39]}"'}
    status, start, end = 200, 0, size - 1
    if handler.headers.get("Range"):
        parsed = _parse_range(handler.headers.get("Range"), size)
        if parsed is None or parsed[0] > parsed[1]:
            handler.reply(416, b"", None, {"Content-Range": f"bytes */{size}"})
            return
        status, (start, end) = 206, parsed
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    handler.send_response(status)
    handler.send_header("Content-Type", "application/octet-stream")
    for key, value in headers.items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(end - start + 1))
    handler.end_headers()
    if handler.command == "HEAD":
        return
    _send_blob(handler, data, start, end + 1, reg.blob_fault(digest))


def _bad_config(handler: RegistryHandler, fault: Fault) -> None:
    """A config blob from a hostile or broken registry."""
    if fault.kind == "bad_config":
        handler.reply(200, b"<html><body>Welcome to nginx!</body></html>", "text/html")
        return
    handler.start_chunked(200, "application/octet-stream")
    left = fault.after_bytes or 64 << 20
    block = b'{"pad":"' + b"x" * (1 << 16)
    while left > 0:
        if not handler.write_chunk(block[: min(left, len(block))]):
            return
        left -= len(block)
    handler.end_chunked()


def _send_blob(
    handler: RegistryHandler, data: bytes, pos: int, stop: int, fault: Fault | None
) -> None:
    reg = handler.server_registry
    while pos < stop:
        n = min(_CHUNK, stop - pos)
        if fault is not None and not reg.active(fault):
            fault = None
        if fault is not None and pos + n > fault.after_bytes:
            if pos < fault.after_bytes:
                n = fault.after_bytes - pos
            elif fault.kind == "error_mid":
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            elif fault.kind == "stall":
                if handler.client_gone():
                    handler.close_connection = True
                    return
                time.sleep(0.05)
                continue
            elif fault.kind == "slow":
                n = min(n, max(1, fault.rate // 20))
                time.sleep(n / fault.rate)
        chunk = data[pos : pos + n]
        if fault is not None and fault.kind == "digest_mismatch" and pos >= fault.after_bytes:
            chunk = bytes(b ^ 0xFF for b in chunk)
        try:
            handler.wfile.write(chunk)
        except OSError:
            handler.close_connection = True
            return
        pos += n


def _root(handler: RegistryHandler) -> None:
    handler.reply_json(200, {})


ROUTES: list[Route] = []
for _method in ("GET", "HEAD"):
    ROUTES += [
        (_method, re.compile(r"/v2/?"), _root),
        (_method, re.compile(r"/v2/([^/]+)/([^/]+)/manifests/([^/]+)"), _manifest),
        (_method, re.compile(r"/v2/([^/]+)/([^/]+)/blobs/(sha256:[0-9a-f]{64})"), _blob),
        (_method, re.compile(r"/_cdn/(sha256:[0-9a-f]{64})"), _cdn),
    ]


class RegistryHandler(Handler):
    server_registry: Registry

    def dispatch(self) -> None:
        self.server_registry.record(self)
        route(ROUTES, self)
