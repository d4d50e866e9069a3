"""Every request to a peer has an overall deadline and every body read a size cap; URLs are
shown without their secrets.

httpx's timeouts are per socket operation: a peer that sends one byte every few seconds never
trips them, so its headers or its body can take forever (a control plane trickling its answer
held ``apply`` for hours). Here the deadline is checked where the waiting happens: the
network stream under httpcore gives every connect, read and write only what is left of the
request's time, so a trickle of header bytes ends on time too, not only a trickle of body.

Three kinds of limits, per client (``Limits``) and per request (``limits(...)`` as httpx
``extensions``):

* ``deadline``: seconds for the whole exchange (connect, send, headers, body);
* ``max_body``: bytes of body read at most; an answer announcing more is refused before a
  byte is read, one sending more is cut off there. Guarded clients ask for
  ``Accept-Encoding: identity``, and a capped answer that comes compressed anyway is refused:
  a 1 MiB gzip body can inflate to gigabytes;
* ``window``/``min_bytes`` for downloads, which may take hours: the answer must start within
  ``window`` seconds and every ``window`` seconds must bring ``min_bytes`` more. A stall
  or a trickle fails; a slow but real download doesn't.

``INFERNET_HTTP_TIMEOUT`` (seconds) replaces the default deadline of every API request (not
downloads, not model loads, which have their own). Errors are httpx's own classes, so the
callers' handling stays as it is: a passed deadline is a ``ReadTimeout`` (or ``Connect``/
``WriteTimeout``), a refused body a ``RemoteProtocolError`` (``BodyRefused``).

``redact`` (``reconciler.redact``, re-exported here) is the one rule for showing a URL: no
``user:password@`` and no query string (signed URLs carry their signature there). Every URL
that is logged, stored, shown or sent goes through it.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import httpcore
import httpx

from reconciler import proxies
from reconciler.limits import BACKEND_BODY, PROGRESS_BYTES, KiB, MiB
from reconciler.redact import redact

DEADLINE = 30.0
"""The default deadline of one API request, in seconds."""
DEADLINE_ENV = "INFERNET_HTTP_TIMEOUT"
EXTENSION = "infernet.limits"


@dataclass(frozen=True)
class Limits:
    """How long a request may take in all, and how much of its answer is read."""

    deadline: float | None = DEADLINE
    max_body: int | None = BACKEND_BODY
    window: float | None = None  # downloads: ``min_bytes`` every ``window`` seconds
    min_bytes: int = PROGRESS_BYTES


class BodyRefused(httpx.RemoteProtocolError):
    """The answer is larger than this client reads, or compressed when it must not be."""


def default_deadline(fallback: float = DEADLINE) -> float:
    """``INFERNET_HTTP_TIMEOUT`` when it is a positive number of seconds, else ``fallback``."""
    text = os.environ.get(DEADLINE_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return fallback
    return value if value > 0 else fallback


def limits(
    *,
    deadline: float | None = None,
    max_body: int | None = None,
    window: float | None = None,
    min_bytes: int = PROGRESS_BYTES,
) -> dict[str, Any]:
    """Per-request ``extensions`` replacing the client's limits for that request."""
    return {EXTENSION: Limits(deadline, max_body, window, min_bytes)}


def download(window: float) -> dict[str, Any]:
    """``extensions`` for a download: no overall deadline and no cap, a progress deadline."""
    return limits(deadline=None, max_body=None, window=window)


def client(
    limits: Limits,
    *,
    verify: ssl.SSLContext | bool = True,
    trust_env: bool = True,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` whose every request keeps ``limits`` (unless the request says
    otherwise). ``trust_env`` reads proxies and ``SSL_CERT_FILE`` from the environment."""
    return httpx.Client(
        transport=transport(limits, verify=verify, trust_env=trust_env),
        headers={**identity(), **(headers or {})},
        trust_env=False,  # proxies are the transport's: httpx's own would bypass the guard
        **kwargs,
    )


def identity() -> dict[str, str]:
    """The header guarded clients send: answers uncompressed, so the cap is the real size."""
    return {"Accept-Encoding": "identity"}


def transport(
    limits: Limits, *, verify: ssl.SSLContext | bool = True, trust_env: bool = True
) -> GuardedTransport:
    """The transport behind ``client``, for clients built elsewhere (the ``ollama`` client)."""
    return GuardedTransport(limits, verify=verify, trust_env=trust_env)


# --------------------------------------------------------------------------- the deadline

_local = threading.local()  # ``deadline``: this thread's request must end by then (monotonic)


@contextlib.contextmanager
def _until(deadline: float | None) -> Iterator[None]:
    """Give this thread's socket operations until ``deadline``; restores the outer one."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = outer


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the request's time; ``late`` when none is."""
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A socket stream whose every operation ends by the request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's socket backend, with every stream under the deadline."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, left, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# httpcore's exceptions as httpx's, most specific first (what httpx's own transport does).
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _as_httpx() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in _EXCEPTIONS:
            if isinstance(exc, theirs):
                raise ours(str(exc) or type(exc).__name__) from exc
        raise


class _Body(httpx.SyncByteStream):
    """An answer's body, read under the request's limits."""

    def __init__(
        self, inner: Iterable[bytes], limits: Limits, deadline: float | None, where: str
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._deadline = deadline
        self._where = where
        self._read = 0
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            with _as_httpx(), _until(self._next_deadline()):
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
            self._count(len(chunk))
            yield chunk

    def _next_deadline(self) -> float | None:
        if self._limits.window is not None:
            return self._window_start + self._limits.window
        return self._deadline

    def _count(self, n: int) -> None:
        self._read += n
        cap = self._limits.max_body
        if cap is not None and self._read > cap:
            raise BodyRefused(
                f"{self._where} sent more than the {_size(cap)} infernet reads from it; refused"
            )
        window = self._limits.window
        if window is None:
            return
        now = time.monotonic()
        self._window_bytes += n
        if self._window_bytes >= self._limits.min_bytes:
            self._window_start, self._window_bytes = now, 0  # progress: a new window starts
        elif now - self._window_start > window:
            raise httpx.ReadTimeout(
                f"{self._where} sent {self._window_bytes} bytes in {window:g} s, less than "
                f"{_size(self._limits.min_bytes)}: stalled"
            )

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            with _as_httpx():
                close()


class GuardedTransport(httpx.BaseTransport):
    """httpcore's connection pools over a network backend that keeps the deadline.

    Proxies come from the environment (``HTTPS_PROXY``, ``NO_PROXY``…) when ``trust_env``,
    as httpx does; each proxy gets its own guarded pool.
    """

    def __init__(
        self, limits: Limits, *, verify: ssl.SSLContext | bool = True, trust_env: bool = True
    ) -> None:
        self.limits = limits
        self._trust_env = trust_env
        self._verify = verify
        self._pools: dict[tuple[str | None, bool], httpcore.ConnectionPool] = {}
        self._lock = threading.Lock()

    def _pool(self, url: httpx.URL) -> httpcore.ConnectionPool:
        proxy = proxies.proxy_for(url) if self._trust_env else None
        tls = url.scheme == "https"
        with self._lock:
            pool = self._pools.get((proxy, tls))
            if pool is None:
                pool = self._pools[(proxy, tls)] = self._make_pool(proxy, tls)
        return pool

    def _make_pool(self, proxy: str | None, tls: bool) -> httpcore.ConnectionPool:
        # An SSL context costs ~15 ms to build: only pools that speak TLS get one, and only
        # when first used (most clients here talk plain HTTP to a local backend).
        context = None
        if tls or proxy is not None:
            context = httpx.create_ssl_context(verify=self._verify, trust_env=self._trust_env)
        if proxy is None:
            return httpcore.ConnectionPool(ssl_context=context, network_backend=_Backend())
        parsed = httpx.URL(proxy)
        auth = None
        if parsed.username or parsed.password:
            auth = (parsed.username.encode(), parsed.password.encode())
        return httpcore.HTTPProxy(
            proxy_url=httpcore.URL(
                scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=b"/"
            ),
            proxy_auth=auth,
            ssl_context=context,
            network_backend=_Backend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        found = request.extensions.get(EXTENSION)
        limits = found if isinstance(found, Limits) else self.limits
        first = limits.deadline if limits.deadline is not None else limits.window
        deadline = None if first is None else time.monotonic() + first
        where = redact(f"{request.url.scheme}://{request.url.netloc.decode('ascii', 'replace')}")
        assert isinstance(request.stream, httpx.SyncByteStream)
        extensions = {k: v for k, v in request.extensions.items() if k != EXTENSION}
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=extensions,
        )
        with _as_httpx(), _until(deadline):
            answer = self._pool(request.url).handle_request(core)
        assert isinstance(answer.stream, Iterable)
        body = _Body(answer.stream, limits, deadline, where)
        response = httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=body,
            extensions=answer.extensions,
        )
        try:
            if request.method != "HEAD":  # a HEAD's Content-Length is the resource's, no body
                _check_headers(response, limits, where)
        except BodyRefused:
            body.close()
            raise
        return response

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            with _as_httpx():
                pool.close()


def _check_headers(response: httpx.Response, limits: Limits, where: str) -> None:
    """Refuse, before reading it, an answer that can only break the cap."""
    cap = limits.max_body
    if cap is None:
        return
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        _refuse(
            f"{where} announced {_size(int(length))}, more than the {_size(cap)} infernet "
            "reads from it; refused"
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        _refuse(
            f"{where} sent a {encoding}-compressed answer although infernet asked for none; "
            "refused (its real size can't be capped)"
        )


def _refuse(message: str) -> NoReturn:
    raise BodyRefused(message)


def _size(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.4g} MiB"
    if n >= KiB:
        return f"{n / KiB:.4g} KiB"
    return f"{n} bytes"


__all__ = [
    "DEADLINE",
    "DEADLINE_ENV",
    "BodyRefused",
    "GuardedTransport",
    "Limits",
    "client",
    "default_deadline",
    "download",
    "identity",
    "limits",
    "redact",
    "transport",
]
