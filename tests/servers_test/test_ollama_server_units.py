"""Pure parts of the stand-in: Go durations, the JSON decoder's errors, names, formatting."""

from __future__ import annotations

from typing import Any

import pytest

from tests.servers.ollama_gojson import (
    MAX_DURATION_NS,
    BodyError,
    env_keep_alive,
    parse_duration,
    parse_keep_alive,
)
from tests.servers.ollama_names import go_json, go_time, human_number, parse_name

S = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("-0", 0),
        ("5m", 300 * S),
        ("1h30m", 5400 * S),
        ("1.5s", 1_500_000_000),
        (".5s", S // 2),
        ("1.s", S),
        ("-1m", -60 * S),
        ("+2h", 7200 * S),
        ("300ms", 300_000_000),
        ("1us", 1_000),
        ("1\u00b5s", 1_000),
        ("2562047h", 2562047 * 3600 * S),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("3600", 'time: missing unit in duration "3600"'),
        ("", 'time: invalid duration ""'),
        ("abc", 'time: invalid duration "abc"'),
        ("-", 'time: invalid duration "-"'),
        (".s", 'time: invalid duration ".s"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("9999999999h", 'time: invalid duration "9999999999h"'),
    ],
)
def test_parse_duration_errors(text: str, error: str) -> None:
    with pytest.raises(BodyError) as err:
        parse_duration(text)
    assert str(err.value) == error


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        (300, 300 * S),
        (1.5, 1_500_000_000),
        (0, 0),
        (-1.0, MAX_DURATION_NS),
        ("-5m", MAX_DURATION_NS),
    ],
)
def test_keep_alive_values(value: Any, ns: int) -> None:
    assert parse_keep_alive(value) == ns


def test_env_keep_alive() -> None:
    assert env_keep_alive(None) == 300 * S
    assert env_keep_alive("10m") == 600 * S
    assert env_keep_alive("3600") == 3600 * S
    assert env_keep_alive("-1") == MAX_DURATION_NS
    assert env_keep_alive("junk") == 300 * S


@pytest.mark.parametrize(
    ("text", "valid", "shortest"),
    [
        ("llama3.2", True, "llama3.2:latest"),
        ("Llama3.2:1B", True, "Llama3.2:1B"),
        ("library/llama3.2:1b", True, "llama3.2:1b"),
        ("registry.ollama.ai/library/llama3.2:1b", True, "llama3.2:1b"),
        ("https://registry.ollama.ai/library/llama3.2:1b", True, "llama3.2:1b"),
        ("user/model", True, "user/model:latest"),
        ("hf.co/u/repo:Q4_K_M", True, "hf.co/u/repo:Q4_K_M"),
        ("localhost:5000/ns/m", True, "localhost:5000/ns/m:latest"),
        ("a/b/c/d", False, None),
        ("ns.x/m", False, None),
        ("m@sha256:abc", False, None),
        ("_ok", True, "_ok:latest"),
        (".bad", False, None),
        ("m:" + "t" * 80, True, "m:" + "t" * 80),
        ("m:" + "t" * 81, False, None),
    ],
)
def test_name_grammar(text: str, valid: bool, shortest: str | None) -> None:
    name = parse_name(text)
    assert name.is_valid() is valid
    if shortest is not None:
        assert name.display_shortest() == shortest


def test_go_formatting() -> None:
    assert human_number(7_615_616_512) == "7.6B"
    assert human_number(8_000_000_000) == "8B"
    assert human_number(494_032_768) == "494.03M"
    assert human_number(22_000_000) == "22M"
    assert go_json({"a": "<&>", "b": [1]}) == b'{"a":"\\u003c\\u0026\\u003e","b":[1]}'
    assert go_time(1_700_000_000_123_400_000, utc=True) == "2023-11-14T22:13:20.1234Z"
    assert go_time(1_700_000_000_000_000_000, utc=True) == "2023-11-14T22:13:20Z"
