"""Quantization names as people write them, and which artifacts they mean: the one rule that
validation (an unknown name is an error with a did-you-mean) and the plan (the file's
``quantization:`` assertion against the artifact) both use. Pure.

* Case never matters: Ollama's tags write ``q4_K_M`` and ``fp16``, its details ``Q4_K_M`` and
  ``F16``, model cards ``FP16`` and ``INT8``.
* ``FP16``/``FP32`` are ``F16``/``F32``; ``INT8`` is ``Q8_0`` (the only 8-bit file type).
* ``Q<n>`` (and ``INT4`` = ``Q4``) is a family: any n-bit K- or legacy quant, so ``Q4`` is
  met by ``Q4_0``, ``Q4_1``, ``Q4_K_S`` and ``Q4_K_M``, not by the i-quants (``IQ4_XS``) nor
  ``MXFP4``, which are other formats with other quality trade-offs.
* Any other name is llama.cpp's own (``general.file_type`` and tensor types): itself.
"""

from __future__ import annotations

import difflib
import re

from reconciler.backends.gguf.header import FILE_TYPES, GGML_TYPES

ALIASES: dict[str, str] = {"FP16": "F16", "FP32": "F32", "INT8": "Q8_0", "INT4": "Q4"}
"""What people write → the name llama.cpp and Ollama's details use (or a family)."""

_MEMBER = re.compile(r"Q(\d)_(?:\d|K(?:_[SML])?)")
"""A K- or legacy quant (``Q4_0``, ``Q4_K_M``), its bit width in the group."""

NAMES: frozenset[str] = frozenset(FILE_TYPES.values()) | {
    name for name, _, _ in GGML_TYPES.values()
}
"""Every single quantization name llama.cpp has (file types and tensor types)."""

FAMILIES: frozenset[str] = frozenset(
    f"Q{m.group(1)}" for name in NAMES if (m := _MEMBER.fullmatch(name))
)
"""``Q2`` … ``Q8``: the bit widths some K- or legacy quant has."""

COMMON = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16", "BF16", "Q4", "INT8", "FP16")
"""Offered when a name is like nothing known."""


def canonical(name: str) -> str | None:
    """The name, or family, that ``name`` stands for (upper case); None when unknown."""
    upper = name.strip().upper()
    upper = ALIASES.get(upper, upper)
    return upper if upper in NAMES or upper in FAMILIES else None


def problem(name: str) -> str | None:
    """None when ``name`` is a known quantization, else why not and what was probably meant."""
    if canonical(name) is not None:
        return None
    known = sorted(NAMES | FAMILIES | ALIASES.keys())
    close = difflib.get_close_matches(name.strip().upper(), known, n=3, cutoff=0.6)
    if close:  # among equally close names (Q4_K_N: _S, _M), the common one
        best = next((c for c in close if c in COMMON), close[0])
        return f"unknown quantization '{name}'; did you mean '{best}'?"
    return (
        f"unknown quantization '{name}'; did you mean one of {', '.join(COMMON)}? "
        "(any GGUF file type, case-insensitive; Q4 = any 4-bit K- or legacy quant)"
    )


def matches(asserted: str, actual: str) -> bool:
    """Whether an artifact of quantization ``actual`` meets the file's ``asserted`` one."""
    want = canonical(asserted) or asserted.strip().upper()
    have = canonical(actual) or actual.strip().upper()
    if want == have:
        return True
    member = _MEMBER.fullmatch(have)
    return want in FAMILIES and member is not None and want == f"Q{member.group(1)}"


_BITS = re.compile(r"(?:I|T|MX|NV)?(?:Q|FP|F|BF)(\d+)")


def nominal_bits(name: str | None) -> int | None:
    """The bits per weight a quantization's name says (``Q4_K_M`` 4, ``F16`` 16): what the
    bytes-per-parameter rule of thumb counts with; None for a name without a width."""
    if not name:
        return None
    upper = canonical(name) or name.strip().upper()
    match = _BITS.match(upper)
    return int(match.group(1)) if match else None
