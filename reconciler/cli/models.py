"""``infernet model list | install | remove``: the file edited under the node lock, then an
apply; a failed install (or a declined removal) puts the file back byte for byte."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.cli import terminal
from reconciler.cli.commands import (
    EXIT_ERROR,
    EXIT_OK,
    _confirm,
    _load,
    _lock,
    _session,
    err,
    run_apply,
)
from reconciler.errors import PlanError

if TYPE_CHECKING:
    from reconciler.converge.edits import Edit
    from reconciler.model import Desired


def cmd_model(args: argparse.Namespace) -> int:
    """model list | install | remove."""
    from reconciler.cli import render, terminal
    from reconciler.cli.status import model_rows

    if args.model_command == "list":
        the_desired = _load(args)
        with _session(args, the_desired) as session:
            observed, _plan = session.observe_and_plan()
            rows = model_rows(session.desired, observed, session.store)
        if args.json:
            render.print_json({"models": rows})
        else:
            terminal.show(render.render_models(rows))
        return EXIT_OK
    return _model_edit(args)


def _model_edit(args: argparse.Namespace) -> int:
    """model install | remove: lock, read, edit, apply; a failed install leaves the file as
    it was, byte for byte."""
    from reconciler.config import desired

    path = desired.locate(args.config)
    with _lock(args, f"model {args.model_command}"):
        current = desired.load(path)
        if args.model_command == "install":
            return _install(args, path, current)
        return _remove(args, path, current)


def _install(args: argparse.Namespace, path: Path, current: Desired) -> int:
    from reconciler.config import desired
    from reconciler.converge import edits

    install = edits.local_install(
        current, args.name, args.backend, pin=args.pin, source=args.source, sha256=args.sha256
    )
    edit = edits.add(path, install, pin=args.pin)
    code = EXIT_ERROR
    try:
        with _session(args, desired.load(path)) as session:
            code = run_apply(session, args, confirm=False)
    finally:
        if code != EXIT_OK and edit.changed:
            _restore(edit, args.name)
    if code == EXIT_OK and edit.changed:
        _git_hint(path, f"infernet model install {args.name}")
    return code


def _git_hint(path: Path, message: str) -> None:
    """The file this command edited is tracked by git and now differs from it: say so, and how
    to commit it, before a `git pull` on the node meets the edit."""
    from reconciler.config import gitcommit

    hint = gitcommit.facts(path).commit_hint(message)
    if hint:
        terminal.show(f"Note: {hint}", sys.stderr)


def _restore(edit: Edit, name: str, *, what: str = "install") -> None:
    """Put the file back as it was before a failed install (or a declined removal), unless
    someone changed it since (their edit wins; say so)."""
    import hashlib

    from reconciler.converge.edits import unchanged_since
    from reconciler.files import write_atomically

    path = edit.path
    try:
        if unchanged_since(path, hashlib.sha256(edit.after).hexdigest()):
            write_atomically(path, edit.before)
            terminal.show(
                f"Restored {path} as it was before the {what} of {name}.", sys.stderr, always=True
            )
            return
    except OSError as exc:
        err(f"could not restore {path} after the {what} of {name}: {exc}")
        return
    err(
        f"{path} was changed by someone else during the {what} of {name}; left as it is"
        + (f" (take {name} out of it if it is still listed)" if what == "install" else "")
    )


def _remove(args: argparse.Namespace, path: Path, current: Desired) -> int:
    from reconciler.config import desired
    from reconciler.converge import edits
    from reconciler.model import BackendKind

    only = BackendKind(args.backend) if args.backend else None
    removal = edits.removal(current, args.name, only)
    if not removal.matched:
        raise PlanError(
            f"{args.name} is not in {path}; nothing removed (infernet model list shows the "
            "file's models and what is installed)"
        )
    if removal.protected is not None:
        raise PlanError(
            f"{removal.protected.name} is protect: true in {path}; set protect: false there first"
        )
    if not args.yes and not sys.stdin.isatty():
        raise PlanError(
            f"refusing to remove {args.name} without confirmation: stdin is not a terminal; "
            "pass --yes"
        )
    edit = edits.remove(path, args.name, only)
    answers: list[bool] = []  # [False] from the moment it asks until it hears "yes"

    def ask() -> bool:
        answers.append(False)
        answers[0] = _confirm(f"Remove {args.name}?")
        return answers[0]

    try:
        with _session(args, desired.load(path)) as session:
            code = run_apply(session, args, force_remove=removal.keys, confirm=ask)
    finally:
        if answers and not answers[0]:  # declined or interrupted at the prompt: nothing done
            _restore(edit, args.name, what="removal")
    _git_hint(path, f"infernet model remove {args.name}")
    return code
