"""The commands of ``infernet``: each reads its flags, calls the engine and renders the answer.

Exit codes: 0 done (or no changes), 1 an error, 2 changes (``--detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import PlanError, ValidationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from reconciler.converge.apply import SavedPlan
    from reconciler.converge.session import Session
    from reconciler.model import Desired, Plan
    from state import NodeLock

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


# --------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Desired:
    from reconciler.config import desired

    return desired.load(desired.locate(args.config))


def state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir).expanduser()
    from state import default_state_dir

    return default_state_dir()


def _session(args: argparse.Namespace, the_desired: Desired) -> Session:
    from reconciler.converge.session import Session

    return Session.open(the_desired, state_dir(args))


def _lock(args: argparse.Namespace, purpose: str) -> NodeLock:
    """The node lock, held. Writers take it before they read the file: one that waited for
    another writer then reads (and edits, plans, applies) what that writer left, never a
    version from before it."""
    from reconciler.converge.session import node_lock

    return node_lock(state_dir(args), purpose)


def err(message: str) -> None:
    from reconciler.cli import terminal

    terminal.error(message)


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        raise PlanError(
            "refusing to apply without confirmation: stdin is not a terminal; pass --yes"
        )
    try:
        answer = input(f"{prompt} Only 'yes' will be accepted: ")
    except EOFError:  # the terminal closed (Ctrl-D): no answer is not a yes
        print(file=sys.stderr)
        return False
    return answer.strip() == "yes"


def _emit_plan(plan: Plan, args: argparse.Namespace) -> None:
    from reconciler.cli import render

    if getattr(args, "json", False):
        from reconciler.planning.document import to_document

        render.print_json(to_document(plan))
    else:
        _show_plan(plan, verbose=getattr(args, "verbose", False))


def _show_plan(plan: Plan, *, verbose: bool = False, always: bool = False) -> None:
    """The plan for a person; with ``--quiet`` only its errors, unless ``always`` (a plan
    about to be confirmed is shown: nobody answers a question about what they can't see)."""
    from reconciler.cli import render, terminal

    if terminal.quiet() and not always:
        for problem in plan.errors:
            err(problem)
        return
    terminal.show(render.render_plan(plan, verbose=verbose), always=always)


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    """validate: every problem on its own line (or one JSON document); exit 0 or 1."""
    from reconciler.config import desired

    if args.json:
        return _validate_json(args)
    path = desired.locate(args.config)
    try:
        loaded = desired.load(path)
    except ValidationError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_ERROR
    from reconciler.cli import terminal

    terminal.show(f"{path}: valid ({len(loaded.models)} served models)")
    return EXIT_OK


def _validate_json(args: argparse.Namespace) -> int:
    """``validate --json``: ``{path, valid, served_models, errors[{file, line, column,
    message}]}`` on stdout, also when the file is missing or unreadable (line and column null),
    so a CI step or an editor reads one shape whatever went wrong."""
    from reconciler.cli import render
    from reconciler.config import desired
    from reconciler.errors import ConfigError

    where: str | None = args.config
    errors: list[dict[str, object]] = []
    count = 0
    try:
        path = desired.locate(args.config)
        where = str(path)
        count = len(desired.load(path).models)
    except ValidationError as exc:
        errors = [
            {"file": p.file, "line": p.line, "column": p.column, "message": p.message}
            for p in exc.problems
        ]
    except ConfigError as exc:
        errors = [{"file": where, "line": None, "column": None, "message": str(exc)}]
    render.print_json(
        {"path": where, "valid": not errors, "served_models": count, "errors": errors}
    )
    return EXIT_ERROR if errors else EXIT_OK


def cmd_schema(_args: argparse.Namespace) -> int:
    """schema: the JSON Schema of the file."""
    from reconciler.config import desired

    sys.stdout.write(desired.schema_text())
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """plan: observe, diff, print; ``--out`` saves it."""
    the_desired = _load(args)
    with _session(args, the_desired) as session:
        _observed, plan = session.observe_and_plan(
            allow_destroy=args.allow_destroy, refresh=args.refresh
        )
    _emit_plan(plan, args)
    if args.out:
        from reconciler.planning.document import write_document

        # The absolute path: `infernet apply PLAN` re-reads the file from wherever it is run.
        source = replace(plan.source, path=os.path.abspath(plan.source.path))
        write_document(replace(plan, source=source), Path(args.out))
        from reconciler.cli import terminal

        terminal.show(
            f"Saved the plan to {args.out}; apply it with: infernet apply {args.out}",
            sys.stderr,
        )
    if plan.errors:
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and plan.actions else EXIT_OK


def run_apply(
    session: Session,
    args: argparse.Namespace,
    *,
    saved: SavedPlan | None = None,
    force_remove: frozenset[str] = frozenset(),
    confirm: bool | Callable[[], bool] = True,
) -> int:
    """One apply (``converge.apply``), shown and reported here; the caller holds the node lock
    (``_lock``), taken before it read the file. ``confirm``: ask "Apply these changes?" (True),
    don't (False), or ask this way (after the plan is shown, unless ``--yes``)."""
    from reconciler.cli import render, terminal
    from reconciler.cli.progress import ProgressPrinter
    from reconciler.converge.apply import apply
    from reconciler.converge.session import summary

    json_lines = getattr(args, "json", False)

    def show(plan: Plan) -> None:
        if not json_lines:
            _show_plan(plan, always=asked)
        elif plan.errors:
            _emit_plan(plan, args)

    asked = confirm is not False and not args.yes
    ask = confirm if callable(confirm) else (lambda: _confirm("Apply these changes?"))
    printer = ProgressPrinter(json_lines=json_lines, verbose=getattr(args, "verbose", False))
    try:
        applied = apply(
            session,
            saved=saved,
            show=show,
            progress=printer,
            confirm=ask if asked else None,
            allow_destroy=getattr(args, "allow_destroy", False),
            refresh=getattr(args, "refresh", False),
            force_remove=force_remove,
        )
    finally:
        printer.close()
    result = applied.result
    if applied.cancelled:
        print("Apply cancelled.", file=sys.stderr)
        return EXIT_ERROR
    if result is None:
        if json_lines:
            render.print_json({"event": "converged", "outcome": "converged", "changes": 0})
        return EXIT_OK
    if json_lines:
        render.print_json({"event": "result", **summary(result)})
    failed = result.failed
    if failed:
        for outcome in failed:
            err(f"{outcome.action.op.value} {outcome.action.model}: {outcome.error}")
        return EXIT_ERROR
    if not result.converged:
        drift = result.final.actions if result.final else ()
        err(
            "applied, but the node has not converged: "
            + ", ".join(f"{a.op.value} {a.model}" for a in drift)
        )
        return EXIT_ERROR
    if not json_lines:
        terminal.show(
            f"Apply complete: {len(result.outcomes)} actions. Advertised: "
            f"{', '.join(result.advertised) or '(nothing)'}"
        )
    return EXIT_CHANGES if getattr(args, "detailed_exitcode", False) else EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """apply: converge the node, from the file or a saved plan."""
    with _lock(args, "apply"):
        saved = None
        if args.plan_file:
            from reconciler.converge.apply import read_saved

            saved = read_saved(Path(args.plan_file))
            the_desired = saved.desired
        else:
            the_desired = _load(args)
        with _session(args, the_desired) as session:
            return run_apply(session, args, saved=saved)


def cmd_status(args: argparse.Namespace) -> int:
    """status: desired vs installed vs loaded vs advertised, budget, last apply."""
    from reconciler.cli import render, terminal
    from reconciler.cli.status import build_status, render_status, verdict
    from reconciler.config import desired
    from reconciler.converge.session import load_or_last_valid

    # A deleted -c file is exactly when status must still answer from the last valid version.
    path = Path(args.config) if args.config else desired.locate(None)
    the_desired, config_error = load_or_last_valid(path, state_dir(args))
    with _session(args, the_desired) as session:
        observed, plan = session.observe_and_plan()
        doc = build_status(session, observed, plan)
    doc["config_error"] = config_error
    errors, pending = verdict(doc)
    doc["converged"] = not errors and not pending
    if args.json:
        render.print_json(doc)
    else:
        terminal.show(render_status(doc))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        err(errors[0] + more)
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and pending else EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    """watch: the GitOps daemon (see ``reconciler.daemon``)."""
    from reconciler.config import desired
    from reconciler.daemon import logs
    from reconciler.daemon.loop import Daemon
    from reconciler.daemon.metrics import Metrics

    logs.setup(args.log_format, args.log_level)
    path = desired.locate(args.config)
    metrics = Metrics.start(args.metrics_addr) if args.metrics_addr else Metrics.disabled()
    if metrics.address is not None:
        host, port = metrics.address
        logging.getLogger("infernet.daemon").info(
            "metrics at http://%s:%d/metrics", host, port, extra={"port": port}
        )
    return Daemon(path, state_dir(args), metrics=metrics, once=args.once, tick=args.tick).run()


def cmd_completion(args: argparse.Namespace) -> int:
    """completion SHELL: the script; ``--models`` (what the script calls): the file's model
    names, one a line, and nothing at all when there is no valid file to read them from."""
    from reconciler.cli import completion

    if args.models:
        names = completion.model_names(args.config)
        sys.stdout.write("".join(f"{name}\n" for name in names))
        return EXIT_OK
    from reconciler.cli.parser import build_parser

    sys.stdout.write(completion.script(build_parser(), args.shell))
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    """keygen: write a node key; the x-only public key alone on the last line."""
    from reconciler.controlplane.identity import generate_key
    from reconciler.model import DEFAULT_KEY_FILE

    target = args.out
    if target is None:
        target = DEFAULT_KEY_FILE
        if args.config or os.environ.get("INFERNET_CONFIG") or Path("infernet.yaml").exists():
            from reconciler.config import desired

            the_desired = desired.load(desired.locate(args.config))
            if the_desired.control_plane is not None:
                target = the_desired.control_plane.key_file
    path = Path(target).expanduser()
    pubkey = generate_key(path, force=args.force)
    print(f"Wrote the node key to {path} (mode 0600). Public key:", file=sys.stderr)
    print(pubkey)
    return EXIT_OK
