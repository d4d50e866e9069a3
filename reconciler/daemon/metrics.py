"""Prometheus metrics of the ``watch`` daemon, served on ``/metrics`` when asked for.

A :class:`Metrics` is either started (it owns a ``CollectorRegistry`` and an HTTP server on a
daemon thread) or disabled (every method returns at once). The daemon holds one of the two and
never asks which: instrumenting a code path costs nothing when metrics are off.

``prometheus_client`` and the HTTP server modules are imported only by :meth:`Metrics.start`:
``infernet plan`` and a daemon without metrics never pay for them.

The registry is our own, not ``prometheus_client.REGISTRY``: the process-global one would also
export whatever any imported library registers there, and tests could not start two.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from typing import TYPE_CHECKING, cast

from reconciler.errors import ConfigError

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RECONCILE_OUTCOMES = ("converged", "not_converged", "failed", "skipped_invalid")
ACTION_OUTCOMES = ("ok", "failed", "skipped")
HEARTBEAT_RESULTS = ("ok", "failed")

# A reconcile is milliseconds when nothing changes and can be an hour when it pulls 40 GB.
_RECONCILE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_PORT = re.compile(r"[0-9]{1,5}")
# A scrape that stops sending must not hold a server thread forever.
_REQUEST_TIMEOUT_S = 30.0
_POLL_S = 0.1


class Metrics:
    """No-op unless started: every method is safe to call when metrics are off."""

    def __init__(self) -> None:
        # Disabled; only start() fills these in.
        self._m: _Instruments | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, addr: str) -> Metrics:
        """Serve ``/metrics`` on ``addr`` (``host:port``, ``:port``, ``[v6]:port``).

        ``:port`` listens on loopback only (127.0.0.1): the metrics name the node's models and
        failures, so reaching them from the network takes an explicit ``0.0.0.0:port``. Port 0
        picks a free port (see ``address``).
        A malformed address, an unknown host or a port that can't be bound raises
        ``ConfigError`` naming the address.
        """
        host, port = _split(addr)
        self = cls()
        self._m = _Instruments()
        self._server, self._thread = _serve(addr, host, port, self._m.registry)
        return self

    @classmethod
    def disabled(cls) -> Metrics:
        """A Metrics whose every method does nothing."""
        return cls()

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` being served, the real port when started on 0; None when off."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def reconcile(self, *, outcome: str, seconds: float) -> None:
        """One reconcile ended: converged | not_converged | failed | skipped_invalid."""
        if self._m is None:
            return
        self._m.reconciles.labels(outcome=outcome).inc()
        self._m.reconcile_seconds.observe(max(seconds, 0.0))
        self._m.last_reconcile.labels(outcome=outcome).set(time.time())

    def action(self, *, op: str, outcome: str) -> None:
        """One plan action ended (``op`` as in the plan): ok | failed | skipped."""
        if self._m is None:
            return
        self._m.actions.labels(op=op, outcome=outcome).inc()

    def bytes_pulled(self, n: int) -> None:
        """``n`` more bytes downloaded; counters only go up, so ``n <= 0`` is ignored."""
        if self._m is None or n <= 0:
            return
        self._m.pulled_bytes.inc(n)

    def drift(self, n: int) -> None:
        """Actions the last check found pending (0 = converged)."""
        if self._m is None:
            return
        self._m.drift.set(n)

    def vram(self, *, total: int | None, pinned: int, largest_swap_in: int, reserve: int) -> None:
        """The VRAM budget of the last plan, in bytes; ``total=None`` when it is unknown."""
        if self._m is None:
            return
        gauge = self._m.vram
        if total is None:
            # An absent series, not a stale number or 0, is how Prometheus says "unknown".
            with contextlib.suppress(KeyError):  # prometheus-client < 0.21 raises on a miss
                gauge.remove("total")
        else:
            gauge.labels(part="total").set(total)
        gauge.labels(part="pinned").set(pinned)
        gauge.labels(part="largest_swap_in").set(largest_swap_in)
        gauge.labels(part="reserve").set(reserve)

    def heartbeat(self, *, ok: bool) -> None:
        """One heartbeat to the control plane, answered 2xx or not."""
        if self._m is None:
            return
        self._m.heartbeats.labels(result="ok" if ok else "failed").inc()

    def config_valid(self, valid: bool) -> None:
        """Whether the file as last read is usable (1) or was refused (0)."""
        if self._m is None:
            return
        self._m.config_valid.set(1 if valid else 0)

    def close(self) -> None:
        """Stop the HTTP server and free its port; idempotent, and a no-op when disabled."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever sees it, within one poll interval
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)


class _Instruments:
    """Every metric, registered in a fresh registry; built only when metrics are on."""

    registry: CollectorRegistry
    reconciles: Counter
    reconcile_seconds: Histogram
    last_reconcile: Gauge
    actions: Counter
    pulled_bytes: Counter
    drift: Gauge
    vram: Gauge
    heartbeats: Counter
    config_valid: Gauge

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
        )

        from reconciler import __version__
        from reconciler.model import Op

        reg = self.registry = CollectorRegistry(auto_describe=True)
        # process_* (RSS, CPU, open fds, start time): a leaking or wedged daemon shows here.
        ProcessCollector(registry=reg)
        info = Gauge(
            "infernet_build_info",
            "Always 1; labels say which infernet is running.",
            ["version"],
            registry=reg,
        )
        info.labels(version=__version__).set(1)

        self.reconciles = Counter(
            "infernet_reconciles", "Reconciles run, by outcome.", ["outcome"], registry=reg
        )
        self.reconcile_seconds = Histogram(
            "infernet_reconcile_seconds",
            "Duration of one reconcile (observe, plan, apply).",
            registry=reg,
            buckets=_RECONCILE_BUCKETS,
        )
        self.last_reconcile = Gauge(
            "infernet_last_reconcile_timestamp_seconds",
            "Unix time the last reconcile with this outcome ended.",
            ["outcome"],
            registry=reg,
        )
        self.actions = Counter(
            "infernet_actions",
            "Plan actions run, by operation and outcome.",
            ["op", "outcome"],
            registry=reg,
        )
        self.pulled_bytes = Counter(
            "infernet_pulled_bytes", "Bytes of model weights downloaded.", registry=reg
        )
        self.drift = Gauge(
            "infernet_drift_actions",
            "Actions pending at the last check; 0 when the node is converged.",
            registry=reg,
        )
        self.vram = Gauge(
            "infernet_vram_budget_bytes",
            "VRAM budget of the last plan: total, pinned models, largest swap-in model, reserve.",
            ["part"],
            registry=reg,
        )
        self.heartbeats = Counter(
            "infernet_heartbeats", "Heartbeats sent, by result.", ["result"], registry=reg
        )
        self.config_valid = Gauge(
            "infernet_config_valid",
            "1 if infernet.yaml as last read is valid, 0 if refused.",
            registry=reg,
        )

        # NaN, not 0, until the daemon first reads the file and plans: 0 would claim "invalid"
        # and "converged" before anything is known, and `== 0` alerts ignore NaN.
        self.drift.set(math.nan)
        self.config_valid.set(math.nan)

        # Known label sets start at 0 so rate() and "failed > 0" alerts work from the first
        # scrape, not only after the first failure.
        for outcome in RECONCILE_OUTCOMES:
            self.reconciles.labels(outcome=outcome)
        for op in Op:
            for outcome in ACTION_OUTCOMES:
                self.actions.labels(op=op.value, outcome=outcome)
        for result in HEARTBEAT_RESULTS:
            self.heartbeats.labels(result=result)


def _split(addr: str) -> tuple[str, int]:
    """``host:port`` → (host, port); brackets stripped from IPv6; an empty host = 127.0.0.1."""
    host, sep, port_text = addr.strip().rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise ConfigError(f"metrics address {addr!r}: expected HOST:PORT, :PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"metrics address {addr!r}: write an IPv6 host in brackets, [::1]:PORT")
    # Like Prometheus exporters, ":9464" means every interface; IPv4 only, because dual-stack
    # binding is not available everywhere and a node that wants IPv6 can say "[::]:9464".
    return host or "127.0.0.1", int(port_text)


def _serve(
    addr: str, host: str, port: int, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread]:
    """Bind and serve the registry on a daemon thread; ``ConfigError`` if that can't be done."""
    import errno
    import socket
    import socketserver
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from prometheus_client import make_wsgi_app

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"metrics address {addr!r}: unknown host {host!r} ({e})") from None
    family, sockaddr = infos[0][0], infos[0][4]
    # The whole sockaddr, so an IPv6 link-local scope (fe80::1%eth0) survives.
    bind_to = cast("tuple[str, int] | tuple[str, int, int, int]", sockaddr)

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True  # a hung scrape never delays the daemon's exit

        def server_bind(self) -> None:
            # HTTPServer.server_bind calls socket.getfqdn(host), a reverse DNS lookup that can
            # stall the daemon's start for seconds on a node without working DNS.
            socketserver.TCPServer.server_bind(self)
            bound_host, bound_port = self.server_address[:2]
            self.server_name, self.server_port = str(bound_host), int(bound_port)
            self.setup_environ()

    class Handler(WSGIRequestHandler):
        timeout = _REQUEST_TIMEOUT_S

        def log_message(self, format: str, *args: object) -> None:
            # The default writes an access line per scrape to stderr, in neither log format.
            pass

    try:
        server = Server(bind_to, Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} is already in use"
        else:
            why = e.strerror or str(e)
        raise ConfigError(f"metrics address {addr!r}: cannot listen: {why}") from None
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(
        target=server.serve_forever,
        # 0.1 s, not the default 0.5 s: close() waits up to one interval, inside the daemon's
        # 5 s stop budget; ten idle wake-ups a second cost nothing measurable.
        kwargs={"poll_interval": _POLL_S},
        name="infernet-metrics",
        daemon=True,
    )
    thread.start()
    return server, thread
