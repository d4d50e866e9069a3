"""The progress printer: rich bars on a terminal, plain lines off one, JSON lines on request."""

from __future__ import annotations

import io
import json

import pytest

from reconciler.cli.render import ProgressPrinter, human_bytes
from reconciler.events import Event, Kind
from reconciler.model import Action, BackendKind, Op

PULL = Action(Op.PULL, "qwen2.5:14b", BackendKind.OLLAMA, "c", "r")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is for a person."""

    def isatty(self) -> bool:
        return True


def _feed(printer: ProgressPrinter) -> None:
    printer(Event(Kind.STARTED, PULL))
    printer(
        Event(Kind.PROGRESS, PULL, phase="pulling aa", completed=4_500_000_000, total=9_000_000_000)
    )
    printer(Event(Kind.FINISHED, PULL, outcome="ok"))
    printer.close()


def test_terminal_gets_rich_bars() -> None:
    stream = Terminal()
    _feed(ProgressPrinter(json_lines=False, verbose=False, stream=stream))
    text = stream.getvalue()
    assert "pull qwen2.5:14b" in text and "done" in text
    assert "GB" in text  # rich's DownloadColumn


def test_plain_lines_with_verbose_show_percent_size_and_speed() -> None:
    stream = io.StringIO()
    _feed(ProgressPrinter(json_lines=False, verbose=True, stream=stream))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "pull qwen2.5:14b: started"
    assert " 50% 4.50/9.00 GB " in lines[1] and lines[1].endswith("MB/s")
    assert lines[-1] == "pull qwen2.5:14b: ok"


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    _feed(ProgressPrinter(json_lines=True, verbose=False, stream=io.StringIO()))
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["action_started", "progress", "action_finished"]
    assert events[1]["completed"] == 4_500_000_000


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (1023, "1023 B"), (8988124069, "8.4 GiB"), (None, "?")]
)
def test_human_bytes(n: int | None, text: str) -> None:
    assert human_bytes(n) == text
