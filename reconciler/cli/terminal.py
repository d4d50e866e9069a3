"""How output reaches a person: quiet or not, in colour or not.

Set once per run from the flags (``configure``). Colour is for a person at a terminal: never
when the stream is piped or redirected, never with ``--no-color`` or a non-empty ``NO_COLOR``
(https://no-color.org), never with ``TERM=dumb``. Plain text is printed with ``print`` and rich
is imported only when colour is really drawn, so piped output stays byte-for-byte plain and a
script's ``infernet plan`` starts fast.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import IO, Any

# Terraform's colours for its plan symbols: create green, destroy red, change yellow; our
# keep-alive changes (pin, unpin) take the cyan Terraform gives to what it only reads.
_PAINT = (
    (r"(?m)^\+(?= )", "bold green"),
    (r"(?m)^-(?= )", "bold red"),
    (r"(?m)^~(?= )", "bold yellow"),
    (r"(?m)^[\^v](?= )", "bold cyan"),
    (r"(?m)^Error:", "bold red"),
    (r"(?m)^Warning:", "bold yellow"),
    (r"DOES NOT FIT|NOT converged|UNREACHABLE|INVALID|FAILED", "bold red"),
    (r"(?m)^(Plan:|No changes\.|Apply complete:)", "bold"),
)


@dataclass
class _Settings:
    quiet: bool = False
    no_color: bool = False


SETTINGS = _Settings()


def configure(*, quiet: bool, no_color: bool) -> None:
    """The run's choices, from ``--quiet`` and ``--no-color``."""
    SETTINGS.quiet = quiet
    SETTINGS.no_color = no_color


def quiet() -> bool:
    """``--quiet``: only errors (and what was asked for as JSON) are printed."""
    return SETTINGS.quiet


def colour(stream: IO[str]) -> bool:
    """Whether ``stream`` gets colour: a terminal, and nobody said no."""
    if SETTINGS.no_color or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or exotic stream: plain
        return False


def console(stream: IO[str]) -> Any:
    """A rich console on ``stream`` that draws colour only when ``colour`` says so and never
    wraps or crops a line (tables and names must survive narrow terminals whole)."""
    from rich.console import Console

    return Console(
        file=stream,
        no_color=not colour(stream),
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
    )


def paint(text: str) -> Any:
    """``text`` as a rich ``Text`` with the plan's symbols and verdicts coloured."""
    from rich.text import Text

    painted = Text(text)
    for pattern, style in _PAINT:
        painted.highlight_regex(pattern, style)
    return painted


def show(text: str, stream: IO[str] | None = None, *, always: bool = False) -> None:
    """A person's output (a plan, a table, a result line): nothing with ``--quiet`` (unless
    ``always``); coloured on a terminal; plain text otherwise."""
    if SETTINGS.quiet and not always:
        return
    target = stream or sys.stdout
    if colour(target):
        console(target).print(paint(text))
        target.flush()
    else:
        print(text, file=target, flush=True)


def error(message: str) -> None:
    """One ``error: …`` line on stderr, always (``--quiet`` keeps errors); red on a terminal."""
    if colour(sys.stderr):
        from rich.text import Text

        line = Text("error:", style="bold red")
        line.append(f" {message}")
        console(sys.stderr).print(line)
        sys.stderr.flush()
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
