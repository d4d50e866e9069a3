"""A stand-in for the Infernet control plane's node API (standard library plus coincurve).

    python -m tests.servers.controlplane_server --port 0 [--certfile PEM --keyfile PEM]

prints ``READY http://127.0.0.1:<port>`` (``https`` with a certificate) once it listens.
SIGTERM exits 0. Set ``CONTROLPLANE_TEST_SERVER_VERBOSE=1`` for request logs on stderr.

Node routes (signed POSTs, verified as ``packages/auth/src/signed-request.js`` and
``apps/web/lib/auth/verify-signed-request.js`` verify them): ``/api/v1/node/register``,
``/heartbeat``, ``/commands/poll``, ``/commands/<id>/progress``, ``/commands/<id>/complete``,
``/jobs/poll``, ``/jobs/<id>/events`` and ``/jobs/<id>/complete`` (``controlplane_jobs.py``).
This module checks the signature independently of the reconciler's client code, so a
mistake there can't be mirrored here.

Test routes (unsigned, never logged, never down): ``GET /_test/requests[?since=N]`` (the
log from entry ``N`` on, so a long test can fetch only what is new),
``GET /_test/nodes``, ``POST /_test/reset``,
``POST /_test/commands {pubkey, command, args, shape?}`` (shape "flat": polled as the seed's
``{id, type, model, issued_at}``), ``GET /_test/commands/<id>``,
``POST /_test/commands/<id>/cancel``,
``POST /_test/down {seconds|null, mode, interval, size}``, ``POST /_test/clock {offset}``,
``POST /_test/poll_limit {ignore}``; for jobs ``GET|POST /_test/jobs``, ``POST /_test/job_batch``,
``GET /_test/jobs/<id>``, ``GET /_test/jobs/<id>/events``, ``POST /_test/jobs/<id>/assign``,
``POST /_test/chats``, ``POST /_test/pick``, ``POST /_test/providers``,
``POST /_test/providers/update``, ``POST /_test/job_faults``, ``POST /_test/job_faults/clear``
and ``POST /_test/job_poll_limit {ignore}`` (see the harness methods).

Down modes (hostile peers included): ``503``; ``close`` (the connection dropped unanswered);
``garbage`` (200 with an HTML page); ``hang`` (wait out the period, then 503); ``trickle``
(the answer's bytes, headers first, one every ``interval`` seconds, 1.0 by default: a
slow-loris that never trips a per-read timeout); ``huge`` (200 JSON of ``size`` bytes, 400 MB
by default, streamed without a Content-Length). ``poll_limit {ignore: true}`` makes
``/commands/poll`` hand out every pending command whatever ``limit`` the node sent.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, unquote

from tests.servers import controlplane_jobs
from tests.servers.controlplane_jobs import DropConnection
from tests.servers.controlplane_store import ROLES, Refusal, Store

REPLAY_WINDOW_S = 60
NONCE_TTL_S = 2 * REPLAY_WINDOW_S
DOWN_MODES = ("503", "close", "garbage", "hang", "trickle", "huge")
VERBOSE = bool(os.environ.get("CONTROLPLANE_TEST_SERVER_VERBOSE"))
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_COMMAND_ROUTE = re.compile(r"^/api/v1/node/commands/([^/]+)/(progress|complete)$")
_JOB_ROUTE = re.compile(r"^/api/v1/node/jobs/([^/]*)/(events|complete)$")
# What Next.js answers for a route it doesn't have.
_NOT_FOUND_PAGE = (
    b"<!DOCTYPE html><html><body><h1>404</h1>This page could not be found.</body></html>"
)


class Auth(Exception):
    """A signature check failed: always 401."""


class ControlPlaneState:
    """The store plus the process-wide things the real server keeps: nonces, clock, faults."""

    def __init__(self) -> None:
        self.store = Store()
        self.nonces: dict[str, float] = {}  # nonce → expiry (ReplayCache)
        self.clock_offset = 0.0
        self.down_until: float | None = None
        self.down_mode = "503"
        self.trickle_interval = 1.0
        self.huge_size = 400_000_000

    def now(self) -> float:
        return time.time() + self.clock_offset

    def reset(self) -> None:
        with self.store.lock:
            self.store.reset()
            self.nonces.clear()
            self.clock_offset = 0.0
            self.down_until = None

    def down(self) -> str | None:
        if self.down_until is not None and time.monotonic() < self.down_until:
            return self.down_mode
        return None

    def verify(self, method: str, path: str, body: bytes, header: str | None) -> str:
        """``verifySignedNextRequest``: the verified pubkey, or :class:`Auth` with the reason."""
        if not header:
            raise Auth("missing X-Infernet-Auth header")
        try:
            padded = header + "=" * (-len(header) % 4)
            env = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))
        except (ValueError, UnicodeError, binascii.Error) as exc:
            raise Auth(f"invalid X-Infernet-Auth envelope: {exc}") from None
        if not isinstance(env, dict) or env.get("v") != 1 or isinstance(env.get("v"), bool):
            raise Auth(
                f"unsupported envelope version: {env.get('v') if isinstance(env, dict) else None}"
            )
        pubkey, created_at = env.get("pubkey"), env.get("created_at")
        nonce, sig = env.get("nonce"), env.get("sig")
        if not isinstance(pubkey, str) or not _HEX64.match(pubkey):
            raise Auth("envelope pubkey must be 64 hex chars")
        if not isinstance(created_at, int | float) or isinstance(created_at, bool):
            raise Auth("envelope created_at must be a number")
        if not isinstance(nonce, str) or not nonce:
            raise Auth("envelope nonce must be a non-empty string")
        if not isinstance(sig, str) or len(sig) != 128:
            raise Auth("envelope sig must be a 128-char hex string")
        skew = abs(int(self.now()) - created_at)
        if skew > REPLAY_WINDOW_S:
            raise Auth(f"timestamp outside replay window (skew={skew:g}s)")
        created = int(created_at) if float(created_at).is_integer() else created_at
        canonical = "\n".join(
            [method.upper(), path, str(created), nonce, hashlib.sha256(body).hexdigest()]
        )
        if not schnorr_verify(hashlib.sha256(canonical.encode("utf-8")).digest(), sig, pubkey):
            raise Auth("signature verification failed")
        with self.store.lock:
            wall = time.time()
            if self.nonces.get(nonce, 0.0) > wall:
                raise Auth("nonce already used")
            self.nonces[nonce] = wall + NONCE_TTL_S
        return pubkey


def schnorr_verify(digest: bytes, sig_hex: str, pubkey_hex: str) -> bool:
    """``@noble/curves`` ``schnorr.verify`` semantics: anything malformed is just False."""
    from coincurve import PublicKeyXOnly

    try:
        return bool(
            PublicKeyXOnly(bytes.fromhex(pubkey_hex)).verify(bytes.fromhex(sig_hex), digest)
        )
    except (ValueError, TypeError):
        return False


STATE = ControlPlaneState()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "controlplane-test"
    # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK
    # adds ~40 ms to every request, which real servers (Go's net/http) never do.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if VERBOSE:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._run()

    def do_POST(self) -> None:
        self._run()

    def _run(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            if self.path.startswith("/_test/"):
                self._send(200, self._test_route(self.path, raw))
            else:
                self._node_route(raw)
        except Refusal as refusal:
            self._send(refusal.status, {"error": str(refusal)})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            sys.stderr.write(f"{self.command} {self.path}: {traceback.format_exc()}\n")
            self._send(500, {"error": f"test server bug: {exc!r}"})

    def _send(self, status: int, payload: Any, *, raw: bytes | None = None, kind: str = "") -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # node API ----------------------------------------------------------------------------------

    def _node_route(self, raw: bytes) -> None:
        entry: dict[str, Any] = {"method": self.command, "path": self.path, "pubkey": None}
        try:
            entry["body"] = json.loads(raw) if raw else None
        except ValueError:
            entry["body"] = None
        entry["raw"] = raw.decode("utf-8", "replace")
        mode = STATE.down()
        if mode is not None:
            self._answer_down(mode, entry)
            return
        status, payload = 200, None
        try:
            handler = self._route()
            if self.command != "POST":
                raise Refusal(405, "method not allowed")
            try:
                entry["pubkey"] = STATE.verify(
                    self.command, self.path, raw, self.headers.get("X-Infernet-Auth")
                )
            except Auth as exc:
                raise Refusal(401, str(exc)) from None
            payload = {"data": handler(entry["pubkey"], _json_body(raw))}
            if self.path.split("?", 1)[0] == "/api/v1/node/jobs/poll":
                # Which jobs this answer carried: when each job reached the node (benchmarks).
                entry["jobs"] = [job["id"] for job in payload["data"]["jobs"]]
        except Refusal as refusal:
            status, payload = refusal.status, {"error": str(refusal)}
        except DropConnection as drop:  # a job-route fault: no answer at all
            STATE.store.log({**entry, "status": 0, "error": str(drop)})
            self.close_connection = True
            self.connection.shutdown(2)
            return
        # Logged before answering: a client that reads the log right after its answer must
        # find its own request there.
        STATE.store.log({**entry, "status": status, "error": (payload or {}).get("error")})
        if status == 404 and payload == {"error": "page not found"}:
            self._send(404, None, raw=_NOT_FOUND_PAGE, kind="text/html; charset=utf-8")
        else:
            self._send(status, payload)

    def _route(self) -> Callable[[str, dict[str, Any]], Any]:
        path = self.path.split("?", 1)[0]
        store = STATE.store
        if path == "/api/v1/node/register":
            return lambda pubkey, body: store.register(_role(body), pubkey, body)
        if path == "/api/v1/node/heartbeat":
            return lambda pubkey, body: store.heartbeat(_role(body), pubkey, body)
        if path == "/api/v1/node/commands/poll":
            return lambda pubkey, body: store.poll(pubkey, body.get("limit"))
        if path == "/api/v1/node/jobs/poll":
            return lambda pubkey, body: store.jobs.poll(pubkey, *_present(body, "limit"))
        job = _JOB_ROUTE.match(path)
        if job:
            job_id, verb = unquote(job.group(1)), job.group(2)
            if verb == "events":
                return lambda pubkey, body: store.jobs.emit(pubkey, job_id, body.get("events"))
            return lambda pubkey, body: store.jobs.complete(pubkey, job_id, body)
        match = _COMMAND_ROUTE.match(path)
        if match:
            command_id, verb = unquote(match.group(1)), match.group(2)
            if verb == "progress":
                return lambda pubkey, body: store.progress(pubkey, command_id, body.get("progress"))
            return lambda pubkey, body: store.complete(
                pubkey, command_id, str(body.get("status") or "").strip(), body
            )
        raise Refusal(404, "page not found")

    def _answer_down(self, mode: str, entry: dict[str, Any]) -> None:
        if mode == "close":
            STATE.store.log({**entry, "status": 0, "error": "connection closed (down)"})
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if mode == "hang" and STATE.down_until is not None:
            time.sleep(max(0.0, min(STATE.down_until - time.monotonic(), 30.0)))
        if mode == "trickle":
            self._trickle(entry)
            return
        if mode == "huge":
            self._huge(entry)
            return
        if mode == "garbage":
            STATE.store.log({**entry, "status": 200, "error": "garbage (down)"})
            self._send(
                200, None, raw=b"<html><body>Welcome to nginx!</body></html>", kind="text/html"
            )
            return
        STATE.store.log({**entry, "status": 503, "error": "down"})
        self._send(503, {"error": "control plane unavailable (test: down)"})

    def _trickle(self, entry: dict[str, Any]) -> None:
        """A 503 whose every byte, status line first, comes ``trickle_interval`` s apart."""
        STATE.store.log({**entry, "status": 503, "error": "trickle (down)"})
        body = b'{"error":"control plane unavailable (test: trickle)"}'
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.close_connection = True
        try:
            for byte in head + body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(STATE.trickle_interval)
        except OSError:
            pass  # the client gave up, as it should

    def _huge(self, entry: dict[str, Any]) -> None:
        """200 JSON of ``huge_size`` bytes, streamed with no Content-Length (read to close)."""
        STATE.store.log({**entry, "status": 200, "error": "huge (down)"})
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        start, end = b'{"data":{"commands":[],"pad":"', b'"}}'
        pad = STATE.huge_size - len(start) - len(end)
        block = b"x" * (1 << 16)
        try:
            self.wfile.write(start)
            while pad > 0:
                self.wfile.write(block[: min(pad, len(block))])
                pad -= len(block)
            self.wfile.write(end)
        except OSError:
            pass  # the client stopped reading, as it should

    # test controls -----------------------------------------------------------------------------

    def _test_route(self, path: str, raw: bytes) -> Any:
        body = _json_body(raw)
        store = STATE.store
        if path.startswith(("/_test/job", "/_test/chats", "/_test/providers", "/_test/pick")):
            return controlplane_jobs.test_route(store.jobs, self.command, path, body)
        path, _, query = path.partition("?")
        if path == "/_test/requests":
            since = parse_qs(query).get("since", ["0"])[0]
            return store.log_copy(int(since) if since.isdigit() else 0)
        if path == "/_test/nodes":
            return store.nodes()
        if path == "/_test/reset":
            STATE.reset()
            return {}
        if path == "/_test/commands":
            args, shape = body.get("args") or {}, str(body.get("shape") or "")
            return {"id": store.enqueue(body["pubkey"], body["command"], args, shape)}
        if path == "/_test/down":
            seconds, mode = body.get("seconds"), body.get("mode", "503")
            if mode not in DOWN_MODES:
                raise Refusal(400, f"mode must be one of {DOWN_MODES}")
            STATE.down_mode = mode
            STATE.trickle_interval = float(body.get("interval") or 1.0)
            STATE.huge_size = int(body.get("size") or 400_000_000)
            STATE.down_until = None if seconds is None else time.monotonic() + float(seconds)
            return {}
        if path == "/_test/poll_limit":
            store.ignore_poll_limit = bool(body.get("ignore"))
            return {}
        if path == "/_test/clock":
            STATE.clock_offset = float(body.get("offset", 0))
            return {}
        parts = path.split("/")  # ["", "_test", "commands", id, ...]
        if len(parts) >= 4 and parts[2] == "commands":
            if len(parts) == 5 and parts[4] == "cancel":
                return store.cancel(parts[3])
            return store.command(parts[3])
        raise Refusal(404, f"no test route {path}")


def _json_body(raw: bytes) -> dict[str, Any]:
    """``parseJsonBody``: empty is ``{}``, anything unparsable is 400."""
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8", "replace"))
    except ValueError as exc:
        raise Refusal(400, f"invalid JSON body: {exc}") from None
    return value if isinstance(value, dict) else {}


def _present(body: dict[str, Any], key: str) -> tuple[Any, ...]:
    """``(body[key],)`` or ``()``: JavaScript tells a missing field from a null one."""
    return (body[key],) if key in body else ()


def _role(body: dict[str, Any]) -> str:
    role = body["role"].lower() if isinstance(body.get("role"), str) else None
    if role not in ROLES:
        raise Refusal(400, f"role must be one of: {', '.join(ROLES)}")
    return role


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", help="PEM with the server's key and certificate chain")
    parser.add_argument("--keyfile", help="PEM with the key, when not in --certfile")
    args = parser.parse_args(argv)

    server = Server(("127.0.0.1", args.port), Handler)
    scheme = "http"
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
