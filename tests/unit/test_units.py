"""Sizes and durations as the file writes them (reconciler.units)."""

from __future__ import annotations

import re

import pytest

from reconciler.config import desired
from reconciler.model import FOREVER
from reconciler.units import (
    format_bytes,
    format_duration,
    parse_duration,
    parse_keep_alive,
    parse_size,
)

SIZES = [
    (0, 0),
    (4096, 4096),
    ("4096", 4096),
    ("512B", 512),
    ("1KB", 1000),
    ("1KiB", 1024),
    ("1kib", 1024),
    ("2MB", 2_000_000),
    ("2MiB", 2 * 2**20),
    ("6GB", 6_000_000_000),
    ("6GiB", 6 * 2**30),
    ("6gib", 6 * 2**30),
    ("6 GiB", 6 * 2**30),
    (" 6GiB ", 6 * 2**30),
    ("1.5GiB", 1_610_612_736),
    ("1.5 GB", 1_500_000_000),
    ("0.5MiB", 524_288),
    ("2TB", 2 * 10**12),
    ("2TiB", 2 * 2**40),
    ("22GiB", 22 * 2**30),
]

BAD_SIZES = ["", "GiB", "6 GiBs", "6PB", "-1GiB", "1,5GiB", "six GiB", "6 G", "1e9", -1, True]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", BAD_SIZES)
def test_parse_size_rejects_with_what_is_valid(text: int | str) -> None:
    with pytest.raises(ValueError, match=r"^expected a size like '6GiB', '512MiB'.* got "):
        parse_size(text)


DURATIONS = [
    (0, 0.0),
    (30, 30.0),
    (2.5, 2.5),
    ("45", 45.0),
    ("1.5", 1.5),
    ("30s", 30.0),
    ("10m", 600.0),
    ("1h", 3600.0),
    ("1h30m", 5400.0),
    ("1h30m15s", 5415.0),
    ("250ms", 0.25),
    ("1.5h", 5400.0),
    (" 5m ", 300.0),
]

BAD_DURATIONS = ["", "m", "10 m", "10M", "1d", "-5s", "forever", "5m10", -1, True]


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
def test_parse_duration(text: int | float | str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_parse_duration_rejects_with_what_is_valid(text: int | float | str) -> None:
    with pytest.raises(ValueError, match=r"^expected a duration like '30s', '10m', '1h30m'"):
        parse_duration(text)


KEEP_ALIVES = [
    (-1, FOREVER),
    (-5, FOREVER),
    (-0.5, FOREVER),
    ("-1", FOREVER),
    ("-1m", FOREVER),
    ("forever", FOREVER),
    (0, 0.0),
    ("0", 0.0),
    ("0s", 0.0),
    (300, 300.0),
    ("10m", 600.0),
    ("1h", 3600.0),
]


@pytest.mark.parametrize(("value", "expected"), KEEP_ALIVES)
def test_parse_keep_alive(value: int | float | str, expected: float) -> None:
    assert parse_keep_alive(value) == expected


@pytest.mark.parametrize("value", ["soon", "Forever", "", "-", True, float("nan")])
def test_parse_keep_alive_rejects_with_what_is_valid(value: int | float | str) -> None:
    with pytest.raises(ValueError, match=r"^expected -1 or 'forever' \(pinned in VRAM\), 0"):
        parse_keep_alive(value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),  # rounds up into the next unit rather than "1024.0 KiB"
        (9_019_431_321, "8.4 GiB"),
        (6 * 2**30, "6.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (-(2**30), "-1.0 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (FOREVER, "forever"),
        (0, "0s"),
        (30, "30s"),
        (600, "10m"),
        (3600, "1h"),
        (5415, "1h30m15s"),
        (2.5, "2.5s"),
    ],
)
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_keep_alive(text) == seconds


def _pattern(*keys: str) -> re.Pattern[str]:
    node = desired.schema()["$defs"]
    for key in keys:
        node = node[key]
    return re.compile(node["pattern"])


@pytest.mark.parametrize(("text", "_"), [s for s in SIZES if isinstance(s[0], str)])
def test_schema_size_pattern_accepts_what_parse_size_accepts(text: str, _: int) -> None:
    assert _pattern("size").search(text)


@pytest.mark.parametrize("text", [s for s in BAD_SIZES if isinstance(s, str)])
def test_schema_size_pattern_rejects_what_parse_size_rejects(text: str) -> None:
    assert not _pattern("size").search(text)


@pytest.mark.parametrize(("text", "_"), [d for d in DURATIONS if isinstance(d[0], str)])
def test_schema_duration_pattern_agrees(text: str, _: float) -> None:
    assert _pattern("duration").search(text)


@pytest.mark.parametrize("text", [d for d in BAD_DURATIONS if isinstance(d, str)])
def test_schema_duration_pattern_rejects(text: str) -> None:
    assert not _pattern("duration").search(text)


@pytest.mark.parametrize(("text", "_"), [k for k in KEEP_ALIVES if isinstance(k[0], str)])
def test_schema_keep_alive_pattern_agrees(text: str, _: float) -> None:
    assert _pattern("keep_alive").search(text)
