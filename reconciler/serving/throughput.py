"""Tokens per second over the last jobs, as the router reads it (``bench.tokens_per_second_avg``).

The real node daemon keeps its last 32 successful chats and reports Σtokens / Σseconds; we do the
same from real token counts (the backend's, when it reports them, else the deltas we streamed),
over generation time only (model loading and queueing excluded when the backend measures it).
"""

from __future__ import annotations

import threading
from collections import deque

from state import clock

WINDOW = 32


class Throughput:
    """A rolling window of (tokens, seconds) samples."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[int, float, str]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        """One finished generation; ignored when it produced nothing or took no time."""
        if tokens <= 0 or seconds <= 0:
            return
        stamp = clock.stamp()
        with self._lock:
            self._samples.append((tokens, seconds, stamp))

    def bench(self) -> dict[str, object] | None:
        """``specs.bench`` for the heartbeat, or None before the first sample."""
        with self._lock:
            if not self._samples:
                return None
            tokens = sum(s[0] for s in self._samples)
            seconds = sum(s[1] for s in self._samples)
            return {
                "tokens_per_second_avg": round(tokens / seconds, 2),
                "samples": len(self._samples),
                "window_started_at": self._samples[0][2],
            }
