"""Helpers shared by the Ollama test server's tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx


def pull_lines(http: httpx.Client, model: str, **body: Any) -> tuple[int, list[dict[str, Any]]]:
    """Run a streamed pull to the end: (HTTP status, decoded lines)."""
    with http.stream("POST", "/api/pull", json={"model": model, **body}) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    return resp.status_code, lines


def statuses(lines: list[dict[str, Any]]) -> list[str]:
    """Status texts with consecutive repeats collapsed."""
    out: list[str] = []
    for line in lines:
        text = line.get("status") or f"error: {line.get('error')}"
        if not out or out[-1] != text:
            out.append(text)
    return out


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def model_spec(weights_size: int = 100_000, **extra: Any) -> dict[str, Any]:
    return {
        "family": "llama",
        "parameter_count": 1_000_000_000,
        "weights_size": weights_size,
    } | extra
