"""``infernet``: parse flags, call the engine, render. Nothing else lives here.

Expected failures (``InfernetError``) print one line and exit 1; anything else is a bug: the
traceback is saved to the state directory and the user is asked to report it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.errors import ConfigError, InfernetError, PlanError, ValidationError

if TYPE_CHECKING:
    from reconciler.model import BackendKind, Desired, Plan
    from reconciler.session import Session
    from state import NodeLock

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


# --------------------------------------------------------------------------- arguments


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-c and --state-dir are accepted before or after the command name."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("-c", "--config", metavar="FILE", default=default,
                        help="desired-state file (default: $INFERNET_CONFIG, ./infernet.yaml, "
                        "/etc/infernet/infernet.yaml)")  # fmt: skip
    parser.add_argument("--state-dir", metavar="DIR", default=default,
                        help="state directory (default: $INFERNET_STATE_DIR, XDG)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="infernet",
        description="Keep this node's model inventory exactly as infernet.yaml declares.",
    )
    parser.add_argument("--version", action="version", version=f"infernet {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        return p

    command("validate", "validate the file; print every error as FILE:LINE:COL: message")
    p = command("plan", "show what apply would change")
    p.add_argument("--out", metavar="PLAN", help="save the plan for 'infernet apply PLAN'")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON document")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 2 when there are changes")
    p.add_argument("--allow-destroy", action="store_true", help="allow more than max_removals")
    p.add_argument("--refresh", action="store_true", help="check every model upstream for updates")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="also list models that need nothing"
    )

    p = command("apply", "bring the node to the file's state")
    p.add_argument("plan_file", nargs="?", metavar="PLAN", help="a plan saved by plan --out")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask for confirmation")
    p.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    p.add_argument("--allow-destroy", action="store_true", help="allow more than max_removals")
    p.add_argument("--detailed-exitcode", action="store_true",
                   help="exit 2 when changes were made and the node converged")  # fmt: skip
    p.add_argument("--refresh", action="store_true", help="check every model upstream for updates")
    p.add_argument("-v", "--verbose", action="store_true", help="progress lines with speed")

    p = command("status", "desired vs installed vs loaded vs advertised")
    p.add_argument("--json", action="store_true")

    model = command("model", "list, install or remove one model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="installed and desired models")
    _common(p, top=False)
    p.add_argument("--json", action="store_true")
    p = msub.add_parser("install", help="add NAME to the file and apply")
    _common(p, top=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--backend", choices=["ollama", "llamacpp", "vllm", "sglang", "max"])
    p.add_argument("--pin", action="store_true", help="keep it loaded (keep_alive: forever)")
    p.add_argument("--verbose", "-v", action="store_true", help="progress: percent, GB, speed")
    p.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    p = msub.add_parser("remove", help="remove NAME from the file, withdraw it, delete it")
    _common(p, top=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--backend", choices=["ollama", "llamacpp", "vllm", "sglang", "max"])
    p.add_argument("--json", action="store_true", help="JSON lines of events on stdout")

    p = command("watch", "the daemon: reconcile on every change of the file and on drift")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="log lines on stderr as text or JSON lines")  # fmt: skip
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (:PORT alone = "
                        "127.0.0.1; 0.0.0.0:PORT for every interface)")  # fmt: skip
    p.add_argument("--tick", type=float, metavar="SECONDS",
                   help="drift check / heartbeat / command poll period (default: "
                   "control_plane.heartbeat_interval, else 30)")  # fmt: skip
    p.add_argument("--once", action="store_true",
                   help="one reconcile and one tick (heartbeat, commands), then exit")  # fmt: skip

    command("schema", "print the JSON Schema of infernet.yaml")
    p = command("keygen", "make this node's BIP-340 key (mode 0600); print its public key")
    p.add_argument("--out", metavar="FILE",
                   help="where to write it (default: control_plane.key_file, else "
                   "~/.config/infernet/node.key)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing key")
    return parser


# --------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Desired:
    from reconciler import desired

    return desired.load(desired.locate(args.config))


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir:
        return Path(args.state_dir).expanduser()
    from state import default_state_dir

    return default_state_dir()


def _session(args: argparse.Namespace, the_desired: Desired) -> Session:
    from reconciler.session import Session

    return Session.open(the_desired, _state_dir(args))


def _lock(args: argparse.Namespace, purpose: str) -> NodeLock:
    """The node lock, held. Writers take it before they read the file: one that waited for
    another writer then reads (and edits, plans, applies) what that writer left, never a
    version from before it."""
    from reconciler.session import node_lock

    return node_lock(_state_dir(args), purpose)


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        raise PlanError(
            "refusing to apply without confirmation: stdin is not a terminal; pass --yes"
        )
    answer = input(f"{prompt} Only 'yes' will be accepted: ")
    return answer.strip() == "yes"


def _emit_plan(plan: Plan, args: argparse.Namespace) -> None:
    from reconciler import render

    if getattr(args, "json", False):
        from reconciler.plandoc import to_document

        render.print_json(to_document(plan))
    else:
        print(render.render_plan(plan, verbose=getattr(args, "verbose", False)), flush=True)


# --------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    """validate: every problem on its own line; exit 0 or 1."""
    from reconciler import desired

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
    from reconciler import desired

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
        from reconciler.plandoc import write_document

        write_document(plan, Path(args.out))
        print(f"Saved the plan to {args.out}; apply it with: infernet apply {args.out}",
              file=sys.stderr)  # fmt: skip
    if plan.errors:
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and plan.actions else EXIT_OK


def _saved_plan(args: argparse.Namespace) -> tuple[Desired, Plan]:
    """A plan saved by ``plan --out`` and the file it was made from (which must not have moved)."""
    from reconciler import desired
    from reconciler.plandoc import read_document, with_sources

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
    from reconciler import render
    from reconciler.session import summary

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
            _err(f"{outcome.action.op.value} {outcome.action.model}: {outcome.error}")
        return EXIT_ERROR
    if not result.converged:
        drift = result.final.actions if result.final else ()
        _err("applied, but the node has not converged: "
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
    from reconciler import desired, render
    from reconciler.session import load_or_last_valid
    from reconciler.status import build_status, render_status

    # A deleted -c file is exactly when status must still answer from the last valid version.
    path = Path(args.config) if args.config else desired.locate(None)
    the_desired, config_error = load_or_last_valid(path, _state_dir(args))
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
    from reconciler import render
    from reconciler.status import model_rows

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
    """``--backend``, else the backend of the file's entry NAME refers to, else what the name
    looks like (a ``*.gguf`` file is llama.cpp's), else the file's default."""
    from reconciler.configedit import refers_to
    from reconciler.model import BackendKind

    if given:
        return BackendKind(given)
    for spec in current.models:
        if refers_to(spec, name):
            return spec.backend
    if name.endswith(".gguf"):
        return BackendKind.LLAMACPP
    return current.default_backend


def _model_edit(args: argparse.Namespace) -> int:
    """model install | remove: lock, read, edit, apply; a failed install leaves the file as
    it was, byte for byte."""
    from reconciler import desired

    path = desired.locate(args.config)
    with _lock(args, f"model {args.model_command}"):
        current = desired.load(path)
        if args.model_command == "install":
            return _install(args, path, current)
        return _remove(args, path, current)


def _install(args: argparse.Namespace, path: Path, current: Desired) -> int:
    from reconciler import configedit, desired
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
    from reconciler._files import write_atomically

    try:
        if path.read_bytes() == after:
            write_atomically(path, before)
            print(f"Restored {path} as it was before the install of {name}.", file=sys.stderr)
            return
    except OSError as exc:
        _err(f"could not restore {path} after the failed install of {name}: {exc}")
        return
    _err(f"{path} was changed by someone else during the install of {name}; left as it is "
         f"(take {name} out of it if it is still listed)")  # fmt: skip


def _remove(args: argparse.Namespace, path: Path, current: Desired) -> int:
    from reconciler import configedit, desired, names
    from reconciler.model import BackendKind

    only = BackendKind(args.backend) if args.backend else None
    matched = [m for m in current.models if configedit.refers_to(m, args.name, only)]
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
    from reconciler import desired, logs
    from reconciler.daemon import Daemon
    from reconciler.metrics import Metrics

    logs.setup(args.log_format, args.log_level)
    path = desired.locate(args.config)
    metrics = Metrics.start(args.metrics_addr) if args.metrics_addr else Metrics.disabled()
    if metrics.address is not None:
        host, port = metrics.address
        logging.getLogger("infernet.daemon").info(
            "metrics at http://%s:%d/metrics", host, port, extra={"port": port}
        )
    return Daemon(path, _state_dir(args), metrics=metrics, once=args.once, tick=args.tick).run()


def cmd_keygen(args: argparse.Namespace) -> int:
    """keygen: write a node key; the x-only public key alone on the last line."""
    from reconciler.identity import generate_key
    from reconciler.model import DEFAULT_KEY_FILE

    target = args.out
    if target is None:
        target = DEFAULT_KEY_FILE
        if args.config or os.environ.get("INFERNET_CONFIG") or Path("infernet.yaml").exists():
            from reconciler import desired

            the_desired = desired.load(desired.locate(args.config))
            if the_desired.control_plane is not None:
                target = the_desired.control_plane.key_file
    path = Path(target).expanduser()
    pubkey = generate_key(path, force=args.force)
    print(f"Wrote the node key to {path} (mode 0600). Public key:", file=sys.stderr)
    print(pubkey)
    return EXIT_OK


COMMANDS = {
    "validate": cmd_validate, "schema": cmd_schema, "plan": cmd_plan, "apply": cmd_apply,
    "status": cmd_status, "model": cmd_model, "keygen": cmd_keygen,
    "watch": cmd_watch,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``infernet`` console script."""
    args = build_parser().parse_args(argv)
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
            _err(str(exc))
            return EXIT_ERROR
        except KeyboardInterrupt:
            _err("interrupted; the next apply resumes where this one stopped")
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
    target = crash_report(_state_dir(args), text)
    where = f"; details in {target}" if target is not None else ""
    sys.stderr.write(text)
    _err(f"internal error in '{args.command}'{where}; please report it with that file")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
