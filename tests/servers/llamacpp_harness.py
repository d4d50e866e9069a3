"""Run a real llama.cpp ``llama-server`` in router mode from pytest.

    write_tiny_gguf(models_dir / "tiny-a.gguf", name="tiny-a")
    with start_router(tmp_path, models_dir) as router:
        router.load("tiny-a")
        router.wait_status("tiny-a", "loaded")
        router.models()            # GET /models "data"
        router.children()          # the child llama-server processes (psutil), one per model

The binary comes from :func:`tests.servers.llamabuild.build` (``INFERNET_LLAMA_SERVER``
overrides it). A cold build takes minutes, far past pytest's 120 s timeout: run
``python -m tests.servers.llamabuild`` once before the tests.

Each start gets the test defaults of ``../../../shared/reference/llamacpp-router.md`` P11 (every
one but ``--models-max`` is inherited by the children), an empty ``LLAMA_CACHE`` under ``tmp``
so the Hugging Face cache is never listed (P4), and no inherited ``LLAMA_ARG_*`` variables.
Router output goes to a log file under ``tmp``; the children's lines are in it, prefixed with
their port. ``close()`` (and leaving the ``with`` block, also on a failing test) leaves no
process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.servers import llamabuild, sse
from tests.servers.ready import Closing

HEALTH_DEADLINE_S = 20.0
STOP_TIMEOUT_S = 5.0
TEST_ARGS = (
    "-c",
    "256",
    "-np",
    "1",
    "-t",
    "1",
    "-tb",
    "1",
    "--no-warmup",
    "--cache-ram",
    "0",
    "--no-webui",
)
_PR_SET_CHILD_SUBREAPER = 36
_BIND_FAILED = "couldn't bind"
_LOG_TAIL = 4000


class RouterStartError(RuntimeError):
    """The router exited or did not answer ``GET /health`` 200 in time."""


def free_port() -> int:
    """A loopback port that was free a moment ago (the caller retries if it was taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def alias_of(proc: psutil.Process) -> str | None:
    """The ``--alias`` argument of a child llama-server (the model id), or None."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "--alias":
            return cmdline[i + 1]
    return None


def _become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process so that they can be reaped here.

    Without it, children of a SIGKILLed router stay zombies until init gets round to them
    (1 to 5 s in CI sandboxes), which would make "no process left" checks flaky.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _reap(procs: Sequence[psutil.Process], timeout: float) -> None:
    """SIGKILL whatever of ``procs`` is still alive, then wait until each is gone."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    deadline = time.monotonic() + timeout
    me = os.getpid()
    for proc in procs:
        while time.monotonic() < deadline:
            try:
                if proc.ppid() == me:
                    os.waitpid(proc.pid, 0)
                    break
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break  # dead; only its parent (not us) can reap it
            except (psutil.NoSuchProcess, ChildProcessError):
                break
            time.sleep(0.01)


class Router(Closing):
    """A llama-server router process; see the module docstring."""

    def __init__(
        self,
        tmp_dir: Path,
        models_dir: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        models_max: int = 4,
        binary: Path | None = None,
    ) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = tmp_dir
        self.models_dir = models_dir
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})
        self.models_max = models_max
        self.binary = binary or llamabuild.build()
        self.cache_dir = tmp_dir / "llama-cache"
        self.cache_dir.mkdir(exist_ok=True)
        self.port = 0
        self.url = ""
        self.log_path = tmp_dir / "llama-router.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    # lifecycle ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def args(self) -> list[str]:
        return [
            str(self.binary),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--models-dir",
            str(self.models_dir),
            "--models-max",
            str(self.models_max),
            *TEST_ARGS,
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start (again: on the same port) and wait for ``GET /health`` 200."""
        if self._proc is not None:
            raise RuntimeError("the router is already running")
        fixed = self.port != 0
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self._spawn()
            try:
                self._wait_healthy()
                return
            except RouterStartError:
                if fixed or _BIND_FAILED not in self.log():
                    raise
        raise RouterStartError(f"no free port for the router\n{self._tail()}")

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        env["LLAMA_CACHE"] = str(self.cache_dir)
        env.update(self.env)
        self._starts += 1
        self.log_path = self.tmp_dir / f"llama-router-{self._starts}.log"
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.tmp_dir,
            )

    def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc.wait()
                self._proc = None
                raise RouterStartError(f"llama-server exited with {code}:\n{self._tail()}")
            with contextlib.suppress(httpx.TransportError):
                if self._http.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise RouterStartError(
                    f"llama-server did not answer /health in {HEALTH_DEADLINE_S:g} s:\n"
                    + self._tail()
                )
            time.sleep(0.01)

    def log(self) -> str:
        """Everything the current (or last) run wrote, children's lines included."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def _tail(self) -> str:
        return self.log()[-_LOG_TAIL:]

    def children(self) -> list[psutil.Process]:
        """The router's child llama-server processes (one per running model, ``--alias`` = id)."""
        if self._proc is None:
            return []
        try:
            kids = psutil.Process(self._proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [kid for kid in kids if alias_of(kid) is not None]

    def child(self, model: str) -> psutil.Process | None:
        """The child serving ``model``, if one is running."""
        return next((kid for kid in self.children() if alias_of(kid) == model), None)

    def stop(self) -> int | None:
        """SIGTERM (the router stops its children), wait; SIGKILL after 5 s. The exit code."""
        return self._finish(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL the router, as a crash would, and reap its children. The exit code."""
        return self._finish(signal.SIGKILL)

    def _finish(self, sig: int) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        if kids and sig == signal.SIGKILL:
            _become_subreaper()
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        # After SIGTERM the router has reaped its children; after SIGKILL they exit on stdin
        # EOF within ~50 ms. Either way, make sure none outlives this call.
        _reap(kids, STOP_TIMEOUT_S)
        return code

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._http.close()

    # API helpers -------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to the router, e.g. ``request("POST", "/v1/chat/completions", json=...)``."""
        return self._http.request(method, self.url + path, **kwargs)

    def chat_stream(
        self,
        model: str,
        messages: list[dict[str, Any]] | None = None,
        **body: Any,
    ) -> tuple[httpx.Response, list[Any]]:
        """A streamed ``/v1/chat/completions``, read to the end: (response, SSE events).

        Events are the decoded ``data:`` payloads, ``"[DONE]"`` last (see ``sse.py``); a
        non-200 answer gives no events (its body is read). Each call uses a fresh
        connection: the router sometimes closes a kept-alive connection right after a
        streamed answer, and the next request on it fails with "Server disconnected without
        sending a response" (README, llama.cpp pitfalls).
        """
        payload = {
            "model": model,
            "messages": messages or [{"role": "user", "content": "hi"}],
            "stream": True,
        } | body
        with httpx.Client(base_url=self.url, timeout=30.0, trust_env=False) as client:
            return sse.stream_chat(client, "/v1/chat/completions", payload)

    def models(self, *, reload: bool = False) -> list[dict[str, Any]]:
        """``GET /models`` (``?reload=1`` rescans the models directory) → its ``data`` list."""
        resp = self.request("GET", "/models", params={"reload": "1"} if reload else None)
        resp.raise_for_status()
        data: list[dict[str, Any]] = resp.json()["data"]
        return data

    def model(self, model: str) -> dict[str, Any] | None:
        return next((m for m in self.models() if m["id"] == model), None)

    def load(self, model: str) -> httpx.Response:
        """``POST /models/load``: 200 means spawned, not loaded (P6); see :meth:`wait_status`."""
        return self.request("POST", "/models/load", json={"model": model})

    def unload(self, model: str) -> httpx.Response:
        return self.request("POST", "/models/unload", json={"model": model})

    def wait_status(
        self, model: str, value: str = "loaded", *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll ``GET /models`` until ``model``'s ``status.value`` is ``value``; its entry.

        ``value="failed"`` waits for a failed load (``status.failed``). Raises AssertionError
        with the router log's tail when the model fails instead, or on timeout.
        """

        def matches(entry: dict[str, Any]) -> bool:
            status = entry["status"]
            return bool(status.get("failed")) if value == "failed" else status["value"] == value

        return self._wait(model, matches, f"status {value!r}", timeout)

    def _wait(
        self,
        model: str,
        matches: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        entry: dict[str, Any] | None = None
        while True:
            entry = self.model(model)
            if entry is not None:
                if matches(entry):
                    return entry
                if entry["status"].get("failed") and "failed" not in what:
                    raise AssertionError(f"{model} failed to load: {entry}\n{self._tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{model} never reached {what}: {entry}\n{self._tail()}")
            time.sleep(0.01)


def start_router(
    tmp: Path,
    models_dir: Path,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    models_max: int = 4,
    binary: Path | None = None,
) -> Router:
    """Start a router on a free loopback port and wait for /health (20 s); use it with ``with``."""
    router = Router(
        tmp, models_dir, extra_args=extra_args, env=env, models_max=models_max, binary=binary
    )
    try:
        router.start()
    except BaseException:
        router.close()
        raise
    return router
