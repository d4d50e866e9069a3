"""The one rule for showing a URL: without ``user:password@`` and without its query string.

Source URLs may carry credentials (``https://user:pass@host/…``) or a signature (signed URLs:
``?X-Amz-Signature=…``, ``?sig=…``, tokens). They stay in ``infernet.yaml``; every URL that is
logged, stored, shown or sent to a peer goes through ``redact``. Pure (no I/O, no HTTP
client), so the file's own validation messages use it too.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_TRAILING = ".,;:)]}"


def redact(text: str) -> str:
    """``text`` with every URL in it shown without credentials or query string.

    ``https://user:pass@host/x.gguf?X-Amz-Signature=…`` becomes ``https://***@host/x.gguf?***``:
    enough to recognise the source, nothing to replay it with. Works on a bare URL and on
    free text such as an exception's message.
    """
    return _URL.sub(_redact_match, text)


def _redact_match(match: re.Match[str]) -> str:
    url = match.group(0)
    tail = ""
    while url and url[-1] in _TRAILING:  # "(see https://h/x)." keeps its ")."
        url, tail = url[:-1], url[-1] + tail
    return _redact_url(url) + tail


def _redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that can't be parsed>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query or url.endswith("?"):
        shown += "?***"
    if parts.fragment:
        shown += "#***"
    return shown


__all__ = ["redact"]
