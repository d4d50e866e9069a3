"""A job as the control plane hands it out, checked before anything runs.

``POST /api/v1/node/jobs/poll`` returns the nine columns of each ``assigned`` job of this node:
id, title, type, status, payment_offer, payment_coin, model_name, input_spec, created_at. Only
``chat`` jobs exist; ``input_spec`` holds ``messages`` (role/content strings), ``max_tokens``
and ``temperature``, either of which may be null or, from the real ``/api/chat``, not even a
number (the real engines pass them on only when they are numbers; so do we).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from reconciler.backends.base import ChatRequest
from reconciler.limits import MAX_JOB_ID, MAX_MESSAGES, MAX_PROMPT_CHARS


@dataclass(frozen=True)
class Job:
    """One assigned job, as polled."""

    id: str
    type: str
    model_name: str | None
    created_at: datetime | None
    input_spec: dict[str, Any]


def parse_row(row: object) -> Job | None:
    """A poll row as a ``Job``; None when it has no usable id (it can't be answered)."""
    if not isinstance(row, dict):
        return None
    job_id = row.get("id")
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID:
        return None
    if not job_id.isprintable() or "/" in job_id:
        return None
    kind = row.get("type")
    model = row.get("model_name")
    spec = row.get("input_spec")
    return Job(
        id=job_id,
        type=kind if isinstance(kind, str) else "",
        model_name=model if isinstance(model, str) and model else None,
        created_at=parse_time(row.get("created_at")),
        input_spec=spec if isinstance(spec, dict) else {},
    )


def parse_time(value: object) -> datetime | None:
    """Postgres' ``2026-04-28T19:20:01.123456+00:00`` (or any ISO-8601 form), in UTC."""
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


def chat_request(spec: dict[str, Any]) -> ChatRequest | str:
    """The chat a job asks for, or why it can't be run (one line)."""
    messages = spec.get("messages")
    if not isinstance(messages, list) or not messages:
        return "input_spec.messages must be a non-empty list of {role, content}"
    if len(messages) > MAX_MESSAGES:
        return f"input_spec.messages has {len(messages)} messages; at most {MAX_MESSAGES}"
    checked: list[dict[str, str]] = []
    size = 0
    for item in messages:
        if not isinstance(item, dict):
            return "input_spec.messages must hold {role, content} objects"
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return "each message needs a string role and a string content"
        size += len(content)
        checked.append({"role": role, "content": content})
    if size > MAX_PROMPT_CHARS:
        return f"the messages hold {size} characters; at most {MAX_PROMPT_CHARS}"
    return ChatRequest(
        messages=tuple(checked),
        max_tokens=_positive_int(spec.get("max_tokens")),
        temperature=_finite(spec.get("temperature")),
    )


def _positive_int(value: object) -> int | None:
    number = _finite(value)
    if number is None or number < 1:
        return None
    return int(min(number, 1 << 20))


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
