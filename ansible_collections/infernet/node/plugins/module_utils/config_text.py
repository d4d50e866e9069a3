# Copyright: infernet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The text of infernet.yaml, written the same way on every host.

The module must not depend on PyYAML being importable by the managed host's Python (infernet
itself often lives in its own virtual environment), and the bytes it writes must not depend on
which emitter happened to be there: a file that changes shape from one run to the next would be
reported as a change. So this is a small block-style emitter of its own.

A string is written plain only when it is unambiguously a string to both YAML 1.1 (PyYAML, which
infernet reads the file with) and YAML 1.2; anything else is double-quoted, with everything
outside printable ASCII escaped (the file is ASCII whatever the values).
"""

from __future__ import annotations

import math
import re

HEADER = (
    "# Managed by Ansible (infernet.node.models): edits made here, by hand or by\n"
    "# `infernet model install/remove`, are replaced on its next run.\n"
)

# Letters, digits and a few punctuation marks, a colon only between two such runs: model names
# (qwen2.5:14b, hf.co/org/repo:Q4_K_M), URLs (http://127.0.0.1:11434), paths and sizes (24GiB).
_PLAIN = re.compile(r"[A-Za-z0-9_./~][A-Za-z0-9_./~@+-]*(?::[A-Za-z0-9_./~@+-]+)*\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}
# What a YAML 1.1 or 1.2 resolver would read as something else than a string.
_NOT_A_STRING = re.compile(
    r"""(?x)
    (?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)\Z
    | (?:~|null|Null|NULL)\Z
    | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?\Z          # sexagesimal (1:30)
    | [-+]?(?:\.[0-9]|[0-9])[0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?\Z
    | [-+]?0[xXoObB]
    | [-+]?\.(?:inf|Inf|INF|nan|NaN|NAN)\Z
    | [0-9]{4}-[0-9]{1,2}-[0-9]{1,2}                               # dates and timestamps
    """
)


def scalar(value: object) -> str:
    """One scalar, as YAML text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)  # 1e-05: YAML 1.1 wants a dot in the mantissa (1.0e-05)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    text = str(value)
    if _PLAIN.match(text) and not _NOT_A_STRING.match(text):
        return text
    return quoted(text)


def quoted(text: str) -> str:
    """A YAML double-quoted scalar, in ASCII."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _block(value: object, indent: int) -> list[str]:
    """Lines of a mapping or sequence at ``indent`` spaces (callers handle empty ones)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{scalar(key)}:"
            if _is_block(item):
                lines.append(head)
                lines.extend(_block(item, indent + 2))
            else:
                lines.append(f"{head} {_inline(item)}")
        return lines
    for item in value:
        if isinstance(item, dict) and item:
            inner = _block(item, indent + 2)
            lines.append(f"{pad}- {inner[0][indent + 2 :]}")
            lines.extend(inner[1:])
        elif _is_block(item):
            lines.append(f"{pad}-")
            lines.extend(_block(item, indent + 2))
        else:
            lines.append(f"{pad}- {_inline(item)}")
    return lines


def _is_block(value: object) -> bool:
    return isinstance(value, (dict, list, tuple)) and bool(value)


def _inline(value: object) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    return scalar(value)


def render(document: dict[str, object]) -> str:
    """The whole file: the header comment, then ``document`` in block style."""
    return HEADER + "\n".join(_block(document, 0) or ["{}"]) + "\n"
