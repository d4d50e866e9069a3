"""The proxy a guarded request goes through: the environment's, as httpx would choose it, and
a change of the environment counts at once (the choice is cached per host and settings)."""

from __future__ import annotations

import httpx
import pytest

from reconciler import proxies

REGISTRY = httpx.URL("https://registry.ollama.ai/v2/library/qwen2.5/manifests/7b")
LOCAL = httpx.URL("http://127.0.0.1:11434/api/chat")


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in proxies.VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_no_proxy_variables_means_a_direct_connection() -> None:
    assert proxies.proxy_for(REGISTRY) is None


def test_the_schemes_proxy_is_used_and_a_bare_host_gets_http(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.corp:3128")
    assert proxies.proxy_for(REGISTRY) == "http://proxy.corp:3128"
    assert proxies.proxy_for(LOCAL) is None  # http:// has its own variable
    monkeypatch.setenv("ALL_PROXY", "http://all.corp:8080")
    assert proxies.proxy_for(LOCAL) == "http://all.corp:8080"


def test_no_proxy_is_honoured_and_a_change_counts_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", "http://proxy.corp:3128")
    assert proxies.proxy_for(REGISTRY) == "http://proxy.corp:3128"
    monkeypatch.setenv("no_proxy", "registry.ollama.ai")
    assert proxies.proxy_for(REGISTRY) is None
    monkeypatch.delenv("no_proxy")
    monkeypatch.setenv("https_proxy", "http://other.corp:3128")
    assert proxies.proxy_for(REGISTRY) == "http://other.corp:3128"
