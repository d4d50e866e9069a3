"""UTC timestamps as the store writes them.

Every timestamp is an ISO-8601 string in UTC ending in ``Z``: it sorts as text, reads the same
on every node and needs no timezone database. ``now`` is looked up through this module on every
call so tests can replace it.
"""

from __future__ import annotations

from datetime import UTC, datetime

_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
_MICROSECONDS = "%Y-%m-%dT%H:%M:%S.%fZ"
_COMPACT = "%Y%m%dT%H%M%SZ"


def now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def stamp() -> str:
    """Now, as the store writes it: ``2026-11-27T04:00:00Z``."""
    return iso(now())


def iso(moment: datetime, *, precise: bool = False) -> str:
    """``2026-11-27T04:00:00Z``; ``precise`` keeps microseconds (for TTL arithmetic)."""
    return moment.astimezone(UTC).strftime(_MICROSECONDS if precise else _SECONDS)


def compact(moment: datetime) -> str:
    """``20261127T040000Z``: ISO-8601 basic format, safe in file names (no colons)."""
    return moment.astimezone(UTC).strftime(_COMPACT)


def parse(text: str) -> datetime:
    """Reads back what :func:`iso` wrote (any ISO-8601 form with an offset or ``Z``)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        # Only this module writes these columns, always in UTC; a naive value means UTC.
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
