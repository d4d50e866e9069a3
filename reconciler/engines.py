"""Engine processes for vLLM, SGLang and MAX: one detached OpenAI-compatible server per model.

Mechanism only, no planner knowledge: start an engine from a command template, find it again
from its record in the state folder (from any later infernet process), tell whether it runs
and lists its served name on ``GET /v1/models``, stop it. What this is built on:

* an engine must outlive the ``infernet apply`` that started it, so a tiny launcher forks it
  into a session of its own and exits at once: no infernet process is ever its parent, and
  the CLI and the daemon see the same thing;
* the engine runs as the foreground child of ``/bin/sh``, the session and process-group
  leader, which waits for it and writes its exit status to ``<name>.exit``: a later process
  learns the exit code of an engine it never parented;
* a recorded PID is ours only while its create time is the recorded one (PIDs are reused);
  when the shell is gone but engine processes survive it, they are known by the run id in
  their environment (``INFERNET_ENGINE_RUN``);
* a port answered by a process infernet did not start is observed, never signalled.

Files in the folder (created 0700), per engine: ``<name>.json`` (the record), ``<name>.log``
(stdout and stderr, appended across restarts) and ``<name>.exit``; ``<name>`` is the key made
safe for a file name plus a hash of the key.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import psutil

from reconciler import httpsafe
from reconciler._files import write_atomically
from reconciler.errors import BackendError
from reconciler.model import ENGINE_COMMANDS

# The engines' documented command lines live with the settings they default (``backends.hf``).
DEFAULT_COMMANDS = ENGINE_COMMANDS
PLACEHOLDERS = ("path", "advertise_as", "served_name", "port", "fraction", "host", "python")

EngineState = Literal["starting", "ready", "exited", "stopped", "foreign"]

RUN_ENV = "INFERNET_ENGINE_RUN"
KEY_ENV = "INFERNET_ENGINE_KEY"
PORT_SCAN = 200
PROBE_TIMEOUT = 2.0
LOCK_TIMEOUT = 60.0
KILL_GRACE = 10.0
LOG_ROTATE_BYTES = 64 << 20
_TAIL_BYTES = 64 << 10
_SAME_PROCESS = 0.01  # seconds: create times of one process read twice agree far closer

# Forks the engine's shell into a new session, prints its PID, and stays (so the child can't
# be reaped and its PID reused) until the caller has read the create time and closes stdin.
_LAUNCHER = """\
import os, signal, sys
pid = os.fork()
if pid == 0:
    try:
        os.setsid()
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(2, 1)
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
print(pid, flush=True)
sys.stdin.read()
"""

# A trapped signal waits for the foreground child, so a TERM sent to the group reaches the
# engine, and the shell still records how it ended.
_WRAPPER = """\
exitfile=$1
shift
trap : HUP INT TERM
"$@"
code=$?
(umask 077; printf '%s\\n' "$code" >"$exitfile")
echo "[infernet] engine exited with code $code" >&2
exit "$code"
"""


@dataclass(frozen=True)
class EngineSpec:
    """What to run: ``command`` is a template over ``PLACEHOLDERS``; ``port`` None = pick one."""

    key: str
    kind: str
    command: str
    path: str
    served_name: str
    fraction: float
    port: int | None = None
    env: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class EngineStatus:
    """One engine as found now; ``exit_code`` is the shell's ``$?`` (128+N: killed by signal N)."""

    key: str
    served_name: str
    pid: int | None
    port: int
    state: EngineState
    started_at: float
    exit_code: int | None
    log_path: str
    restarts: int
    ours: bool
    url: str
    spec: EngineSpec


@dataclass(frozen=True)
class _Record:
    spec: EngineSpec
    pid: int  # the shell: session and process-group leader
    create_time: float
    run: str
    port: int
    command: tuple[str, ...]
    started_at: float
    restarts: int
    log_offset: int  # where this run's output starts in the log

    def to_json(self) -> bytes:
        spec = self.spec
        doc = {
            "version": 1, "key": spec.key, "kind": spec.kind, "template": spec.command,
            "path": spec.path, "served_name": spec.served_name, "fraction": spec.fraction,
            "requested_port": spec.port, "env": dict(spec.env), "pid": self.pid,
            "create_time": self.create_time, "run": self.run, "port": self.port,
            "command": list(self.command), "started_at": self.started_at,
            "restarts": self.restarts, "log_offset": self.log_offset,
        }  # fmt: skip
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> _Record:
        spec = EngineSpec(
            key=str(raw["key"]), kind=str(raw["kind"]), command=str(raw["template"]),
            path=str(raw["path"]), served_name=str(raw["served_name"]),
            fraction=float(raw["fraction"]), port=raw.get("requested_port"),
            env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        )  # fmt: skip
        return cls(
            spec=spec, pid=int(raw["pid"]), create_time=float(raw["create_time"]),
            run=str(raw["run"]), port=int(raw["port"]),
            command=tuple(str(a) for a in raw["command"]), started_at=float(raw["started_at"]),
            restarts=int(raw.get("restarts", 0)), log_offset=int(raw.get("log_offset", 0)),
        )  # fmt: skip


def safe_name(key: str) -> str:
    """A file name for ``key``: readable, and distinct for keys that differ only in symbols."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", key).strip("._-")[:80] or "engine"
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def format_command(spec: EngineSpec, port: int, host: str = "127.0.0.1") -> list[str]:
    """The argv for ``spec`` on ``port``: split first, then filled, so a path stays one word."""
    values = {
        "path": spec.path, "advertise_as": spec.served_name, "served_name": spec.served_name,
        "port": port, "fraction": round(spec.fraction, 4), "host": host,
        "python": sys.executable,
    }  # fmt: skip
    try:
        words = shlex.split(spec.command)
    except ValueError as exc:
        raise BackendError(
            f"command template for {spec.key} can't be split ({exc}): {spec.command!r}",
            model=spec.served_name,
        ) from exc
    try:
        argv = [word.format_map(values) for word in words]
    except (KeyError, IndexError, ValueError) as exc:
        raise BackendError(
            f"command template for {spec.key} uses an unknown placeholder ({exc}); known: "
            + ", ".join("{" + name + "}" for name in PLACEHOLDERS),
            model=spec.served_name,
        ) from exc
    if not argv:
        raise BackendError(f"command template for {spec.key} is empty", model=spec.served_name)
    return argv


def describe_exit(code: int | None) -> str:
    """``code`` in words for an error line."""
    if code is None:
        return "exit code unknown"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            return f"exit code {code}"
        hint = ", out of memory?" if name == "SIGKILL" else ""
        return f"exit code {code}: killed by {name}{hint}"
    return f"exit code {code}"


def _port_free(port: int) -> bool:
    """Whether an engine could listen on ``port`` on every address (any listener blocks it)."""
    tries = [(socket.AF_INET, ("0.0.0.0", port))]
    if socket.has_ipv6:
        tries.append((socket.AF_INET6, ("::", port)))
    for family, address in tries:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        with sock:
            # Engines (uvicorn) set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno == 99:  # EADDRNOTAVAIL: IPv6 off
                    continue
                return False
    return True


def _listener(port: int) -> str | None:
    """``pid N (name)`` of the process listening on ``port``, when this user may know it."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return None
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return None


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
        # Absolute: engines run with the folder as their working directory, and the shell
        # writes ``<name>.exit`` by this path (a relative --state-dir broke that).
        self.folder = Path(folder).absolute()
        self.host = host
        self.base_port = base_port
        self.env = dict(env or {})

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use: an SSL context costs ~15 ms on every plan otherwise. A probe ends
        # within its timeout in all, whatever the engine (or whoever holds the port) sends.
        limits = httpsafe.Limits(deadline=PROBE_TIMEOUT, max_body=httpsafe.PROBE_BODY)
        return httpsafe.client(limits, timeout=PROBE_TIMEOUT, trust_env=False)

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
        with self._locked():
            rec = self._read(spec.key)
            restarts, previous = 0, None
            if rec is not None:
                if self._running(rec)[0]:
                    if rec.spec != spec:
                        raise BackendError(
                            f"engine {spec.key} already runs (port {rec.port}) with other "
                            f"settings ({_changes(rec.spec, spec)}); stop it first",
                            model=spec.served_name,
                        )
                    return self._status(rec)
                self._clean(rec)
                restarts, previous = rec.restarts + 1, rec.port
            port = self._choose_port(spec, previous)
            rec = self._spawn(spec, port, restarts)
        return self._make(rec, "starting", self._running(rec)[1], None, ours=True)

    def wait_ready(self, key: str, timeout: float) -> EngineStatus:
        """Poll until the engine lists its served name; ``BackendError`` if it exits or times out.

        On timeout the engine is left running (the caller decides whether to stop it).
        """
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            rec = self._read(key)
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
                    f"it keeps running: see {self._log(key)}"
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
        with self._locked():
            rec = self._read(key)
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
                code = self._exit_code(key)
                if code is None and killed:
                    code = 128 + signal.SIGKILL
                final = self._make(rec, "stopped", None, code, ours=True)
            for suffix in (".json", ".exit"):
                (self.folder / (safe_name(key) + suffix)).unlink(missing_ok=True)
        return final

    def list(self) -> list[EngineStatus]:
        """Every recorded engine with its live state, by key."""
        return [self._status(rec) for rec in sorted(self._records(), key=lambda r: r.spec.key)]

    def status(self, key: str) -> EngineStatus | None:
        """The engine recorded for ``key`` as it is now; None when there is no record."""
        rec = self._read(key)
        return None if rec is None else self._status(rec)

    def log_tail(self, key: str, lines: int = 20) -> str:
        """The last ``lines`` lines of the engine's output in its current (or last) run."""
        path = self._log(key)
        rec = self._read(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return ""
        start = rec.log_offset if rec is not None and rec.log_offset <= size else 0
        start = max(start, size - _TAIL_BYTES)
        with path.open("rb") as log:
            log.seek(start)
            text = log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""

    def foreign(self, url: str) -> builtins.list[str]:
        """Model names an engine at ``url`` lists on ``/v1/models``, unless it is one of ours.

        ``[]`` when nothing (OpenAI-compatible) answers there.
        """
        parts = urlsplit(url)
        if parts.hostname in {self.host, "127.0.0.1", "localhost", "::1"}:
            for rec in self._records():
                if rec.port == parts.port and self._running(rec)[0]:
                    return []
        return self._models(url.rstrip("/")) or []

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, spec: EngineSpec, port: int, restarts: int) -> _Record:
        argv = format_command(spec, port, self.host)
        env = {**os.environ, **self.env, **spec.env}
        program = shutil.which(argv[0], path=env.get("PATH"))
        if program is None:
            raise BackendError(
                f"{argv[0]} (the command for {spec.key}) is not found on PATH: install "
                f"{spec.kind} or fix the command template",
                model=spec.served_name,
            )
        run = uuid.uuid4().hex
        env.update({RUN_ENV: run, KEY_ENV: spec.key})
        env.setdefault("PYTHONUNBUFFERED", "1")  # a crash's last lines reach the log
        name = safe_name(spec.key)
        exit_file = self._exit_file(spec.key)
        exit_file.unlink(missing_ok=True)
        log_path = self._log(spec.key)
        with contextlib.suppress(FileNotFoundError):
            if log_path.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
        started = time.time()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
            os.write(fd, f"[infernet] {stamp} starting {spec.key}: {shlex.join(argv)}\n".encode())
            offset = os.lseek(fd, 0, os.SEEK_END)
            launcher = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, "/bin/sh", "-c", _WRAPPER,
                 "infernet-engine", str(exit_file), program, *argv[1:]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fd, env=env,
                cwd=self.folder,
            )  # fmt: skip
        finally:
            os.close(fd)
        assert launcher.stdin is not None and launcher.stdout is not None
        try:
            line = launcher.stdout.readline().decode().strip()
            if not line.isdigit():
                raise BackendError(
                    f"could not start the engine for {spec.key}: the launcher failed; see "
                    f"{log_path}",
                    model=spec.served_name,
                )
            pid = int(line)
            # The launcher has not reaped its child yet, so this PID is still the engine's.
            create_time = psutil.Process(pid).create_time()
        finally:
            launcher.stdin.close()
            launcher.stdout.close()
            launcher.wait(10)
        rec = _Record(spec, pid, create_time, run, port, tuple(argv), started, restarts, offset)
        record = self.folder / f"{name}.json"
        # Created 0600 first so the atomic write keeps that mode: the env may hold tokens.
        os.close(os.open(record, os.O_WRONLY | os.O_CREAT, 0o600))
        write_atomically(record, rec.to_json())
        return rec

    def _leader(self, rec: _Record) -> psutil.Process | None:
        """The shell we started, if it still runs (not a stranger that got its PID)."""
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

    def _group(self, rec: _Record) -> builtins.list[psutil.Process]:
        """Live processes of this run: the leader's group, or those carrying the run id."""
        leader = self._leader(rec)
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) != rec.pid or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if leader is None and proc.environ().get(RUN_ENV) != rec.run:
                    continue
                found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def _running(self, rec: _Record) -> tuple[bool, int | None]:
        """``(running, engine pid)``; the engine is the shell's child when the shell is there."""
        leader = self._leader(rec)
        if leader is not None:
            with contextlib.suppress(psutil.Error):
                for child in leader.children():
                    if child.status() != psutil.STATUS_ZOMBIE:
                        return True, child.pid
            return True, leader.pid
        if self._exit_file(rec.spec.key).exists():
            return False, None  # the engine itself ended; leftovers are cleaned on stop/start
        orphans = self._group(rec)
        if not orphans:
            return False, None
        return True, min(orphans, key=lambda p: p.create_time()).pid

    def _clean(self, rec: _Record) -> None:
        """Stop what outlived a dead engine (workers that missed its exit); they may hold VRAM."""
        if self._group(rec):
            self._signal(rec, signal.SIGTERM)
            if not self._wait_gone(rec, 5.0):
                self._signal(rec, signal.SIGKILL)
                self._wait_gone(rec, KILL_GRACE)

    def _signal(self, rec: _Record, sig: signal.Signals) -> None:
        if self._leader(rec) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec.pid, sig)
            return
        for proc in self._group(rec):  # the shell is gone: only processes proven ours
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    def _wait_gone(self, rec: _Record, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._leader(rec) is not None or self._group(rec):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # -- state -----------------------------------------------------------------------------

    def _status(self, rec: _Record) -> EngineStatus:
        running, pid = self._running(rec)
        names = self._models(self._url(rec.port))
        listed = names is not None and rec.spec.served_name in names
        if running:
            return self._make(rec, "ready" if listed else "starting", pid, None, ours=True)
        if listed:  # our engine is gone and something else serves this name on its port
            return self._make(rec, "foreign", None, self._exit_code(rec.spec.key), ours=False)
        return self._make(rec, "exited", None, self._exit_code(rec.spec.key), ours=True)

    def _make(
        self, rec: _Record, state: EngineState, pid: int | None, code: int | None, *, ours: bool
    ) -> EngineStatus:
        return EngineStatus(
            key=rec.spec.key, served_name=rec.spec.served_name, pid=pid, port=rec.port,
            state=state, started_at=rec.started_at, exit_code=code,
            log_path=str(self._log(rec.spec.key)), restarts=rec.restarts, ours=ours,
            url=self._url(rec.port), spec=rec.spec,
        )  # fmt: skip

    def _exit_message(self, rec: _Record) -> str:
        spec = rec.spec
        code = self._exit_code(spec.key)
        tail = self.log_tail(spec.key, 12)
        lines = "".join(f"\n    {line}" for line in tail.splitlines() if line.strip())
        return (
            f"{spec.kind} engine for {spec.served_name} exited before it was ready "
            f"({describe_exit(code)}); its log is {self._log(spec.key)}"
            + (f", last lines:{lines}" if lines else " (empty)")
        )

    def _exit_file(self, key: str) -> Path:
        return self.folder / f"{safe_name(key)}.exit"

    def _exit_code(self, key: str) -> int | None:
        try:
            text = self._exit_file(key).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _choose_port(self, spec: EngineSpec, previous: int | None) -> int:
        taken = {r.port: r.spec.key for r in self._records() if r.spec.key != spec.key}
        if spec.port is not None:
            if spec.port in taken:
                raise BackendError(
                    f"port {spec.port} for {spec.served_name} ({spec.key}) is already given to "
                    f"infernet's engine {taken[spec.port]}: choose another port",
                    model=spec.served_name,
                )
            if not _port_free(spec.port):
                raise BackendError(self._taken_message(spec, spec.port), model=spec.served_name)
            return spec.port
        last = self.base_port + PORT_SCAN - 1
        ports: builtins.list[int] = [previous] if previous is not None else []
        ports += range(self.base_port, last + 1)
        for port in ports:
            if port not in taken and _port_free(port):
                return port
        raise BackendError(
            f"no free port for {spec.served_name} ({spec.key}) in {self.base_port}-{last}: "
            "free one or give the model an explicit port",
            model=spec.served_name,
        )

    def _taken_message(self, spec: EngineSpec, port: int) -> str:
        names = self._models(self._url(port), timeout=0.5)  # only to word the error
        who = _listener(port)
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
                f"{url}/v1/models", timeout=timeout,
                extensions=httpsafe.limits(deadline=timeout, max_body=httpsafe.PROBE_BODY),
            )  # fmt: skip
            data = resp.json().get("data") if resp.status_code == 200 else None
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, AttributeError):
            return None
        if not isinstance(data, list):
            return None
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]

    def _records(self) -> Iterator[_Record]:
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.folder.glob("*.json")):
                rec = self._load(path)
                if rec is not None:
                    yield rec

    def _read(self, key: str) -> _Record | None:
        rec = self._load(self.folder / f"{safe_name(key)}.json")
        return rec if rec is not None and rec.spec.key == key else None

    @staticmethod
    def _load(path: Path) -> _Record | None:
        try:
            return _Record.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # written atomically, so only a foreign file looks like this: ignore it

    def _log(self, key: str) -> Path:
        return self.folder / f"{safe_name(key)}.log"

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise starts and stops across processes (and threads) sharing the folder."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise BackendError(
                            f"engine folder {self.folder} stayed locked by another infernet "
                            f"process for {LOCK_TIMEOUT:.0f}s; try again when it is done",
                            retryable=True,
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


def _changes(old: EngineSpec, new: EngineSpec) -> str:
    fields = ("kind", "command", "path", "served_name", "fraction", "port")
    diff = [
        f"{name} {getattr(old, name)!r} -> {getattr(new, name)!r}"
        for name in fields
        if getattr(old, name) != getattr(new, name)
    ]
    # Names only: the environment may hold tokens.
    names = sorted(k for k in {*old.env, *new.env} if old.env.get(k) != new.env.get(k))
    if names:
        diff.append("env " + ", ".join(names))
    return "; ".join(diff)
