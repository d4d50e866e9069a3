"""An Ollama-compatible test server with a fake registry, for integration tests.

Run from the repository root::

    python -m tests.servers.ollama_server --port 0 --registry-port 0 \\
        --models-dir DIR --catalogue FILE.json [--vram-bytes N] [--bandwidth BYTES_PER_S] \\
        [--version 0.33.0-rc2]

It serves the Ollama API on ``--port`` and a registry on ``--registry-port`` (both on
127.0.0.1), then prints ``READY <api url> <registry url>``. SIGTERM stops it cleanly.
Behaviour follows ``shared/reference/ollama-api.md``; ``/_test/...`` routes (404 on a real
Ollama) let tests read the request log, inject registry faults, change upstream manifests and
evict runners.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.servers import ollama_api as api
from tests.servers.ollama_api import ApiHandler, State
from tests.servers.ollama_catalogue import Catalogue
from tests.servers.ollama_chat import CHAT_FAULT_KINDS, DEFAULT_ERROR, ChatFault
from tests.servers.ollama_chat import ModelKey as ChatModelKey
from tests.servers.ollama_download import DownloadManager
from tests.servers.ollama_gojson import env_keep_alive
from tests.servers.ollama_http import Route, Server, route
from tests.servers.ollama_names import parse_name
from tests.servers.ollama_pull import Puller
from tests.servers.ollama_registry import FAULT_KINDS, Fault, Registry, RegistryHandler
from tests.servers.ollama_scheduler import Scheduler
from tests.servers.ollama_store import Store

DEFAULT_VERSION = "0.33.0-rc2"
DEFAULT_VRAM = 24 * (1 << 30)

_request_log: list[dict[str, Any]] = []
_log_lock = threading.Lock()


def _test_body(h: ApiHandler) -> dict[str, Any] | None:
    try:
        value = json.loads(h.body or b"{}")
    except ValueError as e:
        h.reply_error(400, f"bad JSON: {e}")
        return None
    if not isinstance(value, dict):
        h.reply_error(400, "expected a JSON object")
        return None
    return value


def _test_requests(h: ApiHandler) -> None:
    with _log_lock:
        h.reply_json(200, list(_request_log))


def _test_registry_requests(h: ApiHandler) -> None:
    h.reply_json(200, h.state.registry.requests())


def _test_reset(h: ApiHandler) -> None:
    with _log_lock:
        _request_log.clear()
    h.state.registry.reset()
    h.reply_json(200, {"status": "ok"})


def _chat_key(h: ApiHandler, body: dict[str, Any]) -> tuple[bool, ChatModelKey]:
    """The model a chat control is for: (False, None) after a 400, (True, None) for all."""
    text = str(body.get("model") or "*")
    if text == "*":
        return True, None
    name = parse_name(text)
    if not name.is_valid():
        h.reply_error(400, f"invalid model name {text!r}")
        return False, None
    return True, name.repo_key()


def _test_set_chat_fault(h: ApiHandler, body: dict[str, Any]) -> None:
    ok, key = _chat_key(h, body)
    if not ok:
        return
    times = body.get("times")
    fault = ChatFault(
        key=key,
        kind=str(body["kind"]),
        after_tokens=int(body.get("after_tokens") or 0),
        seconds=float(body.get("seconds") or 5.0),
        message=str(body.get("message") or DEFAULT_ERROR),
        times=None if times is None else int(times),
    )
    h.state.chat.set_fault(fault)
    h.reply_json(200, {"status": "ok"})


def _test_chat(h: ApiHandler) -> None:
    """``{"model"?: name or "*", "token_delay"?: s, "reply_tokens"?: n}``; ``{"reset": true}``."""
    body = _test_body(h)
    if body is None:
        return
    if body.get("reset"):
        h.state.chat.reset_settings()
        h.reply_json(200, {"status": "ok"})
        return
    ok, key = _chat_key(h, body)
    if ok:
        h.state.chat.configure(key, body)
        h.reply_json(200, {"status": "ok"})


def _test_set_fault(h: ApiHandler) -> None:
    body = _test_body(h)
    if body is None:
        return
    kind = body.get("kind")
    if kind in CHAT_FAULT_KINDS:
        _test_set_chat_fault(h, body)
        return
    name = parse_name(str(body.get("model", "")))
    if kind not in FAULT_KINDS or not name.is_valid():
        kinds = ", ".join(FAULT_KINDS + CHAT_FAULT_KINDS)
        h.reply_error(400, f"need a valid model and kind in {kinds}")
        return
    times = body.get("times")
    fault = Fault(
        key=name.repo_key(),
        kind=str(kind),
        after_bytes=int(body.get("after_bytes") or 0),
        times=None if times is None else int(times),
        rate=int(body.get("rate") or 50_000),
    )
    h.state.registry.set_fault(fault)
    h.reply_json(200, {"status": "ok"})


def _test_clear_faults(h: ApiHandler) -> None:
    h.state.registry.clear_faults()
    h.state.chat.clear_faults()
    h.reply_json(200, {"status": "ok"})


def _test_upstream(h: ApiHandler) -> None:
    """Change the registry: ``bump`` (new weights), ``remove``, or ``add`` a model spec."""
    body = _test_body(h)
    if body is None:
        return
    catalogue = h.state.registry.catalogue
    text = str(body.get("model", ""))
    if isinstance(body.get("add"), dict):
        entry = catalogue.add(text, body["add"])
    else:
        found = catalogue.resolve_name(text)
        if found is None:
            h.reply_error(404, f"model {text!r} is not in the catalogue")
            return
        entry = found
        if body.get("remove"):
            entry.removed = True
            h.reply_json(200, {"status": "removed"})
            return
    built = catalogue.bump(entry) if body.get("bump") else catalogue.build(entry)
    h.reply_json(200, {"digest": built.digest, "weights": built.weights_digest})


def _test_evict(h: ApiHandler) -> None:
    body = _test_body(h)
    if body is None:
        return
    name = parse_name(str(body.get("model", "")))
    manifest = h.state.store.find(name) if name.is_valid() else None
    weights = None
    if manifest is not None:
        model = api.load_model(h.state, manifest)
        weights = model.weights_digest if model else None
    evicted = h.state.scheduler.evict(name.display_shortest(), weights)
    h.reply_json(200, {"evicted": evicted})


def _r(method: str, path: str, fn: Any) -> Route:
    return (method, re.compile(path), fn)


ROUTES: list[Route] = [
    _r("HEAD", "/", api.root),
    _r("GET", "/", api.root),
    _r("HEAD", "/api/version", api.version),
    _r("GET", "/api/version", api.version),
    _r("POST", "/api/pull", api.pull),
    _r("POST", "/api/push", api.not_implemented),
    _r("HEAD", "/api/tags", api.tags),
    _r("GET", "/api/tags", api.tags),
    _r("POST", "/api/show", api.show),
    _r("DELETE", "/api/delete", api.delete),
    _r("POST", "/api/me", api.not_implemented),
    _r("POST", "/api/signout", api.not_implemented),
    _r("POST", "/api/create", api.not_implemented),
    _r("POST", "/api/blobs/([^/]+)", api.create_blob),
    _r("HEAD", "/api/blobs/([^/]+)", api.head_blob),
    _r("POST", "/api/copy", api.copy),
    _r("GET", "/api/ps", api.ps),
    _r("POST", "/api/generate", api.generate),
    _r("POST", "/api/chat", api.chat),
    _r("POST", "/api/embed", api.embed),
    _r("POST", "/api/embeddings", api.embeddings),
    _r("POST", "/v1/chat/completions", api.not_implemented),
    _r("POST", "/v1/completions", api.not_implemented),
    _r("POST", "/v1/embeddings", api.not_implemented),
    _r("GET", "/v1/models", api.openai_models),
    _r("GET", "/v1/models/([^/]+)", api.not_implemented),
    _r("GET", "/_test/requests", _test_requests),
    _r("GET", "/_test/registry", _test_registry_requests),
    _r("POST", "/_test/reset", _test_reset),
    _r("POST", "/_test/faults", _test_set_fault),
    _r("DELETE", "/_test/faults", _test_clear_faults),
    _r("POST", "/_test/upstream", _test_upstream),
    _r("POST", "/_test/evict", _test_evict),
    _r("POST", "/_test/chat", _test_chat),
]


def _host_check(header: str) -> str:
    """`allowedHostsMiddleware` for a loopback listener: "ip", "name" (allowed) or "deny"."""
    host = header
    match = re.fullmatch(r"\[([^\]]*)\](?::\d*)?|([^:]*)(?::\d*)?", header)
    if match:
        host = match.group(1) if match.group(1) is not None else match.group(2) or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        host = host.lower()
        allowed = host in ("", "localhost", socket.gethostname().lower()) or host.endswith(
            (".localhost", ".local", ".internal")
        )
        return "name" if allowed else "deny"
    return "ip" if addr.is_loopback or addr.is_private or addr.is_unspecified else "deny"


class OllamaHandler(ApiHandler):
    def dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        if not path.startswith("/_test/"):
            self._record(path)
        check = _host_check(self.headers.get("Host", ""))
        if check == "deny":
            self.reply(403)
            return
        if check == "name" and self.command == "OPTIONS":
            self.reply(204)
            return
        route(ROUTES, self)

    def _record(self, path: str) -> None:
        body: Any = None
        if self.body:
            try:
                body = json.loads(self.body)
            except ValueError:
                body = self.body.decode("utf-8", "replace")
        with _log_lock:
            _request_log.append(
                {"method": self.command, "path": path, "body": body, "time": time.time()}
            )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.servers.ollama_server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--registry-port", type=int, default=0)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--catalogue", type=Path, required=True)
    p.add_argument("--vram-bytes", type=int, default=DEFAULT_VRAM)
    p.add_argument("--bandwidth", type=int, default=0, help="bytes/s per download; 0: unlimited")
    p.add_argument("--version", default=DEFAULT_VERSION)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    registry = Registry(Catalogue.from_file(args.catalogue))
    store = Store(args.models_dir)
    store.prune_on_start()
    registry_handler = type(
        "BoundRegistryHandler", (RegistryHandler,), {"server_registry": registry}
    )
    registry_server = Server(("127.0.0.1", args.registry_port), registry_handler)
    registry_url = f"http://127.0.0.1:{registry_server.server_address[1]}"
    downloads = DownloadManager(args.bandwidth, f"ollama/{args.version} (amd64 linux) Go/go1.24.6")
    scheduler = Scheduler(args.vram_bytes, env_keep_alive(os.environ.get("OLLAMA_KEEP_ALIVE")))
    state = State(
        version=args.version,
        store=store,
        scheduler=scheduler,
        registry=registry,
        downloads=downloads,
        puller=Puller(store, downloads, registry, registry_url),
    )
    api_handler = type("BoundOllamaHandler", (OllamaHandler,), {"state": state})
    api_server = Server(("127.0.0.1", args.port), api_handler)
    servers = (api_server, registry_server)
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY http://127.0.0.1:{api_server.server_address[1]} {registry_url}", flush=True)
    while not stop.wait(0.5):
        pass
    stoppers = [threading.Thread(target=s.shutdown) for s in servers]
    stoppers.append(threading.Thread(target=downloads.shutdown))
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    scheduler.stop()
    for server in servers:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
