"""Observing Ollama is three JSON reads that ``parse`` reads as the server wrote them (the
``ollama`` client, whose pydantic models used to vet them, is no longer on that path): an
answer that is not Ollama's shape is a one-line backend error, never an exception that escapes.
A server on loopback answers each case exactly as written here."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from reconciler.backends.ollama.backend import OllamaBackend
from reconciler.backends.ollama.settings import OllamaSettings
from reconciler.errors import BackendError

pytestmark = pytest.mark.integration

GOOD_TAGS = {"models": [{"model": "a:1", "digest": "sha256:" + "0" * 64, "size": 10}]}
GOOD_PS: dict[str, Any] = {"models": []}


class Answers:
    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}

    def set(self, path: str, value: Any) -> None:
        self.bodies[path] = value if isinstance(value, bytes) else json.dumps(value).encode()


@pytest.fixture
def server() -> Iterator[tuple[str, Answers]]:
    answers = Answers()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = answers.bodies.get(self.path, b"{}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answers
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def ollama(server: tuple[str, Answers]) -> Iterator[OllamaBackend]:
    """The backend pointed at ``server``, its connections closed after the test."""
    backend = OllamaBackend(OllamaSettings(url=server[0]))
    try:
        yield backend
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("tags", "ps"),
    [
        ([1, 2], GOOD_PS),  # not an object
        ({"models": "abc"}, GOOD_PS),  # a string where the list goes
        ({"models": [{"model": "a:1", "size": "big"}]}, GOOD_PS),
        (GOOD_TAGS, {"models": [["x"]]}),
        (b"<html>not json</html>", GOOD_PS),
    ],
)
def test_a_listing_that_is_not_ollamas_is_an_unreachable_backend(
    server: tuple[str, Answers], ollama: OllamaBackend, tags: Any, ps: Any
) -> None:
    url, answers = server
    answers.set("/api/tags", tags)
    answers.set("/api/ps", ps)
    state = ollama.inventory()
    assert not state.reachable
    assert state.error and url in state.error and "\n" not in state.error


def test_a_good_listing_reads_without_the_ollama_client(
    server: tuple[str, Answers], ollama: OllamaBackend
) -> None:
    _url, answers = server
    answers.set("/api/tags", GOOD_TAGS)
    answers.set("/api/ps", GOOD_PS)
    state = ollama.inventory()
    assert "_client" not in ollama.__dict__  # observing made no ollama client
    assert state.reachable and [m.name for m in state.installed] == ["a:1"]


@pytest.mark.parametrize(
    "show",
    [
        {"model_info": [1, 2]},
        {"details": "x", "model_info": {}},
        {"capabilities": 5},
        b"not json",
        ["a list"],
    ],
)
def test_a_show_that_is_not_ollamas_is_a_backend_error(
    server: tuple[str, Answers], ollama: OllamaBackend, show: Any
) -> None:
    server[1].set("/api/show", show)
    with pytest.raises(BackendError) as caught:
        ollama.details("a:1", None)
    assert "a:1" in str(caught.value) and "\n" not in str(caught.value)
