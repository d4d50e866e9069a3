"""The engine folder: one record, log and exit file per engine, and the lock over them.

Files in the folder (created 0700), per engine: ``<name>.json`` (the record), ``<name>.log``
(stdout and stderr, appended across restarts) and ``<name>.exit``; ``<name>`` is the key made
safe for a file name plus a hash of the key. Any number of processes may use the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reconciler.errors import BackendError

EngineState = Literal["starting", "ready", "exited", "stopped", "foreign"]

LOCK_TIMEOUT = 60.0
_TAIL_BYTES = 64 << 10


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
class Record:
    """What a started engine left in the folder: enough for any later process to find it."""

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
            "version": 1,
            "key": spec.key,
            "kind": spec.kind,
            "template": spec.command,
            "path": spec.path,
            "served_name": spec.served_name,
            "fraction": spec.fraction,
            "requested_port": spec.port,
            "env": dict(spec.env),
            "pid": self.pid,
            "create_time": self.create_time,
            "run": self.run,
            "port": self.port,
            "command": list(self.command),
            "started_at": self.started_at,
            "restarts": self.restarts,
            "log_offset": self.log_offset,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Record:
        spec = EngineSpec(
            key=str(raw["key"]),
            kind=str(raw["kind"]),
            command=str(raw["template"]),
            path=str(raw["path"]),
            served_name=str(raw["served_name"]),
            fraction=float(raw["fraction"]),
            port=raw.get("requested_port"),
            env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        )
        return cls(
            spec=spec,
            pid=int(raw["pid"]),
            create_time=float(raw["create_time"]),
            run=str(raw["run"]),
            port=int(raw["port"]),
            command=tuple(str(a) for a in raw["command"]),
            started_at=float(raw["started_at"]),
            restarts=int(raw.get("restarts", 0)),
            log_offset=int(raw.get("log_offset", 0)),
        )


def safe_name(key: str) -> str:
    """A file name for ``key``: readable, and distinct for keys that differ only in symbols."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", key).strip("._-")[:80] or "engine"
    return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


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


class Folder:
    """The records of one engine folder."""

    def __init__(self, folder: Path) -> None:
        # Absolute: engines run with the folder as their working directory, and the shell
        # writes ``<name>.exit`` by this path (a relative --state-dir broke that).
        self.path = Path(folder).absolute()

    def record(self, key: str) -> Path:
        return self.path / f"{safe_name(key)}.json"

    def forget(self, key: str) -> None:
        """Drop the record and exit file of ``key`` (the log stays)."""
        for suffix in (".json", ".exit"):
            (self.path / (safe_name(key) + suffix)).unlink(missing_ok=True)

    def log_tail(self, key: str, lines: int = 20) -> str:
        """The last ``lines`` lines of the engine's output in its current (or last) run."""
        path = self.log(key)
        rec = self.read(key)
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

    def exit_file(self, key: str) -> Path:
        return self.path / f"{safe_name(key)}.exit"

    def exit_code(self, key: str) -> int | None:
        try:
            text = self.exit_file(key).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def records(self) -> Iterator[Record]:
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.path.glob("*.json")):
                rec = self.load(path)
                if rec is not None:
                    yield rec

    def read(self, key: str) -> Record | None:
        rec = self.load(self.record(key))
        return rec if rec is not None and rec.spec.key == key else None

    @staticmethod
    def load(path: Path) -> Record | None:
        try:
            return Record.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # written atomically, so only a foreign file looks like this: ignore it

    def log(self, key: str) -> Path:
        return self.path / f"{safe_name(key)}.log"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise starts and stops across processes (and threads) sharing the folder."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise BackendError(
                            f"engine folder {self.path} stayed locked by another infernet "
                            f"process for {LOCK_TIMEOUT:.0f}s; try again when it is done",
                            retryable=True,
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)


def changes(old: EngineSpec, new: EngineSpec) -> str:
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
