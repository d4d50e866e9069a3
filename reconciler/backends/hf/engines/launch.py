"""Starting an engine: its command line from a template, a free port, a detached launch.

An engine must outlive the ``infernet apply`` that started it, so a tiny launcher forks it into
a session of its own and exits at once: no infernet process is ever its parent, and the CLI and
the daemon see the same thing. The engine runs as the foreground child of ``/bin/sh``, the
session and process-group leader, which waits for it and writes its exit status to
``<name>.exit``: a later process learns the exit code of an engine it never parented.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping

from reconciler.backends.hf.engines.records import EngineSpec, Folder, Record
from reconciler.errors import BackendError
from reconciler.files import write_atomically

PLACEHOLDERS = ("path", "advertise_as", "served_name", "port", "fraction", "host", "python")
RUN_ENV = "INFERNET_ENGINE_RUN"
KEY_ENV = "INFERNET_ENGINE_KEY"
LOG_ROTATE_BYTES = 64 << 20

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


def format_command(spec: EngineSpec, port: int, host: str = "127.0.0.1") -> list[str]:
    """The argv for ``spec`` on ``port``: split first, then filled, so a path stays one word."""
    values = {
        "path": spec.path,
        "advertise_as": spec.served_name,
        "served_name": spec.served_name,
        "port": port,
        "fraction": round(spec.fraction, 4),
        "host": host,
        "python": sys.executable,
    }
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


def port_free(port: int) -> bool:
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


def listener(port: int) -> str | None:
    """``pid N (name)`` of the process listening on ``port``, when this user may know it."""
    import psutil  # here and in spawn: `infernet plan` on a node with no engine never needs it

    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return None
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return None


def spawn(
    folder: Folder, spec: EngineSpec, port: int, restarts: int, *, host: str, env: Mapping[str, str]
) -> Record:
    """Start ``spec``'s engine on ``port``, detached, and record it in ``folder``."""
    # Imported before the engine starts, not while it is being watched: its ~15 ms (more on
    # a busy machine) are paid here, never between the engine's start and the first check.
    import psutil

    argv = format_command(spec, port, host)
    env = {**os.environ, **env, **spec.env}
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
    exit_file = folder.exit_file(spec.key)
    exit_file.unlink(missing_ok=True)
    log_path = folder.log(spec.key)
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
            [
                sys.executable,
                "-I",
                "-S",
                "-c",
                _LAUNCHER,
                "/bin/sh",
                "-c",
                _WRAPPER,
                "infernet-engine",
                str(exit_file),
                program,
                *argv[1:],
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fd,
            env=env,
            cwd=folder.path,
        )
    finally:
        os.close(fd)
    assert launcher.stdin is not None and launcher.stdout is not None
    try:
        line = launcher.stdout.readline().decode().strip()
        if not line.isdigit():
            raise BackendError(
                f"could not start the engine for {spec.key}: the launcher failed; see {log_path}",
                model=spec.served_name,
            )
        pid = int(line)
        # The launcher has not reaped its child yet, so this PID is still the engine's.
        create_time = psutil.Process(pid).create_time()
    finally:
        launcher.stdin.close()
        launcher.stdout.close()
        launcher.wait(10)
    rec = Record(spec, pid, create_time, run, port, tuple(argv), started, restarts, offset)
    record = folder.record(spec.key)
    # Created 0600 first so the atomic write keeps that mode: the env may hold tokens.
    os.close(os.open(record, os.O_WRONLY | os.O_CREAT, 0o600))
    write_atomically(record, rec.to_json())
    return rec
