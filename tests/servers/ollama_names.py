"""Ollama model names (`types/model/name.go`) and small Go formatting helpers.

Names are ``[scheme://][host/][namespace/]model[:tag]``; missing parts take the defaults
``registry.ollama.ai``, ``library`` and ``latest``. Storage keeps case, matching ignores it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MISSING_PART = "!MISSING!"

_KIND_HOST, _KIND_NAMESPACE, _KIND_MODEL, _KIND_TAG = range(4)


@dataclass(frozen=True)
class Name:
    """A fully merged model name; parts keep the casing they were written with."""

    host: str
    namespace: str
    model: str
    tag: str

    def is_valid(self) -> bool:
        parts = (self.host, self.namespace, self.model, self.tag)
        return all(_valid_part(kind, part) for kind, part in enumerate(parts))

    def display_shortest(self) -> str:
        """`DisplayShortest`: the form `/api/tags` and `/api/ps` print, always with a tag."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity of the name."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def repo_key(self) -> tuple[str, str, str]:
        """Identity without the host: how the fake registry resolves a name."""
        return (self.namespace.lower(), self.model.lower(), self.tag.lower())

    def path_parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    """Cut at the last ``sep``; an empty side becomes MISSING_PART (making the name invalid)."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or MISSING_PART, s[i + len(sep) :] or MISSING_PART, True


def parse_name_bare(s: str) -> tuple[str, str, str, str]:
    """`ParseNameBare`: split without defaults; returns (host, namespace, model, tag)."""
    host = namespace = tag = ""
    if s.rfind(":") > s.rfind("/"):
        s, tag, _ = _cut_promised(s, ":")
    s, model, promised = _cut_promised(s, "/")
    if not promised:
        return host, namespace, s, tag
    s, namespace, promised = _cut_promised(s, "/")
    if not promised:
        return host, s, model, tag
    scheme, sep, rest = s.partition("://")
    host = rest if sep else scheme
    return host, namespace, model, tag


def parse_name(s: str) -> Name:
    """`ParseName`: the bare parse merged with the defaults."""
    host, namespace, model, tag = parse_name_bare(s)
    return Name(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG)


def _alnum_or_underscore(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "_"


def _valid_part(kind: int, s: str) -> bool:
    raw = s.encode("utf-8")
    maxlen = 350 if kind == _KIND_HOST else 80
    if not 1 <= len(raw) <= maxlen or len(raw) != len(s):
        return False
    if not _alnum_or_underscore(s[0]):
        return False
    for c in s[1:]:
        if c in "_-":
            continue
        if c == ".":
            if kind == _KIND_NAMESPACE:
                return False
            continue
        if c == ":":
            if kind != _KIND_HOST:
                return False
            continue
        if not _alnum_or_underscore(c):
            return False
    return True


def go_quote(s: str) -> str:
    """Go's `%q` for the strings this server meets (printable text, common escapes)."""
    out = ['"']
    for c in s:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) <= 0xFFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    out.append('"')
    return "".join(out)


def go_json(value: object) -> bytes:
    """Encode like Go's encoding/json: compact, UTF-8, HTML characters escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text.encode("utf-8")


def go_time(ns: int, *, utc: bool = False) -> str:
    """A Go `time.Time` as JSON text (RFC 3339 with trimmed nanoseconds, local offset)."""
    sec, frac = divmod(ns, 1_000_000_000)
    tm = time.gmtime(sec) if utc else time.localtime(sec)
    offset = 0 if utc else tm.tm_gmtoff
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", tm)
    if frac:
        stamp += "." + f"{frac:09d}".rstrip("0")
    if offset == 0:
        return stamp + "Z"
    sign = "+" if offset > 0 else "-"
    hours, minutes = divmod(abs(offset) // 60, 60)
    return f"{stamp}{sign}{hours:02d}:{minutes:02d}"


def human_number(n: int) -> str:
    """`format.HumanNumber`: the `parameter_size` text, e.g. ``7.6B`` or ``494.03M``."""
    billion, million, thousand = 1_000_000_000, 1_000_000, 1_000
    if n >= billion:
        value = n / billion
        return f"{value:.0f}B" if value == int(value) else f"{value:.1f}B"
    if n >= million:
        value = n / million
        return f"{value:.0f}M" if value == int(value) else f"{value:.2f}M"
    if n >= thousand:
        return f"{n / thousand:.0f}K"
    return str(n)
