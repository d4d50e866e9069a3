"""Log lines on stderr for the ``watch`` daemon: human text or JSON lines, one line per record.

``text``::

    2026-11-27T04:00:00Z INFO daemon: pulled qwen2.5:14b model=qwen2.5:14b bytes=3

``json`` (one object per line; ``extra={...}`` fields become keys)::

    {"ts": "2026-11-27T04:00:00.123Z", "level": "info", "logger": "infernet.daemon",
     "msg": "pulled qwen2.5:14b", "model": "qwen2.5:14b", "bytes": 3}

A record never spans lines, whatever its message, arguments or exception hold: journald and log
shippers split on newlines, and half a traceback attributed to the next record misleads. In
JSON the traceback goes whole into ``exc`` (escaped); in text only the exception's ``repr``
is kept, after the message.

The ``infernet`` logger tree gets its own handler and stops propagating; the root logger gets
the same handler at WARNING, so a third-party library's warning comes out in the same format
instead of breaking a JSON stream. Calling :func:`setup` again replaces what it installed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any

from reconciler.errors import ConfigError

FORMATS = ("text", "json")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
ROOT = "infernet"

# What every LogRecord carries; anything else on a record came in through ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python 3.12+
}
_FIXED = ("ts", "level", "logger", "msg", "exc", "stack")


def setup(fmt: str = "text", level: str = "info") -> None:
    """Send the ``infernet`` loggers to stderr as ``fmt`` (text | json) from ``level`` up."""
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    threshold = LEVELS.get(level.lower())
    if threshold is None:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()

    ours = logging.getLogger(ROOT)
    ours.setLevel(threshold)
    ours.propagate = False  # or every infernet record would come out twice, via root
    _install(ours, formatter, logging.NOTSET)
    _install(logging.getLogger(), formatter, logging.WARNING)


class TextFormatter(logging.Formatter):
    """``TS LEVEL logger: message key=value… exc=repr`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname} {_short_name(record.name)}: "]
        parts.append(_message(record))
        for key, value in _extras(record).items():
            parts.append(f" {key}={_logfmt(value)}")
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(f" exc={record.exc_info[1]!r}")
        return _one_line("".join(parts))


class JsonFormatter(logging.Formatter):
    """One JSON object: ts, level, logger, msg, the ``extra`` fields, exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record, millis=True),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in _extras(record).items():
            # The fixed fields stay what they say; a clashing extra is kept, renamed.
            doc[f"extra_{key}" if key in _FIXED else key] = _jsonable(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes every newline, so the object is one line by construction.
        try:
            return json.dumps(doc, default=str, allow_nan=False)
        except ValueError:  # a NaN nested in an extra, a circular structure: keep the line
            return json.dumps({k: v if isinstance(v, str) else repr(v) for k, v in doc.items()})


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (redirections and capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _install(logger: logging.Logger, formatter: logging.Formatter, level: int) -> None:
    """Replace the handler a previous setup() put on ``logger``; leave any other alone."""
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler(level)
    handler.setFormatter(formatter)
    logger.addHandler(handler)


def _timestamp(record: logging.LogRecord, *, millis: bool = False) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _short_name(name: str) -> str:
    """``infernet.daemon`` → ``daemon``: in text, every logger of ours is implied."""
    return name.removeprefix(ROOT + ".") if name != ROOT else name


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:
        # Bad %-arguments would make logging print a multi-line "Logging error" report;
        # the raw template and arguments say as much, on the record's own line.
        return f"{record.msg!r} % {record.args!r} (bad log arguments)"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _jsonable(value: Any) -> Any:
    # NaN and infinities are not JSON; say them as strings rather than drop the line.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _logfmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")
