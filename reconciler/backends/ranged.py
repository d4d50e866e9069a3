"""GGUF metadata from the first bytes of a remote file, read with HTTP ranges.

Used before a download (Ollama registry blobs, llama.cpp sources) so the VRAM estimate has the
model's own layer count, heads and context without fetching gigabytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from reconciler import httpsafe
from reconciler.backends.gguf import header as gguf_header

MiB = 1024 * 1024
HEADER_TIMEOUT = httpx.Timeout(10.0, connect=5.0, read=3.0)
"""A header read is an optional extra on the plan path: a stalled CDN must not hold it up."""
HEADER_DEADLINE = 10.0
"""...nor a trickling one: each ranged read ends within this many seconds, whatever came."""


def read_prefix(
    http: httpx.Client, url: str, n: int, headers: Mapping[str, str] | None = None
) -> bytes:
    """The first ``n`` bytes of ``url``, or fewer when the body stalls or ends early.

    Stops reading at ``n`` even when the server ignores ``Range`` and sends the whole file, so
    no cap is needed beyond ``n``; a guarded client (``reconciler.httpsafe``) ends the read at
    ``HEADER_DEADLINE``.
    """
    buf = bytearray()
    sent = {**(headers or {}), "Range": f"bytes=0-{n - 1}"}
    req = http.build_request(
        "GET",
        url,
        headers=sent,
        timeout=HEADER_TIMEOUT,
        extensions=httpsafe.limits(deadline=HEADER_DEADLINE, max_body=None),
    )
    resp = http.send(req, stream=True, follow_redirects=True)
    try:
        if resp.status_code >= 400:
            return b""
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) >= n:
                break
    except httpx.TimeoutException:
        pass  # what came before the stall is still a prefix
    finally:
        resp.close()
    return bytes(buf[:n])


def fetch_gguf_metadata(
    http: httpx.Client,
    url: str,
    *,
    size: int | None = None,
    headers: Mapping[str, str] | None = None,
    limit: int = 8 * MiB,
    first: int = 256 * 1024,
) -> dict[str, Any]:
    """The VRAM-relevant GGUF metadata of the file at ``url``, from ranged GETs of its prefix.

    Reads ``first`` bytes and doubles up to ``limit`` while the metadata is cut short and the
    keys the estimate needs are still missing; gives back what was read by then. Empty when
    the server refuses; ``NotGGUF`` for a file that is not GGUF; transport errors propagate
    (callers treat all of these as "no header").
    """
    n = max(1, min(first, limit, size or limit))
    while True:
        data = read_prefix(http, url, n, headers)
        header = gguf_header.parse_header(data)
        short = len(data) < n  # the file (or the server's answer) ended here
        if header.complete or gguf_header.has_essentials(header.metadata) or short:
            return header.metadata
        if n >= limit:
            return header.metadata
        n = min(n * 2, limit)
