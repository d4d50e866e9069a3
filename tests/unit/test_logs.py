"""Daemon log lines on stderr, text or JSON, one line per record (reconciler.daemon.logs)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.daemon import logs
from reconciler.errors import ConfigError

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) \S+: .*$")
MOMENT = datetime(2026, 11, 27, 4, 0, 0, 250_000, tzinfo=UTC)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup() changes process-wide loggers; put them back for the other tests.

    Only the handlers setup() added are removed: pytest swaps its own capture handlers on the
    root logger between test phases and removes them itself.
    """
    saved = [
        (logger, logger.level, logger.propagate)
        for logger in (logging.getLogger("infernet"), logging.getLogger())
    ]
    yield
    for logger, level, propagate in saved:
        for handler in [h for h in logger.handlers if type(h).__module__ == logs.__name__]:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def record(**fields: Any) -> logging.LogRecord:
    base: dict[str, Any] = {
        "name": "infernet.reconcile",
        "levelno": logging.INFO,
        "levelname": "INFO",
        "msg": "message",
        "created": MOMENT.timestamp(),
        "msecs": 250.0,
    }
    return logging.makeLogRecord(base | fields)


# text ------------------------------------------------------------------------------------------


def test_text_is_utc_timestamp_level_short_logger_and_message() -> None:
    line = logs.TextFormatter().format(record())
    assert line == "2026-11-27T04:00:00Z INFO reconcile: message"


def test_text_line_through_the_logger(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text", "info")
    logging.getLogger("infernet.daemon").info("watching %s", "/etc/infernet/infernet.yaml")
    logging.getLogger("infernet").warning("top level")
    out = lines(capsys)
    assert len(out) == 2
    assert all(TEXT_LINE.match(line) for line in out), out
    assert out[0].endswith(" INFO daemon: watching /etc/infernet/infernet.yaml")
    assert out[1].endswith(" WARNING infernet: top level")


def test_text_appends_extra_fields_as_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    logging.getLogger("infernet.apply").info(
        "pulled", extra={"model": "qwen2.5:14b", "bytes": 3, "note": "two words"}
    )
    (line,) = lines(capsys)
    assert line.endswith(' INFO apply: pulled model=qwen2.5:14b bytes=3 note="two words"')


def test_text_exception_is_its_repr_on_the_same_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logging.getLogger("infernet.daemon").exception("reconcile failed")
    (line,) = lines(capsys)
    assert TEXT_LINE.match(line)
    assert line.endswith(" ERROR daemon: reconcile failed exc=ValueError('bad\\nvalue')")


def test_text_never_spans_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    logging.getLogger("infernet.daemon").error("first\nsecond\r\nthird", extra={"k": "a\nb"})
    (line,) = lines(capsys)
    assert "first\\nsecond\\r\\nthird" in line


# json ------------------------------------------------------------------------------------------


def test_json_has_ts_level_logger_msg_and_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json", "info")
    logging.getLogger("infernet.apply").info("pulled %s", "x", extra={"model": "x", "bytes": 3})
    (line,) = lines(capsys)
    doc = json.loads(line)
    assert doc == {
        "ts": doc["ts"],
        "level": "info",
        "logger": "infernet.apply",
        "msg": "pulled x",
        "model": "x",
        "bytes": 3,
    }
    ts = datetime.fromisoformat(doc["ts"])
    assert doc["ts"].endswith("Z")
    assert ts.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - ts).total_seconds()) < 60


def test_json_timestamp_is_iso_utc_with_milliseconds() -> None:
    doc = json.loads(logs.JsonFormatter().format(record()))
    assert doc["ts"] == "2026-11-27T04:00:00.250Z"
    assert datetime.fromisoformat(doc["ts"]) == MOMENT


def test_json_exception_goes_whole_into_exc(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("infernet.daemon").exception("tick failed")
    (line,) = lines(capsys)
    doc = json.loads(line)
    assert doc["msg"] == "tick failed"
    assert doc["level"] == "error"
    assert doc["exc"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in doc["exc"]


def test_json_never_spans_lines_and_keeps_fixed_fields(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json")
    logging.getLogger("infernet.daemon").warning(
        "a\nb", extra={"level": "mine", "ts": 1, "nan": float("nan"), "obj": object()}
    )
    (line,) = lines(capsys)
    doc = json.loads(line)  # strict JSON: NaN would not parse as a bare token here
    assert doc["msg"] == "a\nb"
    assert doc["level"] == "warning"
    assert doc["extra_level"] == "mine"
    assert doc["extra_ts"] == 1
    assert doc["nan"] == "nan"
    assert doc["obj"].startswith("<object object")


# both ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_level_threshold(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup(fmt, "warning")
    log = logging.getLogger("infernet.daemon")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert len(lines(capsys)) == 2
    logs.setup(fmt, "debug")
    log.debug("d")
    assert len(lines(capsys)) == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_twice_does_not_duplicate_lines(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("text")
    logs.setup(fmt)
    logging.getLogger("infernet.daemon").info("once")
    (line,) = lines(capsys)
    if fmt == "json":
        assert json.loads(line)["msg"] == "once"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_bad_format_arguments_still_give_one_line(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.setup(fmt)
    logging.getLogger("infernet.daemon").info("%d models", "three")
    (line,) = lines(capsys)
    assert "bad log arguments" in line


def test_third_party_warnings_share_the_format_and_their_info_is_quiet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.setup("json", "debug")
    logging.getLogger("httpx").info("HTTP Request: GET ...")
    logging.getLogger("httpx").warning("retrying\nnow")
    (line,) = lines(capsys)
    assert json.loads(line) | {"ts": ""} == {
        "ts": "",
        "level": "warning",
        "logger": "httpx",
        "msg": "retrying\nnow",
    }


def test_unknown_format_or_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'yaml'"):
        logs.setup("yaml")
    with pytest.raises(ConfigError, match="'loud'"):
        logs.setup("text", "loud")
    logs.setup("text", "WARNING")  # case does not matter
