"""The proxy a request goes through: the environment's (``HTTPS_PROXY``, ``NO_PROXY``…), as
httpx chooses it. urllib scans every variable on each call (~0.3 ms, twice a request, a good
part of a job's start), so the choice is made once per host and proxy settings."""

from __future__ import annotations

import functools
import os
import urllib.request

import httpx

VARIABLES = tuple(
    name
    for lower in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for name in (lower, lower.upper())
)
"""The variables a proxy choice for http(s) depends on (urllib reads the whole environment)."""


def proxy_for(url: httpx.URL) -> str | None:
    """The environment's proxy for ``url`` (``NO_PROXY`` honoured), as httpx chooses it."""
    host = url.host
    if not host:
        return None
    return _proxy_of(url.scheme, host, tuple(os.environ.get(name) for name in VARIABLES))


@functools.lru_cache(maxsize=256)
def _proxy_of(scheme: str, host: str, _settings: tuple[str | None, ...]) -> str | None:
    if urllib.request.proxy_bypass(host):
        return None
    found = urllib.request.getproxies()
    proxy = found.get(scheme) or found.get("all")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    return proxy or None
