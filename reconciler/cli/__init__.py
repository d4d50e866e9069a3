"""``infernet``: parse flags, run the command, render. Nothing else lives here.

Expected failures (``InfernetError``) print one line and exit 1; anything else is a bug: the
traceback is printed, kept in a crash report in the state directory, and the user is asked to
report it with that file.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any

from reconciler.cli import terminal
from reconciler.cli.commands import (
    EXIT_ERROR,
    EXIT_OK,
    cmd_apply,
    cmd_completion,
    cmd_keygen,
    cmd_plan,
    cmd_schema,
    cmd_status,
    cmd_validate,
    cmd_watch,
    err,
    state_dir,
)
from reconciler.cli.models import cmd_model
from reconciler.cli.ownership import cmd_adopt, cmd_state
from reconciler.cli.parser import build_parser
from reconciler.errors import ConfigError, InfernetError, ValidationError

COMMANDS = {
    "validate": cmd_validate,
    "schema": cmd_schema,
    "plan": cmd_plan,
    "apply": cmd_apply,
    "status": cmd_status,
    "model": cmd_model,
    "keygen": cmd_keygen,
    "watch": cmd_watch,
    "adopt": cmd_adopt,
    "state": cmd_state,
    "completion": cmd_completion,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``infernet`` console script."""
    # What a command imports (the backends' clients, pydantic's models) is ~100k objects that
    # live as long as the process. At the default thresholds the collector walks them again
    # and again while they are created, to free nothing: ~40 ms, a tenth of `infernet plan`.
    # A first generation of 10k collects every cycle all the same, ~15× less often; a daemon
    # holds at most that many more objects between collections.
    gc.set_threshold(10_000, 10, 10)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except InfernetError as exc:  # a --backend choice is checked against the backend registry
        err(str(exc))
        return EXIT_ERROR
    if args.command is None:  # a bare ``infernet``: the help, as ollama and kubectl print it
        parser.print_help()
        return EXIT_OK
    terminal.configure(quiet=args.quiet, no_color=args.no_color)
    try:
        try:
            code = COMMANDS[args.command](args)
            # Met here, inside the handlers, rather than by Python's own flush at exit.
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            raise
        except ValidationError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return EXIT_ERROR
        except (ConfigError, InfernetError) as exc:
            err(str(exc))
            return EXIT_ERROR
        except KeyboardInterrupt:
            err("interrupted; the next apply resumes where this one stopped")
            return 130
        except Exception:
            return _crash(args)
    except BrokenPipeError:
        return _reader_gone(args)


EXIT_PIPE = 128 + 13  # what a shell reports for a tool that SIGPIPE ended


def _reader_gone(args: argparse.Namespace) -> int:
    """Our output's reader went away (``infernet plan | head -1``): stop quietly, as ``cat``
    or ``grep`` do, with the status SIGPIPE gives them, so ``set -o pipefail`` sees the same
    as for any tool; 0 would tell ``--detailed-exitcode`` "no changes", 1 an error."""
    import contextlib

    streams = [s for s in (sys.stdout, sys.stderr) if _closed(s)]
    if not streams:
        return _crash(args)  # a broken pipe of something else (a socket): a bug
    # Python flushes its streams once more at exit; what is left would only fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in streams:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    return EXIT_PIPE


def _closed(stream: Any) -> bool:
    """``stream`` is a pipe (or socket) whose reader has gone."""
    import select

    try:
        stream.flush()
        fd = stream.fileno()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))


def _crash(args: argparse.Namespace) -> int:
    """A bug: keep the traceback, say where it is, ask for a report."""
    import traceback

    from state.location import crash_report

    text = traceback.format_exc()
    target = crash_report(state_dir(args), text)
    where = f"; details in {target}" if target is not None else ""
    sys.stderr.write(text)
    err(f"internal error in '{args.command}'{where}; please report it with that file")
    return EXIT_ERROR


__all__ = ["main"]
