"""Reading Server-Sent Events the way OpenAI clients do (``data:`` lines only)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import httpx

DONE = "[DONE]"


def data_payloads(lines: Iterable[str]) -> list[str]:
    """The ``data:`` payloads of an event stream, in order (comments and other fields skipped)."""
    payloads = []
    for line in lines:
        if line.startswith("data:"):
            payloads.append(line[5:].removeprefix(" "))
    return payloads


def decode(payloads: Iterable[str]) -> list[Any]:
    """JSON payloads decoded; ``[DONE]`` kept as the string."""
    return [p if p == DONE else json.loads(p) for p in payloads]


def stream_chat(
    client: httpx.Client, url: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[Any]]:
    """POST a streamed chat and read it to the end: (response, decoded events)."""
    with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp, []
        events = decode(data_payloads(resp.iter_lines()))
    return resp, events


def content(events: Iterable[Any]) -> str:
    """The concatenated ``choices[0].delta.content`` of chat chunks."""
    text = []
    for event in events:
        if isinstance(event, dict) and event.get("choices"):
            delta = event["choices"][0].get("delta") or {}
            text.append(delta.get("content") or "")
    return "".join(text)


def finish_reasons(events: Iterable[Any]) -> list[str]:
    return [
        e["choices"][0]["finish_reason"]
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")
    ]
