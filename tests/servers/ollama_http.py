"""HTTP plumbing shared by the Ollama stand-in and its fake registry (standard library only)."""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers.ollama_names import go_json

VERBOSE = bool(os.environ.get("OLLAMA_TEST_SERVER_VERBOSE"))
JSON_TYPE = "application/json; charset=utf-8"


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


def log(message: str) -> None:
    if VERBOSE:
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler with body reading, JSON replies, chunked streams and disconnect checks."""

    protocol_version = "HTTP/1.1"
    body: bytes = b""
    # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK
    # adds ~40 ms to every request, which real servers (Go's net/http) never do.
    disable_nagle_algorithm = True
    responded = False

    # Go's net/http sends no Server header.
    def send_response(self, code: int, message: str | None = None) -> None:
        self.log_request(code)
        self.responded = True
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def log_message(self, format: str, *args: Any) -> None:
        log(f"{self.address_string()} {format % args}")

    def dispatch(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        self.responded = False
        try:
            self.body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        try:
            self.dispatch()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:
            sys.stderr.write(f"{self.command} {self.path}: {traceback.format_exc()}\n")
            self.close_connection = True
            if not self.responded:
                self.reply_error(500, f"test server bug: {e!r}")

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = do_PATCH = do_OPTIONS = _run  # noqa: N815

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(
        self,
        status: int,
        body: bytes = b"",
        ctype: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def reply_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self.reply(status, go_json(value), JSON_TYPE, headers)

    def reply_error(self, status: int, message: str) -> None:
        self.reply_json(status, {"error": message})

    def start_chunked(self, status: int, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> bool:
        """Send one chunk; False when the client has gone."""
        if self.command == "HEAD" or not data:
            return True
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except OSError:
            self.close_connection = True
            return False
        return True

    def end_chunked(self) -> None:
        if self.command == "HEAD":
            return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def client_gone(self) -> bool:
        """True once the peer has closed its end (checked without consuming data)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return peeked == b""
        except (BlockingIOError, InterruptedError):
            return False
        except (OSError, ValueError):
            return True


Route = tuple[str, re.Pattern[str], Callable[..., None]]


def route(routes: list[Route], handler: Handler) -> None:
    """Dispatch like gin: exact routes, trailing-slash redirects, text 405 and 404."""
    path = handler.path.split("?", 1)[0]
    allowed = []
    for method, pattern, fn in routes:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        if method == handler.command:
            fn(handler, *match.groups())
            return
        allowed.append(method)
    if path != "/":
        other = path[:-1] if path.endswith("/") else path + "/"
        if any(m == handler.command and p.fullmatch(other) for m, p, _ in routes):
            code = 301 if handler.command == "GET" else 307
            handler.reply(code, b"", None, {"Location": other})
            return
    if allowed:
        handler.reply(405, b"405 method not allowed", "text/plain", {"Allow": ", ".join(allowed)})
        return
    handler.reply(404, b"404 page not found", "text/plain")
