"""Prometheus metrics of the daemon (reconciler.daemon.metrics), scraped over real HTTP."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from reconciler.daemon.metrics import Metrics
from reconciler.errors import ConfigError

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

GIB = 1024**3
FAMILIES = {
    "infernet_reconciles": "counter",
    "infernet_reconcile_seconds": "histogram",
    "infernet_last_reconcile_timestamp_seconds": "gauge",
    "infernet_actions": "counter",
    "infernet_pulled_bytes": "counter",
    "infernet_drift_actions": "gauge",
    "infernet_vram_budget_bytes": "gauge",
    "infernet_heartbeats": "counter",
    "infernet_config_valid": "gauge",
    "infernet_build_info": "gauge",
}


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    # Port 0: the kernel picks a free port, read back from .address, so no race with others.
    m = Metrics.start("127.0.0.1:0")
    try:
        yield m
    finally:
        m.close()


def scrape_text(m: Metrics) -> str:
    assert m.address is not None
    host, port = m.address
    response = httpx.get(f"http://{host}:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def scrape(m: Metrics) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(scrape_text(m))
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_every_family_is_exposed_with_its_type_and_help(metrics: Metrics) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape_text(metrics))}
    for name, kind in FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert families[name].documentation.strip(), f"{name} has no help text"
    # Our own metrics are all prefixed; the rest is the standard process collector.
    assert {n for n in families if not n.startswith("infernet_")} <= {
        n for n in families if n.startswith("process_")
    }


def test_failure_series_exist_from_the_first_scrape_and_unknowns_are_nan(
    metrics: Metrics,
) -> None:
    samples = scrape(metrics)
    for outcome in ("converged", "not_converged", "failed", "skipped_invalid"):
        assert value(samples, "infernet_reconciles_total", outcome=outcome) == 0
    for op in ("pull", "remove", "pin", "unpin", "update"):
        for outcome in ("ok", "failed", "skipped"):
            assert value(samples, "infernet_actions_total", op=op, outcome=outcome) == 0
    assert value(samples, "infernet_heartbeats_total", result="failed") == 0
    # Nothing read or planned yet: neither "invalid" nor "converged" may be claimed.
    assert math.isnan(value(samples, "infernet_config_valid"))
    assert math.isnan(value(samples, "infernet_drift_actions"))
    assert not any(name == "infernet_vram_budget_bytes" for name, _ in samples)


def test_recorded_values_are_served(metrics: Metrics) -> None:
    metrics.reconcile(outcome="converged", seconds=1.5)
    metrics.reconcile(outcome="converged", seconds=0.02)
    metrics.reconcile(outcome="failed", seconds=3.0)
    metrics.action(op="pull", outcome="ok")
    metrics.action(op="pull", outcome="ok")
    metrics.action(op="remove", outcome="failed")
    metrics.bytes_pulled(100)
    metrics.bytes_pulled(50)
    metrics.bytes_pulled(0)
    metrics.bytes_pulled(-7)  # a counter can't go down: ignored, not an exception
    metrics.drift(3)
    metrics.vram(total=24 * GIB, pinned=2 * GIB, largest_swap_in=13 * GIB, reserve=GIB)
    metrics.heartbeat(ok=True)
    metrics.heartbeat(ok=False)
    metrics.heartbeat(ok=False)
    metrics.config_valid(True)

    s = scrape(metrics)
    assert value(s, "infernet_reconciles_total", outcome="converged") == 2
    assert value(s, "infernet_reconciles_total", outcome="failed") == 1
    assert value(s, "infernet_reconciles_total", outcome="not_converged") == 0
    assert value(s, "infernet_reconcile_seconds_count") == 3
    assert value(s, "infernet_reconcile_seconds_sum") == pytest.approx(4.52)
    assert value(s, "infernet_reconcile_seconds_bucket", le="0.05") == 1
    assert value(s, "infernet_reconcile_seconds_bucket", le="+Inf") == 3
    assert value(s, "infernet_last_reconcile_timestamp_seconds", outcome="converged") > 1e9
    assert value(s, "infernet_actions_total", op="pull", outcome="ok") == 2
    assert value(s, "infernet_actions_total", op="remove", outcome="failed") == 1
    assert value(s, "infernet_pulled_bytes_total") == 150
    assert value(s, "infernet_drift_actions") == 3
    assert value(s, "infernet_vram_budget_bytes", part="total") == 24 * GIB
    assert value(s, "infernet_vram_budget_bytes", part="pinned") == 2 * GIB
    assert value(s, "infernet_vram_budget_bytes", part="largest_swap_in") == 13 * GIB
    assert value(s, "infernet_vram_budget_bytes", part="reserve") == GIB
    assert value(s, "infernet_heartbeats_total", result="ok") == 1
    assert value(s, "infernet_heartbeats_total", result="failed") == 2
    assert value(s, "infernet_config_valid") == 1

    metrics.config_valid(False)
    metrics.drift(0)
    metrics.vram(total=None, pinned=0, largest_swap_in=GIB, reserve=GIB)
    s = scrape(metrics)
    assert value(s, "infernet_config_valid") == 0
    assert value(s, "infernet_drift_actions") == 0
    # Total unknown now: the series goes away rather than keep a stale number.
    assert ("infernet_vram_budget_bytes", frozenset({("part", "total")})) not in s
    assert value(s, "infernet_vram_budget_bytes", part="pinned") == 0


def test_each_instance_has_its_own_registry_not_the_global_one() -> None:
    a, b = Metrics.start("127.0.0.1:0"), Metrics.start("127.0.0.1:0")
    try:
        a.bytes_pulled(10)
        assert value(scrape(a), "infernet_pulled_bytes_total") == 10
        assert value(scrape(b), "infernet_pulled_bytes_total") == 0
        assert REGISTRY.get_sample_value("infernet_pulled_bytes_total") is None
    finally:
        a.close()
        b.close()


def test_close_stops_serving_and_frees_the_port() -> None:
    m = Metrics.start("127.0.0.1:0")
    assert m.address is not None
    port = m.address[1]
    m.close()
    m.close()  # idempotent
    assert m.address is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    again = Metrics.start(f"127.0.0.1:{port}")
    again.close()


def test_empty_host_listens_on_loopback_only() -> None:
    """``--metrics-addr :PORT`` used to listen on every interface."""
    m = Metrics.start(":0")
    try:
        assert m.address is not None
        assert m.address[0] == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{m.address[1]}/metrics", timeout=5).status_code == 200
    finally:
        m.close()


def test_every_interface_only_when_asked() -> None:
    m = Metrics.start("0.0.0.0:0")
    try:
        assert m.address is not None and m.address[0] == "0.0.0.0"
    finally:
        m.close()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_bracketed_ipv6_address() -> None:
    m = Metrics.start("[::1]:0")
    try:
        assert m.address is not None
        assert m.address[0] == "::1"
        response = httpx.get(f"http://[::1]:{m.address[1]}/metrics", timeout=5)
        assert "infernet_reconciles_total" in response.text
    finally:
        m.close()


def test_port_in_use_is_a_one_line_config_error_naming_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError) as caught:
            Metrics.start(addr)
    message = str(caught.value)
    assert addr in message
    assert "in use" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "9464",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:65536",
        "::1:9464",
        "host.invalid:9464",
    ],
)
def test_bad_address_is_a_one_line_config_error_naming_it(addr: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Metrics.start(addr)
    message = str(caught.value)
    assert repr(addr) in message
    assert "\n" not in message


def test_disabled_is_a_no_op() -> None:
    m = Metrics.disabled()
    m.reconcile(outcome="converged", seconds=1.0)
    m.action(op="pull", outcome="ok")
    m.bytes_pulled(5)
    m.drift(2)
    m.vram(total=None, pinned=1, largest_swap_in=2, reserve=3)
    m.heartbeat(ok=False)
    m.config_valid(True)
    assert m.address is None
    m.close()
    m.close()


def test_metrics_off_never_imports_prometheus_client() -> None:
    # A fresh interpreter: this test process has imported prometheus_client already.
    code = textwrap.dedent(
        """
        import sys
        from reconciler.daemon.metrics import Metrics
        m = Metrics.disabled()
        m.reconcile(outcome="converged", seconds=0.1)
        m.action(op="pull", outcome="ok")
        m.bytes_pulled(1)
        m.drift(0)
        m.vram(total=1, pinned=0, largest_swap_in=0, reserve=0)
        m.heartbeat(ok=True)
        m.config_valid(True)
        m.close()
        heavy = ("prometheus_client", "wsgiref")
        loaded = sorted(n for n in sys.modules if n.split(".")[0] in heavy)
        print(",".join(loaded) or "none")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "none"
