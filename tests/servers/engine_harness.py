"""Drive the fake engine (``fake_engine.py``) from pytest: its test routes, or a process.

The product starts engines itself through its command template; a test that knows such an
engine's URL uses :class:`EngineControl` on it. :func:`start_fake_engine` runs one directly
(for the stand-in's own tests).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.servers.ready import Closing, ServerStartError

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 10.0


class EngineControl(Closing):
    """The fake engine's ``/_test/`` routes (404 on a real vLLM)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        self._http.request(method, self.url + path, json=body).raise_for_status()

    def set_chat(
        self,
        *,
        token_delay: float | None = None,
        reply_tokens: int | None = None,
        finish_style: str | None = None,
    ) -> None:
        """Seconds before each token; an exact reply length (0: the echo's); ``vllm``/``openai``."""
        body: dict[str, Any] = {}
        if token_delay is not None:
            body["token_delay"] = token_delay
        if reply_tokens is not None:
            body["reply_tokens"] = reply_tokens
        if finish_style is not None:
            body["finish_style"] = finish_style
        self._call("POST", "/_test/chat", body)

    def chat_fault(
        self,
        kind: str,
        after_tokens: int = 0,
        *,
        seconds: float | None = None,
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """``error`` (an error event, then [DONE]), ``cut`` or ``stall`` after some tokens."""
        body: dict[str, Any] = {"kind": kind, "after_tokens": after_tokens, "times": times}
        if seconds is not None:
            body["seconds"] = seconds
        if message is not None:
            body["message"] = message
        self._call("POST", "/_test/faults", body)

    def clear_faults(self) -> None:
        self._call("DELETE", "/_test/faults")


class FakeEngine(EngineControl):
    """A fake engine process serving ``name`` from a folder with a ``config.json``."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        super().__init__(url)
        self.proc = proc
        self.log = log

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.proc.wait()
        finally:
            super().close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_fake_engine(
    tmp_dir: Path,
    name: str = "tiny-instruct",
    *,
    max_model_len: int = 4096,
    env: dict[str, str] | None = None,
) -> FakeEngine:
    """Start ``python -m tests.servers.fake_engine serve`` on a free port; wait for /health."""
    folder = tmp_dir / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": max_model_len}))
    port = _free_port()
    log = tmp_dir / "fake-engine.log"
    args = [
        sys.executable,
        "-m",
        "tests.servers.fake_engine",
        "serve",
        str(folder),
        "--served-model-name",
        name,
        "--port",
        str(port),
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )
    engine = FakeEngine(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if engine._http.get(engine.url + "/health", timeout=1.0).status_code == 200:
                return engine
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            engine.close()
            raise ServerStartError(f"fake engine did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)
