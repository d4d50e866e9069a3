"""The commands of ``infernet``: each reads its flags, calls the engine and renders the answer.

Exit codes: 0 done (or no changes), 1 an error, 2 changes (``--detailed-exitcode``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.errors import PlanError, ValidationError

if TYPE_CHECKING:
    from reconciler.converge.session import Session
    from reconciler.model import BackendKind, Desired, Plan
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
        print(f"Saved the plan to {args.out}; apply it with: infernet apply {args.out}",
              file=sys.stderr)  # fmt: skip
    if plan.errors:
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and plan.actions else EXIT_OK


def _saved_plan(args: argparse.Namespace) -> tuple[Desired, Plan]:
    """A plan saved by ``plan --out`` and the file it was made from (which must not have moved)."""
    from reconciler.config import desired
    from reconciler.planning.document import read_document, with_sources

    saved = read_document(Path(args.plan_file))
    the_desired = desired.load(Path(saved.source.path))
    if the_desired.source.sha256 != saved.source.sha256:
        raise PlanError(
            f"saved plan {args.plan_file} was made from another version of "
            f"{saved.source.path}; run infernet plan --out again"
        )
    return the_desired, with_sources(saved, the_desired)  # the document's sources are redacted


def run_apply(
    session: Session,
    args: argparse.Namespace,
    *,
    saved: Plan | None = None,
    force_remove: frozenset[str] = frozenset(),
    confirm: bool = True,
) -> int:
    """Observe, plan (or check the saved plan), confirm, execute, report; the caller holds
    the node lock (``_lock``), taken before it read the file."""
    from reconciler.cli import render
    from reconciler.converge.session import summary

    json_lines = getattr(args, "json", False)
    observed, plan = session.observe_and_plan(
        allow_destroy=getattr(args, "allow_destroy", False),
        refresh=getattr(args, "refresh", False),
        force_remove=force_remove,
        record=True,
    )
    if saved is not None:
        if saved.fingerprint != plan.fingerprint:
            raise PlanError(
                f"the node changed since the plan in {args.plan_file} was made "
                "(installed, loaded or upstream models differ); run infernet plan --out again"
            )
        plan = saved
    if not json_lines:
        print(render.render_plan(plan), flush=True)
    if plan.errors:
        if json_lines:
            _emit_plan(plan, args)
        raise PlanError(plan.errors[0] + (f" (and {len(plan.errors) - 1} more)"
                                          if len(plan.errors) > 1 else ""))  # fmt: skip
    if not plan.actions:
        printer = render.ProgressPrinter(json_lines=json_lines, verbose=False)
        session.heartbeat(plan, observed, converged=True, progress=printer)
        if json_lines:
            render.print_json({"event": "converged", "outcome": "converged", "changes": 0})
        return EXIT_OK
    if confirm and not args.yes and not _confirm("Apply these changes?"):
        print("Apply cancelled.", file=sys.stderr)
        return EXIT_ERROR
    printer = render.ProgressPrinter(json_lines=json_lines, verbose=getattr(args, "verbose", False))
    try:
        result = session.apply(plan, observed, progress=printer)
    finally:
        printer.close()
    if json_lines:
        render.print_json({"event": "result", **summary(result)})
    failed = result.failed
    if failed:
        for outcome in failed:
            err(f"{outcome.action.op.value} {outcome.action.model}: {outcome.error}")
        return EXIT_ERROR
    if not result.converged:
        drift = result.final.actions if result.final else ()
        err("applied, but the node has not converged: "
             + ", ".join(f"{a.op.value} {a.model}" for a in drift))  # fmt: skip
        return EXIT_ERROR
    if not json_lines:
        print(f"Apply complete: {len(result.outcomes)} actions. Advertised: "
              f"{', '.join(result.advertised) or '(nothing)'}")  # fmt: skip
    return EXIT_CHANGES if getattr(args, "detailed_exitcode", False) else EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """apply: converge the node, from the file or a saved plan."""
    with _lock(args, "apply"):
        saved = None
        if args.plan_file:
            the_desired, saved = _saved_plan(args)
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


def _backend_for(current: Desired, name: str, given: str | None) -> BackendKind:
    """``--backend``, else the backend of the file's entry NAME refers to, else the kind whose
    driver claims the name by its look (a ``*.gguf`` file is llama.cpp's), else the file's
    default."""
    from reconciler import backends
    from reconciler.model import BackendKind
    from reconciler.names import refers_to

    if given:
        return BackendKind(given)
    for spec in current.models:
        if refers_to(spec, name):
            return spec.backend
    for driver in backends.drivers():
        if driver.claims is not None and driver.claims(name):
            return driver.kind
    return current.default_backend


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
    from reconciler.config import edit as configedit
    from reconciler.model import FOREVER

    backend = _backend_for(current, args.name, args.backend)
    entry: str | dict[str, Any] = args.name
    if args.pin or backend is not current.default_backend:
        entry = {"name": args.name}
        if backend is not current.default_backend:
            entry["backend"] = backend.value
        if args.pin:
            entry["keep_alive"] = "forever"
    before = path.read_bytes()
    added = configedit.add_model(path, entry)
    if not added and args.pin:
        configedit.set_keep_alive(path, args.name, FOREVER, backend=backend)
    after = path.read_bytes()
    code = EXIT_ERROR
    try:
        with _session(args, desired.load(path)) as session:
            code = run_apply(session, args, confirm=False)
    finally:
        if code != EXIT_OK and after != before:
            _restore(path, before, after, args.name)
    return code


def _restore(path: Path, before: bytes, after: bytes, name: str) -> None:
    """Put the file back as it was before a failed install, unless someone changed it since
    (their edit wins; say so)."""
    from reconciler.files import write_atomically

    try:
        if path.read_bytes() == after:
            write_atomically(path, before)
            print(f"Restored {path} as it was before the install of {name}.", file=sys.stderr)
            return
    except OSError as exc:
        err(f"could not restore {path} after the failed install of {name}: {exc}")
        return
    err(f"{path} was changed by someone else during the install of {name}; left as it is "
         f"(take {name} out of it if it is still listed)")  # fmt: skip


def _remove(args: argparse.Namespace, path: Path, current: Desired) -> int:
    from reconciler import names
    from reconciler.config import desired
    from reconciler.config import edit as configedit
    from reconciler.model import BackendKind

    only = BackendKind(args.backend) if args.backend else None
    matched = [m for m in current.models if names.refers_to(m, args.name, only)]
    if not matched:
        raise PlanError(
            f"{args.name} is not in {path}; nothing removed (infernet model list shows the "
            "file's models and what is installed)"
        )
    guarded = next((m for m in matched if m.protect), None)
    if guarded is not None:
        raise PlanError(
            f"{guarded.name} is protect: true in {path}; set protect: false there first"
        )
    configedit.remove_model(path, args.name, only)
    keys = frozenset(names.key(m.backend, m.canonical) for m in matched)
    with _session(args, desired.load(path)) as session:
        return run_apply(session, args, force_remove=keys, confirm=False)


def cmd_watch(args: argparse.Namespace) -> int:
    """watch: the GitOps daemon (see reconciler/daemon.py)."""
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
