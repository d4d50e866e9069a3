"""The progress printer: rich bars on a terminal, plain lines off one, JSON lines on request."""

from __future__ import annotations

import io
import json

import pytest

from reconciler.cli.progress import ProgressPrinter
from reconciler.cli.render import human_bytes
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
    assert "Pulling qwen2.5:14b from Ollama registry..." in text
    assert "100% (9 GB / 9 GB)" in text  # the last line of the download stays
    assert "pull qwen2.5:14b: ok" in text


def test_plain_lines_with_verbose_show_the_header_and_the_last_line() -> None:
    stream = io.StringIO()
    _feed(ProgressPrinter(json_lines=False, verbose=True, stream=stream))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Pulling qwen2.5:14b from Ollama registry..."
    assert "100% (9 GB / 9 GB)" in lines[1]  # the download ended: its 100% line
    assert lines[-1] == "pull qwen2.5:14b: ok"


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    _feed(ProgressPrinter(json_lines=True, verbose=False, stream=io.StringIO()))
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["action_started", "progress", "action_finished"]
    assert events[1]["completed"] == 4_500_000_000


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1023, "1.0 KB"), (8988124069, "9.0 GB"), (None, "?")],
)
def test_human_bytes(n: int | None, text: str) -> None:
    assert human_bytes(n) == text
