"""The progress display of ``apply``, ``model install`` and ``model remove``.

A download reads as the seed shows it: a header naming the model, the source and the backend
(``Pulling qwen2.5:14b from Ollama registry...``), then one progress line with a bar, the
percentage, done / total and the rate (``██████████████████░░ 89% (7.2 GB / 8.1 GB) 45 MB/s``).
On a terminal that line is redrawn in place (rich's live display); off one (a pipe, a log,
``journalctl``) it is printed once every few seconds with ``--verbose``, so a log shows the
download moving without a line per chunk. Sizes are decimal, as ``ollama list`` prints them.
Everything goes to stderr: ``--json`` keeps stdout for JSON lines.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from rich.progress import Progress, ProgressColumn, Task, TaskID
from rich.text import Text

from reconciler import backends
from reconciler.cli import terminal
from reconciler.cli.render import print_json
from reconciler.events import Event, Kind
from reconciler.model import Action, Op
from reconciler.redact import redact
from reconciler.units import format_size

BAR_WIDTH = 20
PIPE_INTERVAL = 3.0
"""Seconds between two progress lines of one download off a terminal."""

_PULLS = (Op.PULL, Op.UPDATE)


def header(action: Action) -> str:
    """``Pulling qwen2.5:14b from Ollama registry...``: what, from where, for which backend."""
    verb = "Updating" if action.op is Op.UPDATE else "Pulling"
    title = backends.driver(action.backend).shown
    if action.source is None:
        return f"{verb} {action.model} from {title} registry..."
    return f"{verb} {action.model} from {redact(action.source)} for {title}..."


def progress_line(done: int, total: int, rate: float | None, label: str | None = None) -> str:
    """``██████████████████░░ 89% (7.2 GB / 8.1 GB) 45 MB/s``, with `` label`` appended when
    several downloads share the screen. Nothing says 100% before the last byte."""
    share = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    filled = round(share * BAR_WIDTH)
    percent = round(share * 100)
    if done < total:
        filled, percent = min(filled, BAR_WIDTH - 1), min(percent, 99)
    bar = "█" * filled + "░" * (BAR_WIDTH - filled)
    line = f"{bar} {percent}% ({format_size(done)} / {format_size(total)})"
    if rate is not None:
        line += f" {format_size(rate)}/s"
    return f"{line}  {label}" if label else line


@dataclass
class _Download:
    """One download: its first sample (a resumed pull's bytes already on disk are not speed),
    its latest figures and, off a terminal, when its last line was printed."""

    started: float
    first: int | None = None
    done: int = 0
    total: int = 0
    printed: float = 0.0

    def rate(self, now: float) -> float | None:
        if self.first is None or now - self.started < 0.05:
            return None
        return (self.done - self.first) / (now - self.started)


class _SeedColumn(ProgressColumn):
    """The seed's line as the one column of rich's live display."""

    def __init__(self, several: Callable[[], bool]) -> None:
        super().__init__()
        self.several = several

    def render(self, task: Task) -> Text:
        if not task.total:
            return Text(f"{'░' * BAR_WIDTH} waiting for the size  {task.description}")
        label = task.description if self.several() else None
        return Text(progress_line(int(task.completed), int(task.total), task.speed, label))


class ProgressPrinter:
    """Turns executor events into output: JSON lines, a live display on a terminal, or lines
    (``--quiet``: nothing but the JSON lines asked for)."""

    def __init__(self, *, json_lines: bool, verbose: bool, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self._quiet = terminal.quiet() and not json_lines
        self._lock = threading.Lock()
        self._live: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._downloads: dict[str, _Download] = {}
        self._tty = not json_lines and self.stream.isatty()

    def close(self) -> None:
        """Stop the live display."""
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self.json_lines:
                print_json(event.to_json())
            elif self._quiet:
                return
            elif self._tty:
                self._draw(event)
            else:
                self._line(event)

    # ---- on a terminal: rich's live display redraws each download's line in place

    def _display(self) -> Progress:
        if self._live is None:
            self._live = Progress(
                _SeedColumn(lambda: len(self._tasks) > 1),
                console=terminal.console(self.stream),
                transient=True,
                refresh_per_second=4,
            )
            self._live.start()
        return self._live

    def _say(self, text: str) -> None:
        """A line above the live display (or plain, before it started)."""
        if self._live is not None:
            self._live.console.print(terminal.paint(text))
        else:
            terminal.show(text, self.stream)

    def _draw(self, event: Event) -> None:
        action = event.action
        if action is None or action.op not in _PULLS:
            self._plain(event)
            return
        label = action.model
        if event.kind is Kind.STARTED:
            self._downloads[label] = _Download(started=time.monotonic())
            self._say(header(action))
            self._tasks[label] = self._display().add_task(label, total=None)
        elif event.kind is Kind.PROGRESS and event.total and label in self._tasks:
            known = self._downloads.get(label)
            first = known is None or known.first is None
            self._sample(label, event.completed or 0, event.total)
            live, task = self._display(), self._tasks[label]
            if first:  # a resumed pull starts at its bytes on disk, not with a burst of speed
                live.reset(task, total=event.total, completed=event.completed or 0)
            else:
                live.update(task, total=event.total, completed=event.completed or 0)
        elif event.kind is Kind.FINISHED:
            # The download's last line stays above the live display, where its row was.
            line = self._last_line(label, ok=event.outcome == "ok")
            if label in self._tasks and self._live is not None:
                self._live.remove_task(self._tasks.pop(label))
                self._live.refresh()  # what stays below the printed lines is drawn now
            if line:
                self._say(line)
            self._plain(event)
        else:
            self._plain(event)

    # ---- off a terminal: the same line, once every PIPE_INTERVAL seconds (with --verbose)

    def _line(self, event: Event) -> None:
        action = event.action
        if action is None or action.op not in _PULLS:
            self._plain(event)
        elif event.kind is Kind.STARTED:
            self._downloads[action.model] = _Download(started=time.monotonic())
            print(header(action), file=self.stream, flush=True)
        elif event.kind is Kind.PROGRESS:
            if self.verbose and event.total:
                download = self._sample(action.model, event.completed or 0, event.total)
                # Never at 100% of what is known so far: Ollama announces a model's layers one
                # after another, so the total grows; the 100% line comes when the pull ends.
                now = time.monotonic()
                if now - download.printed >= PIPE_INTERVAL and download.done < download.total:
                    download.printed = now
                    print(self._text(action.model, download), file=self.stream, flush=True)
        elif event.kind is Kind.FINISHED:
            line = self._last_line(action.model, ok=event.outcome == "ok")
            if line and self.verbose and event.outcome == "ok":
                print(line, file=self.stream, flush=True)
            self._plain(event)
        else:
            self._plain(event)

    # ---- both

    def _sample(self, label: str, done: int, total: int) -> _Download:
        """Record a download's figures; its first sample starts the clock of its rate."""
        now = time.monotonic()
        download = self._downloads.setdefault(label, _Download(started=now))
        if download.first is None:
            download.started, download.first, download.printed = now, done, now
        download.done, download.total = done, total
        return download

    def _text(self, label: str, download: _Download) -> str:
        several = label if len(self._downloads) > 1 else None
        return progress_line(
            download.done, download.total, download.rate(time.monotonic()), several
        )

    def _last_line(self, label: str, *, ok: bool) -> str | None:
        """A finished download's last line (100% when it succeeded), and forget it."""
        download = self._downloads.get(label)
        line = None
        if download is not None and download.total:
            if ok:
                download.done = download.total
            line = self._text(label, download)
        self._downloads.pop(label, None)
        return line

    def _plain(self, event: Event) -> None:
        """Action starts and ends, retries and notes, one line each."""
        action = event.action
        label = f"{action.op.value} {action.model}" if action else ""
        text = None
        if event.kind is Kind.STARTED:
            text = f"{label}: started"
        elif event.kind is Kind.FINISHED:
            tail = f": {event.message}" if event.message else ""
            text = f"{label}: {event.outcome}{tail}"
        elif event.kind in (Kind.RETRY, Kind.NOTE):
            text = f"{label}: {event.message}" if label else event.message
        if text is None:
            return
        if self._tty:
            self._say(text)
        else:
            print(text, file=self.stream, flush=True)
