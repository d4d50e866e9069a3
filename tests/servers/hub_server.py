"""A local Hugging Face Hub that ``huggingface_hub`` accepts as ``HF_ENDPOINT`` (standard library).

    python -m tests.servers.hub_server --port 0 --root ROOT [--files-dir DIR] [--token T]

prints ``READY http://127.0.0.1:<port>`` once it listens; SIGTERM exits 0. Set
``HUB_TEST_SERVER_VERBOSE=1`` for request logs on stderr.

Repositories are folders: ``ROOT/<org>/<repo>/<revision>/<files...>``. Every revision folder is
a branch (or tag) of that name; its commit sha is the folder name when that is 40 hex digits,
else the sha1 of the repository id and the folder's listing (paths, sizes, sha256), so it
changes when a file changes and a revision resolves by branch name or by sha. Dotfiles other
than ``.gitattributes`` are not part of a repository, so files written under a dot-name and
renamed appear atomically. A file ``ROOT/<org>/<repo>/.gated`` (content ``auto`` or
``manual``) gates the repository's files: ``resolve`` answers 401 ``GatedRepo`` unless the
request carries ``Authorization: Bearer <--token>`` (any bearer when no ``--token``); its
metadata stays public, as on the Hub. A bearer token other than ``--token`` is refused
everywhere with 401 "Invalid credentials in Authorization header".

Files are LFS files (``ETag`` = quoted sha256, ``X-Linked-Etag``/``X-Linked-Size``,
``lfs`` metadata) except small text files (``.md``, ``.json``, ``.txt``, …), which are git
blobs (``ETag`` = git blob sha1). Both are served directly from ``resolve`` (the Hub redirects
LFS files to a CDN), with ``Range``. No ``X-Xet-*`` header is ever sent, so the client always
downloads over plain HTTP.

Routes (model repositories only):

- ``GET /api/models/<org>/<repo>[/revision/<rev>]`` (``?blobs=true``: sizes, blob ids, lfs)
- ``GET /api/models/<org>/<repo>/tree/<rev>[/<path>]`` (``?recursive=true``)
- ``POST /api/models/<org>/<repo>/paths-info/<rev>`` (form or JSON ``paths``)
- ``GET /api/models/<org>/<repo>/refs``
- ``HEAD|GET /<org>/<repo>/resolve/<rev>/<path>``
- ``HEAD|GET /files/<path>``: plain files from ``--files-dir`` (default ``ROOT/_files``), for
  ``https://…`` GGUF sources: Content-Length, ``Range`` (206), 404.

Errors have the Hub's shape: ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
``EntryNotFound`` (404) or ``GatedRepo`` (401), ``X-Error-Message``, and ``{"error": …}``.

Test routes (never logged, never faulted): ``GET /_test/requests`` (``{method, path, range,
status, bytes, auth, user_agent, fault, time}``, oldest first), ``POST /_test/reset`` (requests
and faults), ``POST /_test/faults {path, kind, after_bytes, times, rate, status, method}``,
``DELETE /_test/faults``. ``path`` is an ``fnmatch`` pattern on the request's decoded path.

| kind | effect | default ``times`` |
|---|---|---|
| ``cut`` | the body stops after ``after_bytes`` and the connection closes | 1 |
| ``error`` | answer ``status`` (500) with ``{"error": message}`` instead | 1 |
| ``slow`` | the body trickles at ``rate`` bytes/s | until cleared |
| ``stall`` | the body stops after ``after_bytes`` until the fault is cleared | until cleared |
| ``grow`` | a GET sends the file and ``after_bytes`` more (HEAD tells the truth) | until cleared |
| ``short`` | a GET sends only ``after_bytes`` bytes and ends cleanly | until cleared |
| ``trickle`` | status line and headers, a byte every ``1/rate`` s, never ending | until cleared |

``grow`` and ``short`` answers have no Content-Length: they are read to the connection's close.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

VERBOSE = bool(os.environ.get("HUB_TEST_SERVER_VERBOSE"))
FAULT_KINDS = ("cut", "error", "slow", "stall", "grow", "short", "trickle")
_ONCE_BY_DEFAULT = ("cut", "error")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_GIT_SUFFIXES = {".md", ".json", ".txt", ".py", ".yaml", ".yml", ".jinja", ".gitattributes"}
_GIT_MAX_SIZE = 10 << 20
_CHUNK = 64 << 10
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class HubError(Exception):
    """An error answer in the Hub's shape."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit


# the repository store --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the revision folder, "/"-separated
    file: Path
    size: int
    sha256: str
    oid: str  # git blob id: of the LFS pointer for LFS files
    lfs: bool
    pointer_size: int

    def tree_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        out["path"] = self.path
        return out

    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Revision:
    repo_id: str
    name: str
    sha: str
    entries: dict[str, Entry]
    gated: str | None
    folder: Path

    def directories(self) -> dict[str, str]:
        """Every folder path in the revision → a tree oid derived from its contents."""
        dirs: dict[str, list[str]] = {}
        for entry in self.entries.values():
            parts = entry.path.split("/")
            for i in range(1, len(parts)):
                dirs.setdefault("/".join(parts[:i]), []).append(entry.oid)
        return {
            d: hashlib.sha1(f"{d}\n{sorted(oids)}".encode()).hexdigest() for d, oids in dirs.items()
        }


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name: str, size: int) -> bool:
    suffix = name if name == ".gitattributes" else Path(name).suffix.lower()
    return suffix not in _GIT_SUFFIXES or size >= _GIT_MAX_SIZE


class Store:
    """Reads repositories from ROOT on every request; file hashes are cached by mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: dict[tuple[str, int, int], tuple[str, str, int]] = {}
        self._lock = threading.Lock()

    def repo_dir(self, org: str, name: str) -> Path:
        if not _safe_name(org) or not _safe_name(name) or org.startswith("_"):
            raise HubError(404, "Repository not found", "RepoNotFound")
        folder = self.root / org / name
        if not folder.is_dir():
            raise HubError(404, "Repository not found", "RepoNotFound")
        return folder

    def gated(self, repo: Path) -> str | None:
        marker = repo / ".gated"
        if not marker.is_file():
            return None
        return marker.read_text().strip() or "auto"

    def revision(self, org: str, name: str, rev: str) -> Revision:
        repo = self.repo_dir(org, name)
        repo_id = f"{org}/{name}"
        folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        if _safe_name(rev) and (repo / rev).is_dir() and not rev.startswith("."):
            return self._read(repo_id, repo, repo / rev)
        if _SHA1.match(rev):
            for folder in folders:
                candidate = self._read(repo_id, repo, folder)
                if candidate.sha == rev:
                    return candidate
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def branches(self, org: str, name: str) -> list[Revision]:
        repo = self.repo_dir(org, name)
        folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [self._read(f"{org}/{name}", repo, folder) for folder in folders]

    def _read(self, repo_id: str, repo: Path, folder: Path) -> Revision:
        entries: dict[str, Entry] = {}
        for file in sorted(folder.rglob("*")):
            rel = file.relative_to(folder).as_posix()
            hidden = any(p.startswith(".") and p != ".gitattributes" for p in rel.split("/"))
            if hidden or not file.is_file():
                continue
            entries[rel] = self.entry(rel, file)
        if _SHA1.match(folder.name):
            sha = folder.name
        else:
            listing = "".join(f"{e.path}\0{e.size}\0{e.sha256}\n" for e in entries.values())
            sha = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        return Revision(repo_id, folder.name, sha, entries, self.gated(repo), folder)

    def entry(self, rel: str, file: Path) -> Entry:
        """``file`` as ``rel`` in a revision, hashes cached by (path, size, mtime)."""
        st = file.stat()
        key = (str(file), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            sha256 = hashlib.sha256()
            git = hashlib.sha1(b"blob %d\0" % st.st_size)
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha256.update(chunk)
                    git.update(chunk)
            lfs = _is_lfs(file.name, st.st_size)
            digest = sha256.hexdigest()
            if lfs:
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\n"
                    f"oid sha256:{digest}\nsize {st.st_size}\n"
                ).encode()
                known = (digest, _git_oid(pointer), len(pointer))
            else:
                known = (digest, git.hexdigest(), 0)
            with self._lock:
                self._hashes[key] = known
        sha256_hex, oid, pointer_size = known
        return Entry(
            rel,
            file,
            st.st_size,
            sha256_hex,
            oid,
            _is_lfs(file.name, st.st_size),
            pointer_size,
        )


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def model_info(rev: Revision, *, blobs: bool) -> dict[str, Any]:
    siblings: list[dict[str, Any]] = []
    for entry in rev.entries.values():
        sibling: dict[str, Any] = {"rfilename": entry.path}
        if blobs:
            sibling["blobId"] = entry.oid
            sibling["size"] = entry.size
            if entry.lfs:
                sibling["lfs"] = {
                    "sha256": entry.sha256,
                    "size": entry.size,
                    "pointerSize": entry.pointer_size,
                }
        siblings.append(sibling)
    mtimes = [e.file.stat().st_mtime for e in rev.entries.values()] or [rev.folder.stat().st_mtime]
    org = rev.repo_id.split("/")[0]
    return {
        "_id": hashlib.sha1(rev.repo_id.encode()).hexdigest()[:24],
        "id": rev.repo_id,
        "modelId": rev.repo_id,
        "author": org,
        "sha": rev.sha,
        "lastModified": _iso(max(mtimes)),
        "createdAt": _iso(min(mtimes)),
        "private": False,
        "gated": rev.gated or False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": sorted({"gguf"} if any(p.endswith(".gguf") for p in rev.entries) else set()),
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(e.size for e in rev.entries.values()),
    }


def tree(rev: Revision, path: str, *, recursive: bool) -> list[dict[str, Any]]:
    dirs = rev.directories()
    path = path.strip("/")
    if path and path not in dirs:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", rev.sha)
    prefix = f"{path}/" if path else ""
    out: list[dict[str, Any]] = []
    for d, oid in sorted(dirs.items()):
        if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
            out.append({"type": "directory", "oid": oid, "size": 0, "path": d})
    for p, entry in rev.entries.items():
        if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :]):
            out.append(entry.tree_json())
    return out


def paths_info(rev: Revision, paths: list[str]) -> list[dict[str, Any]]:
    dirs = rev.directories()
    out: list[dict[str, Any]] = []
    for wanted in paths:
        p = wanted.strip("/")
        if p in rev.entries:
            out.append(rev.entries[p].tree_json())
        elif p in dirs:
            out.append({"type": "directory", "oid": dirs[p], "size": 0, "path": p})
    return out


# faults and the request log ---------------------------------------------------------------------


@dataclass
class Fault:
    path: str
    kind: str
    after_bytes: int = 0
    times: int | None = None
    rate: int = 50_000
    status: int = 500
    method: str | None = None
    message: str | None = None
    id: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        return fnmatch.fnmatchcase(path, self.path)


@dataclass
class State:
    store: Store
    files_dir: Path
    token: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    next_fault: int = 1

    def add_fault(self, body: dict[str, Any]) -> Fault:
        kind = body.get("kind")
        if kind not in FAULT_KINDS:
            raise HubError(400, f"kind must be one of {', '.join(FAULT_KINDS)}")
        if not isinstance(body.get("path"), str):
            raise HubError(400, "path (an fnmatch pattern) is required")
        times = body.get("times", 1 if kind in _ONCE_BY_DEFAULT else None)
        with self.lock:
            fault = Fault(
                path=body["path"],
                kind=kind,
                after_bytes=int(body.get("after_bytes") or 0),
                times=None if times is None else int(times),
                rate=int(body.get("rate") or 50_000),
                status=int(body.get("status") or 500),
                method=body.get("method"),
                message=body.get("message"),
                id=self.next_fault,
            )
            self.next_fault += 1
            self.faults.append(fault)
        return fault

    def take_faults(self, method: str, path: str, kinds: tuple[str, ...]) -> list[Fault]:
        """The matching faults of ``kinds``, each used once (and dropped when used up)."""
        with self.lock:
            taken = [f for f in self.faults if f.kind in kinds and f.matches(method, path)]
            for fault in taken:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
        return taken

    def active(self, fault: Fault) -> bool:
        with self.lock:
            return any(f.id == fault.id for f in self.faults)


# HTTP ---------------------------------------------------------------------------------------------


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end inclusive); None to serve everything; "unsatisfiable" for a 416."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None  # malformed or multi-range: ignored, as RFC 9110 allows
    first, last = match.groups()
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-test"
    # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK
    # adds ~40 ms to every request.
    disable_nagle_algorithm = True

    server: Server
    status = 0
    sent = 0
    # This request's log line: in the log before the first byte of the answer goes out, and
    # updated before each later write, so a client that has read an answer finds it complete.
    entry: dict[str, Any] | None = None
    logged = False

    @property
    def state(self) -> State:
        return self.server.state

    def log_message(self, format: str, *args: Any) -> None:
        if VERBOSE:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        self._log(status=code)
        super().send_response(code, message)

    def _log(self, **changes: Any) -> None:
        if self.entry is None:
            return
        self.entry.update(changes)
        if not self.logged:
            self.logged = True
            with self.state.lock:
                self.state.requests.append(self.entry)

    def _run(self) -> None:
        self.status, self.sent, self.logged = 0, 0, False
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        test_route = segments[:1] == ["_test"]
        self.entry = None
        if not test_route:
            self.entry = {
                "method": self.command,
                "path": self.path,
                "range": self.headers.get("Range"),
                "status": 0,
                "bytes": 0,
                "auth": self.headers.get("Authorization") is not None,
                "user_agent": self.headers.get("User-Agent"),
                "fault": None,
                "time": time.time(),
            }
        try:
            if test_route:
                self._test_route(segments[1:], raw)
            else:
                self._route(segments, split.query, raw)
        except HubError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            sys.stderr.write(f"{self.command} {self.path}: {traceback.format_exc()}\n")
            self.close_connection = True
            if not self.status:
                self._json(500, {"error": f"test server bug: {exc!r}"})
        finally:
            self._log()

    do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = _run  # noqa: N815

    # replies ----------------------------------------------------------------------------------

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._json(err.status, {"error": err.message}, headers)

    def _send_file(self, file: Path, size: int, headers: dict[str, str]) -> None:
        """The file (or the requested range) with ``headers``, applying body faults."""
        span = _parse_range(self.headers.get("Range"), size)
        if span == "unsatisfiable":
            self._json(
                416,
                {"error": "Requested Range Not Satisfiable"},
                {"Content-Range": f"bytes */{size}"},
            )
            return
        start, end = span if isinstance(span, tuple) else (0, size - 1)
        length = end - start + 1 if size else 0
        faults: list[Fault] = []
        if self.command == "GET":
            path = unquote(urlsplit(self.path).path)
            faults = self.state.take_faults("GET", path, ("cut", "slow", "stall", "grow", "short"))
        if faults:
            self._log(fault=",".join(sorted({f.kind for f in faults})))
        lying = next((f for f in faults if f.kind in ("grow", "short")), None)
        if lying is not None:
            self._send_lying(file, start, length, lying, headers)
            return
        self.send_response(206 if isinstance(span, tuple) else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if isinstance(span, tuple):
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = min((f.after_bytes for f in faults if f.kind == "cut"), default=None)
        stall = next((f for f in faults if f.kind == "stall"), None)
        rate = min((f.rate for f in faults if f.kind == "slow"), default=0)
        began = time.monotonic()
        with file.open("rb") as f:
            f.seek(start)
            while self.sent < length:
                want = min(_CHUNK, length - self.sent)
                if rate:
                    want = min(want, max(1024, rate // 20))
                if cut is not None:
                    want = min(want, cut - self.sent)
                if stall is not None and self.sent < stall.after_bytes:
                    want = min(want, stall.after_bytes - self.sent)
                if want > 0:
                    chunk = f.read(want)
                    if not chunk:
                        break  # the file shrank under us: the client sees a short body
                    self.sent += len(chunk)
                    self._log(bytes=self.sent)
                    self.wfile.write(chunk)
                if cut is not None and self.sent >= cut:
                    self._cut()
                    return
                if stall is not None and self.sent >= stall.after_bytes:
                    self.wfile.flush()
                    while self.state.active(stall):
                        time.sleep(0.02)
                    stall = None
                if rate:
                    ahead = self.sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

    def _send_lying(
        self, file: Path, start: int, length: int, fault: Fault, headers: dict[str, str]
    ) -> None:
        """A body of another size than the file's, read to the connection's close."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        with file.open("rb") as f:
            f.seek(start)
            data = f.read(length)
        if fault.kind == "short":
            data = data[: fault.after_bytes]
        self.wfile.write(data)
        self.sent = len(data)
        extra = fault.after_bytes if fault.kind == "grow" else 0
        block = b"\0" * _CHUNK
        while extra > 0:
            self.wfile.write(block[: min(extra, _CHUNK)])
            self.sent += min(extra, _CHUNK)
            extra -= _CHUNK
        self._log(bytes=self.sent)

    def _trickle(self, fault: Fault) -> None:
        """A status line and headers that never end, one byte at a time (a slow-loris)."""
        self.close_connection = True
        head = b"HTTP/1.1 200 OK\r\nX-Trickle: " + b"a" * 100_000
        try:
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(1 / max(fault.rate, 1))
                if not self.state.active(fault):
                    return
        except OSError:
            pass  # the client gave up, as it should

    def _cut(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # routes -----------------------------------------------------------------------------------

    def _token_ok(self) -> bool:
        """False without a bearer; :class:`HubError` 401 for a bearer that is not ``--token``."""
        header = self.headers.get("Authorization")
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        expected = self.state.token
        if scheme.lower() != "bearer" or (expected is not None and value != expected):
            raise HubError(401, _INVALID_CREDENTIALS)
        return True

    def _route(self, seg: list[str], query: str, raw: bytes) -> None:
        method = self.command
        # An HTTP error fault replaces the answer before anything else is looked at.
        failing = self.state.take_faults(method, "/" + "/".join(seg), ("error", "trickle"))
        trickle = next((f for f in failing if f.kind == "trickle"), None)
        if trickle is not None:
            self._log(fault="trickle")
            self._trickle(trickle)
            return
        if failing:
            self._log(fault="error")
            status = failing[0].status
            self._json(status, {"error": failing[0].message or f"injected {status}"})
            return
        if seg[:1] == ["files"] and method in ("GET", "HEAD"):
            self._plain_file("/".join(seg[1:]))
            return
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            self._token_ok()  # metadata is public, but a wrong token is refused anyway
            self._api(seg[2], seg[3], seg[4:], query, raw)
            return
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            authorized = self._token_ok()
            self._resolve(seg[0], seg[1], seg[3], "/".join(seg[4:]), authorized)
            return
        raise HubError(404, "Not Found")

    def _api(self, org: str, name: str, rest: list[str], query: str, raw: bytes) -> None:
        params = {k: v[-1].lower() for k, v in parse_qs(query).items()}
        method = self.command
        if method == "GET" and not rest:
            rev = self.state.store.revision(org, name, "main")
            self._json(200, model_info(rev, blobs=params.get("blobs") == "true"))
        elif method == "GET" and len(rest) == 2 and rest[0] == "revision":
            rev = self.state.store.revision(org, name, rest[1])
            self._json(200, model_info(rev, blobs=params.get("blobs") == "true"))
        elif method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            rev = self.state.store.revision(org, name, rest[1])
            recursive = params.get("recursive") == "true"
            self._json(200, tree(rev, "/".join(rest[2:]), recursive=recursive))
        elif method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            rev = self.state.store.revision(org, name, rest[1])
            self._json(200, paths_info(rev, _paths_from_body(raw, self.headers)))
        elif method == "GET" and rest == ["refs"]:
            branches = [
                {"name": r.name, "ref": f"refs/heads/{r.name}", "targetCommit": r.sha}
                for r in self.state.store.branches(org, name)
            ]
            self._json(200, {"branches": branches, "converts": [], "tags": []})
        else:
            self.state.store.repo_dir(org, name)
            raise HubError(404, "Not Found")

    def _resolve(self, org: str, name: str, rev_name: str, path: str, authorized: bool) -> None:
        repo = self.state.store.repo_dir(org, name)
        gated = self.state.store.gated(repo)
        if gated and not authorized:
            raise HubError(
                401,
                f"Access to model {org}/{name} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                "GatedRepo",
            )
        rev = self.state.store.revision(org, name, rev_name)
        entry = rev.entries.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", rev.sha)
        base = entry.path.rsplit("/", 1)[-1]
        headers = {
            "ETag": f'"{entry.etag()}"',
            "X-Repo-Commit": rev.sha,
            "Content-Disposition": (
                f"inline; filename*=UTF-8''{quote(base)}; filename=\"{base}\";"
            ),
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        self._send_file(entry.file, entry.size, headers)

    def _plain_file(self, path: str) -> None:
        base = self.state.files_dir.resolve()
        file = (base / path).resolve()
        if not path or not file.is_relative_to(base) or not file.is_file():
            raise HubError(404, f"{path} not found")
        st = file.stat()
        entry = self.state.store.entry(path, file)
        headers = {
            "ETag": f'"{entry.sha256}"',
            "Last-Modified": self.date_time_string(st.st_mtime),
        }
        self._send_file(file, st.st_size, headers)

    def _test_route(self, seg: list[str], raw: bytes) -> None:
        body = json.loads(raw) if raw else {}
        if seg == ["requests"] and self.command == "GET":
            with self.state.lock:
                self._json(200, list(self.state.requests))
        elif seg == ["reset"] and self.command == "POST":
            with self.state.lock:
                self.state.requests.clear()
                self.state.faults.clear()
            self._json(200, {})
        elif seg == ["faults"] and self.command == "POST":
            fault = self.state.add_fault(body)
            self._json(200, {"id": fault.id})
        elif seg == ["faults"] and self.command == "DELETE":
            with self.state.lock:
                self.state.faults.clear()
            self._json(200, {})
        else:
            raise HubError(404, "Not Found")


def _paths_from_body(raw: bytes, headers: Any) -> list[str]:
    """``paths`` from the form body the client sends (``paths=a&paths=b``) or from JSON."""
    if "json" in (headers.get("Content-Type") or ""):
        value = json.loads(raw or b"{}").get("paths", [])
        return [value] if isinstance(value, str) else list(value)
    return parse_qs(raw.decode("utf-8", "replace")).get("paths", [])


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    state: State


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--files-dir", type=Path, help="served under /files/ (ROOT/_files)")
    parser.add_argument("--token", help="the only bearer token accepted (default: any)")
    args = parser.parse_args(argv)
    server = Server(("127.0.0.1", args.port), Handler)
    server.state = State(Store(args.root), args.files_dir or args.root / "_files", args.token)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
