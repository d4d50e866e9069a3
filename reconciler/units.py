"""Sizes and durations as ``infernet.yaml`` writes them, and back for display.

The grammar here is the one the JSON Schema's patterns describe (``$defs/size``,
``$defs/duration``, ``$defs/keep_alive``), so an editor that validates against the schema and
``infernet validate`` agree. Sizes use both decimal (``GB`` = 10^9, as ``ollama list`` and model
cards print) and binary (``GiB`` = 2^30, as GPUs are sold and ``nvidia-smi`` counts) units
because users copy numbers from both; durations follow Go's ``time.ParseDuration`` subset that
Ollama's ``keep_alive`` accepts. Shown back, download and model sizes are decimal
(``format_size``) and VRAM binary (``format_bytes``).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

from reconciler.model import FOREVER

_SIZE_FACTORS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
# What a valid value looks like, for the messages of both this module and the validator.
SIZE_HINT = "a size like '6GiB', '512MiB', '1.5GB', '10 TB' or a whole number of bytes"

_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h))+$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
DURATION_HINT = "a duration like '30s', '10m', '1h30m' or a number of seconds"
KEEP_ALIVE_HINT = (
    "-1 or 'forever' (pinned in VRAM), 0 (unload after use), "
    "or a duration like '10m', '1h' or a number of seconds"
)

_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL_UNITS = ("KB", "MB", "GB", "TB", "PB")


def parse_size(value: int | str) -> int:
    """Bytes from ``6GiB``, ``1.5 GB``, ``512mib``, ``4096`` or an int; ``ValueError`` if not."""
    # bool is an int subclass: `vram: true` is a mistake, not one byte.
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HINT}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected {SIZE_HINT}, got a negative number {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _SIZE_FACTORS:
        raise ValueError(f"expected {SIZE_HINT}, got {value!r}")
    # Decimal keeps '1.5GiB' exact (1610612736) where float arithmetic could round.
    number = Decimal(match.group(1)) * _SIZE_FACTORS[match.group(2).lower()]
    return int(number.to_integral_value())


def parse_duration(value: int | float | str) -> float:
    """Seconds from ``30s``, ``10m``, ``1h30m``, ``250ms``, ``90`` or a number."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float range
            raise ValueError(
                f"expected {DURATION_HINT}, got a {len(str(value))}-digit number"
            ) from None
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"expected {DURATION_HINT}, got {value}")
        return seconds
    text = value.strip() if isinstance(value, str) else ""
    if _NUMBER.match(text):
        return float(text)
    if not _DURATION.match(text):
        raise ValueError(f"expected {DURATION_HINT}, got {value!r}")
    total = Decimal(0)
    for number, unit in _DURATION_PART.findall(text):
        total += Decimal(number) * Decimal(str(_DURATION_FACTORS[unit]))
    return float(total)


def parse_keep_alive(value: int | float | str) -> float:
    """Seconds to keep a model loaded: ``FOREVER`` for pinned, 0.0 for unload after use.

    Ollama treats every negative duration as "forever", so ``-1``, ``-1m`` and ``"forever"``
    all pin; we store the single sentinel so comparisons stay simple.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {KEEP_ALIVE_HINT}, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            return FOREVER
        try:
            seconds = float(value)
        except OverflowError:  # an int past float range
            raise ValueError(
                f"expected {KEEP_ALIVE_HINT}, got a {len(str(value))}-digit number"
            ) from None
        if math.isnan(seconds):
            raise ValueError(f"expected {KEEP_ALIVE_HINT}, got {value}")
        return seconds
    if not isinstance(value, str):
        raise ValueError(f"expected {KEEP_ALIVE_HINT}, got {value!r}")
    text = value.strip()
    if text == "forever":
        return FOREVER
    negative = text.startswith("-")
    try:
        seconds = parse_duration(text[1:] if negative else text)
    except ValueError:
        raise ValueError(f"expected {KEEP_ALIVE_HINT}, got {value!r}") from None
    if negative and seconds > 0:
        return FOREVER
    return seconds


def format_bytes(n: int) -> str:
    """Binary units with one decimal, for VRAM: ``8.4 GiB``, ``512 B``."""
    sign = "-" if n < 0 else ""
    try:
        size = float(abs(n))
    except OverflowError:  # past float range: only a mistyped file gets here
        return f"{sign}{len(str(abs(n)))}-digit number of bytes"
    for unit in _BINARY_UNITS:
        # Decide on the rounded value so 1023.97 MiB prints as "1.0 GiB", not "1024.0 MiB".
        if unit == "B" and size < 1024:
            return f"{sign}{int(size)} B"
        if round(size, 1) < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{sign}{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_size(n: int | float) -> str:
    """Decimal units as ``ollama list`` prints sizes, so they read like what operators compare
    them with: ``9.0 GB``, ``274 MB``, ``42 GB``, ``512 B`` (one decimal below ten, whole
    numbers from ten, cut rather than rounded). VRAM is not a size of this kind: it stays in
    binary units (``format_bytes``), as GPUs are sold and ``nvidia-smi`` counts."""
    sign = "-" if n < 0 else ""
    try:
        value = float(abs(n))
    except OverflowError:  # past float range: only a mistyped file gets here
        return f"{sign}{len(str(abs(int(n))))}-digit number of bytes"
    if value < 1000:
        return f"{sign}{int(value)} B"
    for unit in _DECIMAL_UNITS:
        value /= 1000
        if value < 1000 or unit == _DECIMAL_UNITS[-1]:
            break
    if value >= 10 or value == int(value):
        return f"{sign}{int(value)} {unit}"
    return f"{sign}{value:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """The file's spelling of a keep-alive or interval: ``forever``, ``0s``, ``1h30m``, ``2.5s``."""
    if seconds < 0:
        return "forever"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s"]
    if secs == 0 and whole:
        parts[2] = ""
    return "".join(parts)
