"""Blob downloads over HTTP from the fake registry, modelled on Ollama's `server/download.go`.

One download per digest, shared by every pull that waits on it; cancelled when its last waiter
leaves. Bytes go into ``sha256-<hex>-partial`` with part files ``-partial-<N>`` holding
``{"N","Offset","Size","Completed"}``, written when a part attempt ends, so a later pull (or
a restarted server) resumes where the last attempt stopped. Transient failures are retried six
times (with backoff compressed to milliseconds) before ``max retries exceeded: ...``.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from tests.servers.ollama_http import log

NUM_PARTS = 16
MIN_PART = 100 * 1000 * 1000
MAX_PART = 1000 * 1000 * 1000
MAX_RETRIES = 6
RETRY_BASE_S = 0.01
STALL_S = 30.0
TICK_S = 0.06


class DownloadError(Exception):
    """A failure reported to the pull client with this text."""


class Cancelled(Exception):
    """The waiting client went away."""


def http_request(
    method: str, url: str, headers: dict[str, str], *, follow: bool, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """A small client for registry calls: (status, lower-cased headers, body)."""
    for _ in range(10):
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            found = {k.lower(): v for k, v in resp.getheaders()}
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(f'{method.title()} "{url}": {e}') from e
        finally:
            conn.close()
        if follow and resp.status in (301, 302, 303, 307, 308) and "location" in found:
            url = urljoin(url, found["location"])
            continue
        return resp.status, found, body
    raise DownloadError("stopped after 10 redirects")


def registry_status_error(status: int, body: bytes) -> DownloadError:
    """`makeRequestWithRetry`'s mapping: 404 is file-not-exist, others ``<code>: <body>``."""
    if status == 404:
        return DownloadError("file does not exist")
    return DownloadError(f"{status}: {body.decode('utf-8', 'replace')}")


@dataclass
class Part:
    n: int
    offset: int
    size: int
    completed: int

    def to_json(self) -> bytes:
        doc = {"N": self.n, "Offset": self.offset, "Size": self.size, "Completed": self.completed}
        return json.dumps(doc, separators=(",", ":")).encode()


class BlobDownload:
    def __init__(self, manager: DownloadManager, digest: str, path: Path) -> None:
        self.manager = manager
        self.digest = digest
        self.path = path
        self.total = 0
        self.completed = 0
        self.parts: list[Part] = []
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.error: str | None = None
        self._refs = 0
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def part_path(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}-partial-{n}")

    def prepare(self, url: str) -> None:
        """Resume from part files, or size the blob with a HEAD and create them."""
        for path in sorted(self.path.parent.glob(self.path.name + "-partial-*")):
            try:
                doc = json.loads(path.read_bytes())
                part = Part(int(doc["N"]), int(doc["Offset"]), int(doc["Size"]), 0)
                part.completed = int(doc["Completed"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DownloadError(f"{path.name}: {e}") from e
            self.total += part.size
            self.completed += part.completed
            self.parts.append(part)
        if self.parts:
            return
        status, headers, body = http_request("HEAD", url, self.manager.headers(), follow=True)
        if status >= 400:
            raise registry_status_error(status, body)
        self.total = int(headers.get("content-length") or 0)
        size = min(max(self.total // NUM_PARTS, MIN_PART), MAX_PART)
        offset = 0
        while offset < self.total:
            size = min(size, self.total - offset)
            part = Part(len(self.parts), offset, size, 0)
            self.part_path(part.n).write_bytes(part.to_json())
            self.parts.append(part)
            offset += size

    def acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs == 0:
                self.cancelled.set()

    def wait(self, gone: Callable[[], bool], fn: Callable[[dict[str, Any]], None]) -> None:
        """`blobDownload.Wait`: report progress every 60 ms until done, error or disconnect."""
        self.acquire()
        try:
            while not self.done.wait(TICK_S):
                if gone():
                    raise Cancelled
                fn(progress(self.digest, self.total, self.completed))
                if gone():
                    raise Cancelled
            if self.error is not None:
                raise DownloadError(self.error)
        finally:
            self.release()

    def run(self, url: str) -> None:
        try:
            self._run(url)
        except DownloadError as e:
            self.error = str(e)
        except OSError as e:
            self.error = str(e)
        finally:
            self.manager.forget(self)
            self.done.set()

    def _run(self, url: str) -> None:
        partial = self.path.with_name(self.path.name + "-partial")
        with os.fdopen(os.open(partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
            f.truncate(self.total)
            direct = self._direct_url(url)
            for part in self.parts:
                if part.completed < part.size:
                    self._download_part(direct, f, part)
        for part in self.parts:
            self.part_path(part.n).unlink(missing_ok=True)
        partial.replace(self.path)

    def _direct_url(self, url: str) -> str:
        """Follow the registry's redirect by hand and keep the CDN location."""
        status, headers, _ = http_request("GET", url, self.manager.headers(), follow=False)
        if status in (301, 302, 303, 307, 308) and "location" in headers:
            return urljoin(url, headers["location"])
        if status == 200:
            raise DownloadError("http: no Location header in response")
        raise DownloadError(f"unexpected status code {status}")

    def _download_part(self, url: str, f: BinaryIO, part: Part) -> None:
        tries = 0
        while tries < MAX_RETRIES:
            if self.cancelled.is_set():
                raise DownloadError("context canceled")
            outcome = self._chunk(url, f, part)
            if outcome is None:
                return
            if outcome == "stalled":
                log(f"{self.digest[7:19]} part {part.n} stalled; retrying")
                continue
            if outcome == "canceled":
                raise DownloadError("context canceled")
            delay = RETRY_BASE_S * 2**tries
            log(f"{self.digest[7:19]} part {part.n} attempt {tries} failed: {outcome}")
            tries += 1
            if self.cancelled.wait(delay):
                raise DownloadError("context canceled")
        raise DownloadError(f"max retries exceeded: {outcome}")

    def _chunk(self, url: str, f: BinaryIO, part: Part) -> str | None:
        """One ranged GET for the rest of a part. None when complete, else why it stopped."""
        start = part.offset + part.completed
        stop = part.offset + part.size
        got = 0
        outcome: str | None = None
        try:
            sock, pending, length = self._open_range(url, start, stop - 1)
        except DownloadError as e:
            return str(e)
        try:
            rate = self.manager.bandwidth
            began = last = time.monotonic()
            while start + got < stop:
                if self.cancelled.is_set():
                    outcome = "canceled"
                    break
                if pending:
                    data, pending = pending[: stop - start - got], b""
                elif select.select([sock], [], [], 0.05)[0]:
                    want = min(16384, stop - start - got, max(1024, rate // 20) if rate else 16384)
                    data = sock.recv(want)
                    if not data:
                        outcome = "unexpected EOF"
                        break
                else:
                    if time.monotonic() - last > STALL_S:
                        outcome = "stalled"
                        break
                    continue
                f.seek(start + got)
                f.write(data)
                got += len(data)
                part.completed += len(data)
                self.completed += len(data)
                last = time.monotonic()
                if rate:
                    ahead = got / rate - (last - began)
                    if ahead > 0 and self.cancelled.wait(ahead):
                        outcome = "canceled"
                        break
            if outcome is None and length is not None and got < length:
                outcome = "unexpected EOF"
        except OSError as e:
            part.completed -= got
            self.completed -= got
            outcome = f"read tcp: {e.strerror or e}"
        finally:
            sock.close()
            f.flush()
            self.part_path(part.n).write_bytes(part.to_json())
        return outcome

    def _open_range(
        self, url: str, first: int, last: int
    ) -> tuple[socket.socket, bytes, int | None]:
        """Send a ranged GET on a raw socket; return it with any body bytes already read."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        headers = self.manager.headers() | {"Range": f"bytes={first}-{last}", "Host": parts.netloc}
        request = f"GET {parts.path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall((request + "Connection: close\r\n\r\n").encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                if self.cancelled.is_set():
                    raise DownloadError("context canceled")
                if select.select([sock], [], [], 0.05)[0]:
                    data = sock.recv(65536)
                    if not data:
                        raise DownloadError("unexpected EOF")
                    buf += data
        except OSError as e:
            raise DownloadError(f'Get "{url}": {e}') from e
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        if status >= 400:
            sock.close()
            raise DownloadError(f"{status}: {rest.decode('utf-8', 'replace')}")
        length = fields.get("content-length")
        return sock, rest, int(length) if length else None


def progress(digest: str, total: int, completed: int) -> dict[str, Any]:
    """An `api.ProgressResponse` for a layer; zero fields are omitted like Go's omitempty."""
    out: dict[str, Any] = {"status": f"pulling {digest[7:19]}", "digest": digest}
    if total:
        out["total"] = total
    if completed:
        out["completed"] = completed
    return out


class DownloadManager:
    """`blobDownloadManager`: the running downloads, keyed by digest."""

    def __init__(self, bandwidth: int | None, user_agent: str) -> None:
        self.bandwidth = bandwidth or 0
        self.user_agent = user_agent
        self._lock = threading.Lock()
        self._downloads: dict[str, BlobDownload] = {}

    def headers(self) -> dict[str, str]:
        return {"User-Agent": self.user_agent}

    def get(self, digest: str, path: Path, url: str) -> BlobDownload:
        """Join the download of ``digest`` or start one (prepare runs in the caller)."""
        while True:
            with self._lock:
                existing = self._downloads.get(digest)
                if existing is None:
                    download = BlobDownload(self, digest, path)
                    self._downloads[digest] = download
                    break
            if not existing.cancelled.is_set():
                return existing
            # A cancelled download is still writing its part files: let it finish first.
            existing.done.wait(5)
            self.forget(existing)
        try:
            download.prepare(url)
        except DownloadError as e:
            download.error = str(e)
            self.forget(download)
            download.done.set()
            raise
        download.thread = threading.Thread(target=download.run, args=(url,), daemon=True)
        download.thread.start()
        return download

    def forget(self, download: BlobDownload) -> None:
        with self._lock:
            if self._downloads.get(download.digest) is download:
                del self._downloads[download.digest]

    def shutdown(self, timeout: float = 3.0) -> None:
        """Cancel every download and let each write its part files."""
        with self._lock:
            downloads = list(self._downloads.values())
        for download in downloads:
            download.cancelled.set()
        deadline = time.monotonic() + timeout
        for download in downloads:
            if download.thread is not None:
                download.thread.join(max(0.0, deadline - time.monotonic()))
