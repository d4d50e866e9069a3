"""The real job router's arithmetic (``apps/web/lib/data/chat.js``), as pure functions.

``pickChatProvider`` keeps providers that are ``available``, seen in the last 2 minutes, that
list the requested model in ``specs.served_models`` (exact string, only when a model is named)
and that are not saturated; ``reputationWeightedPick`` then draws one with weight
``reputation × speed × headroom``. JavaScript's coercions matter here (``Number(null)`` is 0,
``Number.isFinite`` refuses strings), so :func:`js_number` and :func:`is_finite` spell them out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

LIVE_WINDOW_S = 120.0
DEFAULT_CONCURRENCY_CAP = 4
HIGH_GPU_UTILIZATION_PCT = 95
DEFAULT_REPUTATION = 50
DEFAULT_SPEED = 10
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_RADIX = {"0x": 16, "0o": 8, "0b": 2}
# JavaScript's String.prototype.trim also strips these.
_JS_SPACE = " \t\n\v\f\r\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"  # noqa: E501


def is_finite(value: Any) -> bool:
    """``Number.isFinite``: a finite number without coercion (a bool or a string is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def js_number(value: Any) -> float:
    """``Number(value)`` for decoded JSON: null → 0, "" → 0, "12" → 12, "x" → NaN, [7] → 7."""
    if value is None:
        return 0.0
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip(_JS_SPACE)
        if not text:
            return 0.0
        if _DECIMAL.fullmatch(text):
            return float(text)
        base = _RADIX.get(text[:2].lower())
        if base is not None:
            try:
                return float(int(text[2:], base))
            except ValueError:
                return math.nan
        sign, _, rest = text.rpartition("Infinity")
        if rest == "" and sign in ("", "+", "-"):
            return -math.inf if sign == "-" else math.inf
        return math.nan
    if isinstance(value, list):
        if not value:
            return 0.0
        if len(value) == 1 and not isinstance(value[0], dict | bool):
            return js_number(value[0]) if value[0] is not None else 0.0
        return math.nan
    return math.nan  # an object: "[object Object]"


def _load(provider: dict[str, Any]) -> Any:
    specs = provider.get("specs")
    return specs.get("load") if isinstance(specs, dict) else None


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else None


def _has(obj: Any, name: str) -> bool:
    return isinstance(obj, dict) and name in obj


def _truthy(value: Any) -> bool:
    """JavaScript truthiness of a decoded JSON value (every object and array is truthy)."""
    if isinstance(value, dict | list):
        return True
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def _cap(load: Any) -> float:
    cap = _field(load, "concurrency_cap")
    return float(cap) if is_finite(cap) else float(DEFAULT_CONCURRENCY_CAP)


def not_saturated(provider: dict[str, Any]) -> bool:
    """``notSaturated``: no load → kept; active_jobs ≥ cap or GPU ≥ 95 % → dropped."""
    load = _load(provider)
    if not _truthy(load):
        return True
    active = _field(load, "active_jobs")
    if is_finite(active) and active >= _cap(load):
        return False
    gpu = _field(load, "gpu_utilization_max")
    return not (is_finite(gpu) and gpu >= HIGH_GPU_UTILIZATION_PCT)


def headroom_score(provider: dict[str, Any]) -> float:
    """``headroomScore``: max(1, free RAM GB + free VRAM GB + 4·max(0, 1 − active/cap))."""
    load = _load(provider)
    if not _truthy(load):
        return 1.0
    free_ram = _field(_field(load, "ram"), "free_gb")
    free_vram = _field(_field(load, "vram"), "free_gb")
    active = _field(load, "active_jobs")
    cap = _cap(load)
    slot_bonus = 4 * max(0.0, 1 - (active if is_finite(active) else 0) / cap) if cap > 0 else 0.0
    ram = free_ram if is_finite(free_ram) else 0
    vram = free_vram if is_finite(free_vram) else 0
    return float(max(1.0, ram + vram + slot_bonus))


def weight(provider: dict[str, Any]) -> float:
    """``reputation × speed × headroom`` as ``reputationWeightedPick`` computes it."""
    # Number(undefined) is NaN (the default applies) but Number(null) is 0 (the floor applies).
    rep = js_number(provider["reputation"]) if "reputation" in provider else math.nan
    reputation = max(1.0, rep if math.isfinite(rep) else DEFAULT_REPUTATION)
    bench = _field(provider.get("specs"), "bench")
    tps = js_number(bench["tokens_per_second_avg"]) if _has(bench, "tokens_per_second_avg") else 0
    speed = tps if math.isfinite(tps) and tps > 0 else DEFAULT_SPEED
    return reputation * speed * headroom_score(provider)


def is_live(provider: dict[str, Any], now: float) -> bool:
    """``status = 'available'`` and ``last_seen >= now − 2 min``."""
    if provider.get("status") != "available":
        return False
    seen = provider.get("last_seen")
    if not isinstance(seen, str):
        return False
    try:
        stamp = datetime.fromisoformat(seen)
    except ValueError:
        return False
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp() >= now - LIVE_WINDOW_S


def candidates(
    providers: list[dict[str, Any]], model_name: Any, now: float
) -> list[dict[str, Any]]:
    """``pickChatProvider``'s filters, in its order, before the draw."""
    kept = [p for p in providers if is_live(p, now)]
    if isinstance(model_name, str) and model_name:
        kept = [
            p
            for p in kept
            if isinstance(_field(p.get("specs"), "served_models"), list)
            and model_name in [m for m in p["specs"]["served_models"] if isinstance(m, str)]
        ]
    return [p for p in kept if not_saturated(p)]


def weighted_pick(
    candidates: list[dict[str, Any]], rng: Callable[[], float]
) -> dict[str, Any] | None:
    """``reputationWeightedPick``: one candidate is returned without a draw."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    weights = [weight(c) for c in candidates]
    r = rng() * sum(weights)
    for candidate, w in zip(candidates, weights, strict=True):
        r -= w
        if r <= 0:
            return candidate
    return candidates[-1]


def first_user_prompt(messages: Any) -> str:
    """``firstUserPrompt``: the first ``user`` message whose content is a string, else ""."""
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
    return ""


def chat_title(messages: Any) -> str:
    """``firstUserPrompt(messages).slice(0, 80) || "chat"``."""
    return js_slice(first_user_prompt(messages), 80) or "chat"


def js_slice(text: str, end: int) -> str:
    """``text.slice(0, end)``: JavaScript counts UTF-16 code units, not code points."""
    units = text.encode("utf-16-le")[: 2 * end]
    return units.decode("utf-16-le", "ignore")  # a split surrogate pair drops its half
