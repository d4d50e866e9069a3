"""Start and stop the Ollama test server as a real subprocess from pytest.

    with start_ollama_server(tmp_path, DEFAULT_CATALOGUE) as server:
        client = ollama.Client(server.url)
        ...

The child runs ``sys.executable -m tests.servers.ollama_server`` from the repository root with
the parent's environment minus every inherited ``OLLAMA_*`` variable, plus ``env``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.servers.ready import Closing, ServerStartError, read_ready_line

REPO_ROOT = Path(__file__).resolve().parents[2]

_TOOLS = ["completion", "tools"]
DEFAULT_CATALOGUE: dict[str, Any] = {
    "models": {
        "qwen2.5:0.5b": {
            "family": "qwen2",
            "parameter_count": 494_032_768,
            "quantization": "Q4_K_M",
            "file_type": 15,
            "weights_size": 160_000,
            "context_length": 32768,
            "block_count": 24,
            "head_count": 14,
            "head_count_kv": 2,
            "embedding_length": 896,
            "capabilities": _TOOLS,
            "aliases": ["qwen2.5:latest"],
        },
        "llama3.2:1b": {
            "family": "llama",
            "parameter_count": 1_235_814_432,
            "quantization": "Q4_K_M",
            "file_type": 15,
            "weights_size": 180_000,
            "context_length": 131072,
            "block_count": 16,
            "head_count": 32,
            "head_count_kv": 8,
            "embedding_length": 2048,
            "capabilities": _TOOLS,
        },
        "llama3.2:1b-instruct-q8_0": {
            "family": "llama",
            "parameter_count": 1_235_814_432,
            "quantization": "Q8_0",
            "file_type": 7,
            "weights_size": 200_000,
            "context_length": 131072,
            "block_count": 16,
            "head_count": 32,
            "head_count_kv": 8,
            "embedding_length": 2048,
            "capabilities": _TOOLS,
        },
        "smollm2:135m": {
            "family": "llama",
            "parameter_count": 134_515_008,
            "quantization": "F16",
            "file_type": 1,
            "weights_size": 120_000,
            "context_length": 8192,
            "block_count": 30,
            "head_count": 9,
            "head_count_kv": 3,
            "embedding_length": 576,
            "capabilities": _TOOLS,
        },
        "all-minilm:latest": {
            "family": "bert",
            "parameter_count": 22_565_376,
            "params": "23M",
            "quantization": "F16",
            "file_type": 1,
            "weights_size": 60_000,
            "context_length": 512,
            "block_count": 6,
            "head_count": 12,
            "head_count_kv": 12,
            "embedding_length": 384,
            "capabilities": ["embedding"],
        },
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M": {
            "family": "llama",
            "parameter_count": 1_235_814_432,
            "quantization": "Q4_K_M",
            "file_type": 15,
            "weights_size": 150_000,
            "context_length": 131072,
            "block_count": 16,
            "head_count": 32,
            "head_count_kv": 8,
            "embedding_length": 2048,
            "capabilities": _TOOLS,
        },
    }
}


class OllamaServer(Closing):
    """A running test server; see the module docstring."""

    def __init__(
        self,
        tmp_dir: Path,
        catalogue: dict[str, Any],
        *,
        vram_bytes: int | None = None,
        bandwidth: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp_dir = tmp_dir
        self.models_dir = tmp_dir / "models"
        self.catalogue_path = tmp_dir / "catalogue.json"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.catalogue_path.write_text(json.dumps(catalogue, indent=1))
        self.vram_bytes = vram_bytes
        self.bandwidth = bandwidth
        self.env = dict(env or {})
        self.url = ""
        self.registry_url = ""
        self._ports = (0, 0)
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._stderr_path = tmp_dir / "ollama-server.stderr"
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    # lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        args = [
            sys.executable,
            "-m",
            "tests.servers.ollama_server",
            "--port",
            str(self._ports[0]),
            "--registry-port",
            str(self._ports[1]),
            "--models-dir",
            str(self.models_dir),
            "--catalogue",
            str(self.catalogue_path),
        ]
        if self.vram_bytes is not None:
            args += ["--vram-bytes", str(self.vram_bytes)]
        if self.bandwidth is not None:
            args += ["--bandwidth", str(self.bandwidth)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
        env.update(self.env)
        self._starts += 1
        self._stderr_path = self.tmp_dir / f"ollama-server-{self._starts}.stderr"
        with self._stderr_path.open("wb") as stderr:
            self._proc = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr
            )
        line = self._read_ready()
        parts = line.split()
        if len(parts) != 3 or parts[0] != "READY":
            self.kill()
            raise ServerStartError(f"unexpected first line {line!r}\n{self.stderr()}")
        self.url, self.registry_url = parts[1], parts[2]
        self._ports = (int(self.url.rsplit(":", 1)[1]), int(self.registry_url.rsplit(":", 1)[1]))

    def _read_ready(self) -> str:
        assert self._proc is not None
        return read_ready_line(
            self._proc, what="Ollama test server", stderr=self.stderr, give_up=self.kill
        )

    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def _finish(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and wait."""
        self._finish(signal.SIGTERM, 5.0)

    def kill(self) -> None:
        """SIGKILL and wait: no clean-up runs in the server."""
        self._finish(signal.SIGKILL, 5.0)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same ports and models directory."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._http.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # test controls ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, self.url + path, json=body)
        resp.raise_for_status()
        return resp.json()

    def requests(self) -> list[dict[str, Any]]:
        """Requests seen on the Ollama port since the last reset: ``{method, path, body}``."""
        result: list[dict[str, Any]] = self._call("GET", "/_test/requests")
        return result

    def registry_requests(self) -> list[dict[str, Any]]:
        """Requests seen by the registry: ``{method, path, range, user_agent}``."""
        result: list[dict[str, Any]] = self._call("GET", "/_test/registry")
        return result

    def reset_requests(self) -> None:
        self._call("POST", "/_test/reset")

    def fault(
        self,
        model: str,
        kind: str,
        after_bytes: int = 0,
        *,
        times: int | None = None,
        rate: int | None = None,
    ) -> None:
        """Make pulls of ``model`` misbehave (until cleared, or for the next ``times`` pulls)."""
        body: dict[str, Any] = {"model": model, "kind": kind, "after_bytes": after_bytes}
        if times is not None:
            body["times"] = times
        if rate is not None:
            body["rate"] = rate
        self._call("POST", "/_test/faults", body)

    def clear_faults(self) -> None:
        """Clear pull faults and chat faults."""
        self._call("DELETE", "/_test/faults")

    def chat_fault(
        self,
        model: str,
        kind: str,
        after_tokens: int = 0,
        *,
        seconds: float | None = None,
        message: str | None = None,
        times: int | None = None,
    ) -> None:
        """Make ``/api/chat`` answers of ``model`` (``*``: any) misbehave after some tokens.

        ``kind``: ``chat_error`` (a ``{"error": message}`` line; a 500 before the first
        token or without streaming), ``chat_cut`` (the connection closes: no done line),
        ``chat_stall`` (nothing for ``seconds``, 5 by default, then the rest). It lasts
        until :meth:`clear_faults`, or for the next ``times`` chats of that model.
        """
        body: dict[str, Any] = {"model": model, "kind": kind, "after_tokens": after_tokens}
        if seconds is not None:
            body["seconds"] = seconds
        if message is not None:
            body["message"] = message
        if times is not None:
            body["times"] = times
        self._call("POST", "/_test/faults", body)

    def set_chat(
        self,
        *,
        token_delay: float | None = None,
        reply_tokens: int | None = None,
        model: str = "*",
    ) -> None:
        """Seconds between streamed tokens, and an exact reply length (0: the echo's own).

        For ``model`` only, or for every model (``*``); ``reset_chat()`` restores the
        start-up values (``OLLAMA_TEST_TOKEN_DELAY``, ``OLLAMA_TEST_REPLY_TOKENS``).
        """
        body: dict[str, Any] = {"model": model}
        if token_delay is not None:
            body["token_delay"] = token_delay
        if reply_tokens is not None:
            body["reply_tokens"] = reply_tokens
        self._call("POST", "/_test/chat", body)

    def reset_chat(self) -> None:
        self._call("POST", "/_test/chat", {"reset": True})

    def bump_upstream(self, model: str) -> dict[str, str]:
        """Publish new weights for ``model`` (and its aliases); returns the new digests."""
        result: dict[str, str] = self._call(
            "POST", "/_test/upstream", {"model": model, "bump": True}
        )
        return result

    def add_upstream(self, model: str, spec: dict[str, Any]) -> dict[str, str]:
        result: dict[str, str] = self._call(
            "POST", "/_test/upstream", {"model": model, "add": spec}
        )
        return result

    def remove_upstream(self, model: str) -> None:
        self._call("POST", "/_test/upstream", {"model": model, "remove": True})

    def evict(self, model: str) -> bool:
        """Unload ``model``'s runner as memory pressure would; False when none was loaded."""
        return bool(self._call("POST", "/_test/evict", {"model": model})["evicted"])


def start_ollama_server(
    tmp_dir: Path,
    catalogue: dict[str, Any],
    *,
    vram_bytes: int | None = None,
    bandwidth: int | None = None,
    env: dict[str, str] | None = None,
) -> OllamaServer:
    """Start the server and wait for READY (10 s); the caller stops it (or uses ``with``)."""
    server = OllamaServer(tmp_dir, catalogue, vram_bytes=vram_bytes, bandwidth=bandwidth, env=env)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
