"""The commands of ``infernet``: each reads its flags, calls the engine and renders the answer.

Exit codes: 0 done (or no changes), 1 an error, 2 changes (``--detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.errors import PlanError, ValidationError

if TYPE_CHECKING:
    from reconciler.converge.apply import SavedPlan
    from reconciler.converge.edits import Edit
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
    print(f"error: {message}", file=sys.stderr, flush=True)


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        raise PlanError(
            "refusing to apply without confirmation: stdin is not a terminal; pass --yes"
        )
    answer = input(f"{prompt} Only 'yes' will be accepted: ")
    return answer.strip() == "yes"


def _emit_plan(plan: Plan, args: argparse.Namespace) -> None:
    from reconciler.cli import render

    if getattr(args, "json", False):
        from reconciler.planning.document import to_document

        render.print_json(to_document(plan))
    else:
        print(render.render_plan(plan, verbose=getattr(args, "verbose", False)), flush=True)


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    """validate: every problem on its own line; exit 0 or 1."""
    from reconciler.config import desired

    path = desired.locate(args.config)
    try:
        loaded = desired.load(path)
    except ValidationError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_ERROR
    print(f"{path}: valid ({len(loaded.models)} served models)")
    return EXIT_OK


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

        write_document(plan, Path(args.out))
        print(
            f"Saved the plan to {args.out}; apply it with: infernet apply {args.out}",
            file=sys.stderr,
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
    confirm: bool = True,
) -> int:
    """One apply (``converge.apply``), shown and reported here; the caller holds the node lock
    (``_lock``), taken before it read the file."""
    from reconciler.cli import render
    from reconciler.converge.apply import apply
    from reconciler.converge.session import summary

    json_lines = getattr(args, "json", False)

    def show(plan: Plan) -> None:
        if not json_lines:
            print(render.render_plan(plan), flush=True)
        elif plan.errors:
            _emit_plan(plan, args)

    asked = confirm and not args.yes
    printer = render.ProgressPrinter(json_lines=json_lines, verbose=getattr(args, "verbose", False))
    try:
        applied = apply(
            session,
            saved=saved,
            show=show,
            progress=printer,
            confirm=(lambda: _confirm("Apply these changes?")) if asked else None,
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
        print(
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
    from reconciler.cli import render
    from reconciler.cli.status import build_status, render_status
    from reconciler.config import desired
    from reconciler.converge.session import load_or_last_valid

    # A deleted -c file is exactly when status must still answer from the last valid version.
    path = Path(args.config) if args.config else desired.locate(None)
    the_desired, config_error = load_or_last_valid(path, state_dir(args))
    with _session(args, the_desired) as session:
        observed, plan = session.observe_and_plan()
        doc = build_status(session, observed, plan)
    doc["config_error"] = config_error
    if args.json:
        render.print_json(doc)
    else:
        print(render_status(doc))
    return EXIT_OK


def cmd_model(args: argparse.Namespace) -> int:
    """model list | install | remove."""
    from reconciler.cli import render
    from reconciler.cli.status import model_rows

    if args.model_command == "list":
        the_desired = _load(args)
        with _session(args, the_desired) as session:
            observed, _plan = session.observe_and_plan()
            rows = model_rows(session.desired, observed, session.store)
        if args.json:
            render.print_json({"models": rows})
        else:
            print(render.render_models(rows))
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

    install = edits.local_install(current, args.name, args.backend, pin=args.pin)
    edit = edits.add(path, install, pin=args.pin)
    code = EXIT_ERROR
    try:
        with _session(args, desired.load(path)) as session:
            code = run_apply(session, args, confirm=False)
    finally:
        if code != EXIT_OK and edit.changed:
            _restore(edit, args.name)
    return code


def _restore(edit: Edit, name: str) -> None:
    """Put the file back as it was before a failed install, unless someone changed it since
    (their edit wins; say so)."""
    import hashlib

    from reconciler.converge.edits import unchanged_since
    from reconciler.files import write_atomically

    path = edit.path
    try:
        if unchanged_since(path, hashlib.sha256(edit.after).hexdigest()):
            write_atomically(path, edit.before)
            print(f"Restored {path} as it was before the install of {name}.", file=sys.stderr)
            return
    except OSError as exc:
        err(f"could not restore {path} after the failed install of {name}: {exc}")
        return
    err(
        f"{path} was changed by someone else during the install of {name}; left as it is "
        f"(take {name} out of it if it is still listed)"
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
    edits.remove(path, args.name, only)
    with _session(args, desired.load(path)) as session:
        return run_apply(session, args, force_remove=removal.keys, confirm=False)


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
