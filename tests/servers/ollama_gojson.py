"""Request-body decoding with the error texts of Go's encoding/json and `time.ParseDuration`.

Ollama binds bodies with gin's `ShouldBindJSON`, i.e. `json.NewDecoder(body).Decode(&req)`:
only the first JSON value is read (trailing bytes are ignored), an empty body is `io.EOF`
(reported as ``missing request body``), a truncated one ``unexpected EOF``, and a syntax error
``invalid character 'x' <context>``. Type mismatches are saved and reported after decoding,
while a custom unmarshaler's error (keep_alive) aborts at once.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, NoReturn

MAX_DURATION_NS = (1 << 63) - 1
_WS = b" \t\r\n"
_DIGITS = b"0123456789"
_HEX = b"0123456789abcdefABCDEF"


class MissingBody(Exception):
    """The body held no JSON value at all (Go's io.EOF)."""


class BodyError(Exception):
    """A decoding error; its text is what Ollama answers in ``{"error": ...}``."""


def _quote_char(c: int) -> str:
    if c == ord("'"):
        return "'\\''"
    if c == ord('"'):
        return "'\"'"
    ch = chr(c)
    escapes = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}
    if ch in escapes:
        return f"'{escapes[ch]}'"
    if ch.isprintable():
        return f"'{ch}'"
    return f"'\\x{c:02x}'" if c < 0x80 else f"'\\u{c:04x}'"


class _Scanner:
    """Finds the end of the first JSON value, failing with Go's scanner messages."""

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def fail(self, ctx: str) -> NoReturn:
        raise BodyError(f"invalid character {_quote_char(self.d[self.i])} {ctx}")

    def cur(self) -> int:
        if self.i >= len(self.d):
            raise BodyError("unexpected EOF")
        return self.d[self.i]

    def skip_ws(self) -> int:
        while self.i < len(self.d) and self.d[self.i] in _WS:
            self.i += 1
        return self.cur()

    def value(self, ctx: str = "looking for beginning of value") -> None:
        c = self.skip_ws()
        if c == ord("{"):
            self.object()
        elif c == ord("["):
            self.array()
        elif c == ord('"'):
            self.string()
        elif c == ord("-") or c in _DIGITS:
            self.number()
        elif c in b"tfn":
            self.literal()
        else:
            self.fail(ctx)

    def object(self) -> None:
        self.i += 1
        if self.skip_ws() == ord("}"):
            self.i += 1
            return
        while True:
            if self.skip_ws() != ord('"'):
                self.fail("looking for beginning of object key string")
            self.string()
            if self.skip_ws() != ord(":"):
                self.fail("after object key")
            self.i += 1
            self.value()
            c = self.skip_ws()
            self.i += 1
            if c == ord("}"):
                return
            if c != ord(","):
                self.i -= 1
                self.fail("after object key:value pair")

    def array(self) -> None:
        self.i += 1
        if self.skip_ws() == ord("]"):
            self.i += 1
            return
        while True:
            self.value()
            c = self.skip_ws()
            self.i += 1
            if c == ord("]"):
                return
            if c != ord(","):
                self.i -= 1
                self.fail("after array element")

    def string(self) -> None:
        self.i += 1
        while True:
            c = self.cur()
            if c == ord('"'):
                self.i += 1
                return
            if c == ord("\\"):
                self.i += 1
                e = self.cur()
                if e == ord("u"):
                    for _ in range(4):
                        self.i += 1
                        if self.cur() not in _HEX:
                            self.fail("in \\u hexadecimal character escape")
                elif e not in b'bfnrt\\/"':
                    self.fail("in string escape code")
            elif c < 0x20:
                self.fail("in string literal")
            self.i += 1

    def _digits(self) -> None:
        while self.i < len(self.d) and self.d[self.i] in _DIGITS:
            self.i += 1

    def number(self) -> None:
        if self.d[self.i] == ord("-"):
            self.i += 1
            if self.cur() not in _DIGITS:
                self.fail("in numeric literal")
        if self.d[self.i] == ord("0"):
            self.i += 1
        else:
            self._digits()
        if self.i < len(self.d) and self.d[self.i] == ord("."):
            self.i += 1
            if self.cur() not in _DIGITS:
                self.fail("after decimal point in numeric literal")
            self._digits()
        if self.i < len(self.d) and self.d[self.i] in b"eE":
            self.i += 1
            if self.cur() in b"+-":
                self.i += 1
            if self.cur() not in _DIGITS:
                self.fail("in exponent of numeric literal")
            self._digits()

    def literal(self) -> None:
        word = {ord("t"): "true", ord("f"): "false", ord("n"): "null"}[self.d[self.i]]
        for expected in word[1:]:
            self.i += 1
            if self.cur() != ord(expected):
                self.fail(f"in literal {word} (expecting {_quote_char(ord(expected))})")
        self.i += 1


def decode_value(data: bytes) -> Any:
    """Decode the first JSON value of a body the way Go's `json.Decoder.Decode` does."""
    if not data.strip(_WS):
        raise MissingBody
    scanner = _Scanner(data)
    scanner.value()
    return json.loads(data[: scanner.i].decode("utf-8", "replace"))


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


# Field kinds: str, bool, int, duration, map, list, any. Go type names appear in errors.
_GO_TYPES = {"str": "string", "bool": "bool", "int": "int", "map": "map[string]interface {}"}


def decode_request(data: bytes, struct: str, fields: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Bind a body into the named Go struct; ``fields`` maps JSON name to (kind, Go type).

    Keys match exactly, else case-insensitively, as in encoding/json. Null leaves a field
    unset. Returns only the fields that were set.
    """
    value = decode_value(data)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BodyError(
            f"json: cannot unmarshal {_json_kind(value)} into Go value of type api.{struct}"
        )
    folded = {name.lower(): name for name in fields}
    out: dict[str, Any] = {}
    saved: str | None = None
    for key, v in value.items():
        field = key if key in fields else folded.get(key.lower())
        if field is None or v is None:
            continue
        kind, gotype = fields[field]
        if kind == "duration":
            out[field] = parse_keep_alive(v)
            continue
        ok = {
            "str": isinstance(v, str),
            "bool": isinstance(v, bool),
            "int": isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v),
            "map": isinstance(v, dict),
            "list": isinstance(v, list),
            "any": True,
        }[kind]
        if ok:
            out[field] = int(v) if kind == "int" else v
        elif saved is None:
            shown = _json_kind(v)
            if kind == "int" and shown == "number":
                shown = f"number {json.dumps(v)}"
            saved = (
                f"json: cannot unmarshal {shown} into Go struct field "
                f"{struct}.{field} of type {_GO_TYPES.get(kind, gotype)}"
            )
    if saved is not None:
        raise BodyError(saved)
    return out


def parse_keep_alive(v: Any) -> int:
    """`api.Duration.UnmarshalJSON`: nanoseconds; negative values become forever."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        gotype = {bool: "bool", list: "[]interface {}", dict: "map[string]interface {}"}
        raise BodyError(f"Unsupported type: '{gotype.get(type(v), type(v).__name__)}'")
    if isinstance(v, str):
        ns = parse_duration(v)
    elif v < 0:
        ns = -1
    else:
        scaled = float(v) * 1e9
        ns = MAX_DURATION_NS if math.isinf(scaled) or scaled >= 2**63 else int(scaled)
    return MAX_DURATION_NS if ns < 0 else ns


_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def _go_string_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_duration(orig: str) -> int:
    """Go's `time.ParseDuration`, returning nanoseconds or raising with Go's message."""
    invalid = BodyError(f"time: invalid duration {_go_string_quote(orig)}")
    s = orig
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise invalid
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise invalid
        i = 0
        while i < len(s) and "0" <= s[i] <= "9":
            i += 1
        pre = i > 0
        whole = int(s[:i]) if pre else 0
        if whole >= 1 << 63:
            raise invalid
        s = s[i:]
        frac, scale, post = 0, 1.0, False
        if s and s[0] == ".":
            s = s[1:]
            i = 0
            while i < len(s) and "0" <= s[i] <= "9":
                if frac < (1 << 63) // 10:
                    frac = frac * 10 + int(s[i])
                    scale *= 10
                i += 1
            post = i > 0
            s = s[i:]
        if not pre and not post:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise BodyError(f"time: missing unit in duration {_go_string_quote(orig)}")
        unit_text, s = s[:i], s[i:]
        unit = _UNITS.get(unit_text)
        if unit is None:
            raise BodyError(
                f"time: unknown unit {_go_string_quote(unit_text)} in duration "
                f"{_go_string_quote(orig)}"
            )
        if whole > (1 << 63) // unit:
            raise invalid
        whole *= unit
        if frac > 0:
            whole += int(frac * (unit / scale))
        total += whole
        if total > 1 << 63:
            raise invalid
    if neg:
        return -total
    if total > MAX_DURATION_NS:
        raise invalid
    return total


def env_keep_alive(value: str | None) -> int:
    """`envconfig.KeepAlive`: a Go duration, else whole seconds; default 5m."""
    ns = 5 * _UNITS["m"]
    text = (value or "").strip().strip("\"'")
    if text:
        try:
            ns = parse_duration(text)
        except BodyError:
            with contextlib.suppress(ValueError):
                ns = int(text) * _UNITS["s"]
    return MAX_DURATION_NS if ns < 0 else ns
