"""Start the local Hugging Face Hub (``hub_server.py``) as a real subprocess from pytest.

    write_repo_file(root, "acme/tiny-GGUF", "tiny-Q4_K_M.gguf", data)
    with start_hub_server(tmp_path, root, token="hf_test") as hub:
        hf_hub_download("acme/tiny-GGUF", "tiny-Q4_K_M.gguf", endpoint=hub.url, cache_dir=...)
        hub.requests()                                   # what the client asked for
        hub.fault("*/tiny-Q4_K_M.gguf", "cut", after_bytes=100_000)

``huggingface_hub`` reads ``HF_ENDPOINT`` (and ``HF_HOME``, ``HF_HUB_DISABLE_XET``…) once, at
import: in-process tests pass ``endpoint=hub.url``; a subprocess gets ``hub.client_env(home)``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.servers.ready import Closing, ServerStartError, read_ready_line

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_repo_file(
    root: Path, repo_id: str, path: str, data: bytes, *, revision: str = "main"
) -> Path:
    """Publish ``data`` as ``path`` in ``repo_id`` at ``revision`` (atomically); its file."""
    target = root / repo_id / revision / path
    target.parent.mkdir(parents=True, exist_ok=True)
    # The server ignores dot-names, so the file appears whole or not at all.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def gate_repo(root: Path, repo_id: str, mode: str = "auto") -> None:
    """Mark ``repo_id`` gated: its files need a bearer token (the server's ``token``)."""
    folder = root / repo_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gated").write_text(mode)


class HubServer(Closing):
    """A running local Hub; every method but the lifecycle ones calls its test routes."""

    def __init__(
        self,
        tmp_dir: Path,
        root: Path,
        *,
        token: str | None = None,
        files_dir: Path | None = None,
    ) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = tmp_dir
        self.root = root
        self.token = token
        self.files_dir = files_dir or root / "_files"
        self.url = ""
        self._port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = tmp_dir / "hub-server.stderr"
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    def start(self) -> None:
        """Start (again: on the same port) and wait for READY."""
        args = [
            sys.executable,
            "-m",
            "tests.servers.hub_server",
            "--port",
            str(self._port),
            "--root",
            str(self.root),
            "--files-dir",
            str(self.files_dir),
        ]
        if self.token is not None:
            args += ["--token", self.token]
        with self._stderr_path.open("ab") as stderr:
            self._proc = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=dict(os.environ),
            )
        parts = read_ready_line(
            self._proc, what="hub test server", stderr=self.stderr, give_up=self.stop
        ).split()
        if len(parts) != 2 or parts[0] != "READY":
            self.stop()
            raise ServerStartError(f"unexpected first line {parts!r}\n{self.stderr()}")
        self.url = parts[1]
        self._port = int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._http.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def file_url(self, path: str) -> str:
        """The plain ``https://``-style URL of ``files_dir / path``."""
        return f"{self.url}/files/{path}"

    def client_env(self, hf_home: Path) -> dict[str, str]:
        """Environment for a subprocess whose ``huggingface_hub`` must use only this Hub."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        )
        return env

    # test controls -----------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, self.url + path, json=body)
        resp.raise_for_status()
        return resp.json()

    def requests(self) -> list[dict[str, Any]]:
        """Requests since the last reset, oldest first.

        Each is ``{method, path (with the query), range (the Range header or None), status
        (0: none sent), bytes (body bytes sent), auth (an Authorization header was sent),
        user_agent, fault (the kinds applied, comma-separated, or None), time (epoch s)}``.
        """
        result: list[dict[str, Any]] = self._call("GET", "/_test/requests")
        return result

    def reset(self) -> None:
        """Forget the requests and clear every fault."""
        self._call("POST", "/_test/reset")

    def fault(
        self,
        path: str,
        kind: str,
        after_bytes: int = 0,
        *,
        times: int | None = None,
        rate: int | None = None,
        status: int | None = None,
        method: str | None = None,
        message: str | None = None,
    ) -> int:
        """Make requests whose decoded path matches ``path`` (fnmatch) misbehave; the fault id.

        ``cut`` closes the connection after ``after_bytes`` of the body; ``error`` answers
        ``status`` (500) with ``{"error": message}``; ``slow`` sends at ``rate`` bytes/s;
        ``stall`` stops after ``after_bytes`` until :meth:`clear_faults`. Hostile sources:
        ``grow`` sends ``after_bytes`` more than the file (HEAD stays truthful), ``short`` only
        ``after_bytes`` of it, both ending cleanly without a Content-Length; ``trickle`` sends
        headers one byte every ``1/rate`` s, forever. ``cut`` and ``error`` apply once unless
        ``times`` says otherwise; the others until cleared. ``method`` limits ``error`` to one
        method (``HEAD`` or ``GET``); body faults act on GETs only.
        """
        body: dict[str, Any] = {"path": path, "kind": kind, "after_bytes": after_bytes}
        if times is not None:
            body["times"] = times
        if rate is not None:
            body["rate"] = rate
        if status is not None:
            body["status"] = status
        if method is not None:
            body["method"] = method
        if message is not None:
            body["message"] = message
        return int(self._call("POST", "/_test/faults", body)["id"])

    def clear_faults(self) -> None:
        self._call("DELETE", "/_test/faults")


def start_hub_server(
    tmp: Path,
    root: Path,
    *,
    token: str | None = None,
    files_dir: Path | None = None,
) -> HubServer:
    """Start the Hub and wait for READY (10 s); the caller closes it (or uses ``with``)."""
    server = HubServer(tmp, root, token=token, files_dir=files_dir)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
