"""Fixtures for the Ollama test server's own tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OllamaServer]:
    with start_ollama_server(tmp_path, DEFAULT_CATALOGUE) as srv:
        yield srv


@pytest.fixture
def http(server: OllamaServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
        yield client


@pytest.fixture
def client(server: OllamaServer) -> Iterator[ollama.Client]:
    c = ollama.Client(server.url, trust_env=False)
    try:
        yield c
    finally:
        c.close()
