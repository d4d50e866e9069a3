"""The command line: every command, flag and choice of ``infernet``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import NoReturn

from reconciler import __version__

# A usage error exits with the contract's error code, never 2: under --detailed-exitcode 2
# means "changes", and a typo in a CI job must not read as a plan to apply.
EXIT_USAGE = 1


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors exiting ``EXIT_USAGE`` (sub-parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-c and --state-dir are accepted before or after the command name."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default,
        help="desired-state file (default: $INFERNET_CONFIG, ./infernet.yaml, "
        "/etc/infernet/infernet.yaml)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default,
        help="state directory (default: $INFERNET_STATE_DIR, XDG)",
    )
    flag = False if top else argparse.SUPPRESS
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=flag,
        help="print only errors (and the JSON asked for with --json); the exit code says the rest",
    )
    parser.add_argument(
        "--no-color",
        action="store_true",
        default=flag,
        help="no colour on a terminal (also: NO_COLOR=1; piped output never has colour)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(
        prog="infernet",
        description="Keep this node's model inventory exactly as infernet.yaml declares.",
    )
    parser.add_argument("--version", action="version", version=f"infernet {__version__}")
    _common(parser, top=True)
    # Not required: a bare ``infernet`` prints this help (``cli.main``).
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    kinds = _Kinds()

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        return p

    p = command("validate", "validate the file; print every error as FILE:LINE:COL: message")
    p.add_argument(
        "--json", action="store_true", help="print the verdict and every error as one JSON document"
    )
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
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 2 when changes were made and the node converged",
    )
    p.add_argument("--refresh", action="store_true", help="check every model upstream for updates")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="progress lines when piped too (on a terminal the line is always redrawn)",
    )

    p = command("status", "desired vs installed vs loaded vs advertised")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 2 when the node has drift or is not converged (1 stays an error)",
    )

    model = command("model", "list, install or remove one model")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = msub.add_parser("list", help="installed and desired models")
    _common(p, top=False)
    p.add_argument("--json", action="store_true")
    p = msub.add_parser("install", help="add NAME to the file and apply")
    _common(p, top=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--backend", choices=kinds, metavar="KIND", help=_KIND_HELP)
    p.add_argument("--pin", action="store_true", help="keep it loaded (keep_alive: forever)")
    p.add_argument(
        "--source",
        metavar="URL",
        help="where a llama.cpp file comes from: hf://org/repo/file.gguf, https://…, file://…",
    )
    p.add_argument("--sha256", metavar="HEX", help="the file's SHA-256; a mismatch is discarded")
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="progress lines when piped too: bar, percent, GB done / total, speed",
    )
    p.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    p = msub.add_parser("remove", help="remove NAME from the file, withdraw it, delete it")
    _common(p, top=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--backend", choices=kinds, metavar="KIND", help=_KIND_HELP)
    p.add_argument("--yes", "-y", action="store_true", help="don't ask for confirmation")
    p.add_argument("--json", action="store_true", help="JSON lines of events on stdout")

    p = command("watch", "the daemon: reconcile on every change of the file and on drift")
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines on stderr as text or JSON lines",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (:PORT alone = "
        "127.0.0.1; 0.0.0.0:PORT for every interface)",
    )
    p.add_argument(
        "--tick",
        type=float,
        metavar="SECONDS",
        help="drift check / heartbeat / command poll period (default: "
        "control_plane.heartbeat_interval, else 30)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="one reconcile and one tick (heartbeat, commands), then exit",
    )

    p = command("adopt", "mark installed models as managed, as if infernet had installed them")
    p.add_argument("names", nargs="+", metavar="NAME", help="models the file lists")
    p.add_argument("--backend", choices=kinds, metavar="KIND", help=_KIND_HELP)
    state = command("state", "what infernet believes it owns (list, show NAME, forget NAME)")
    ssub = state.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    p = ssub.add_parser("list", help="every model infernet manages")
    _common(p, top=False)
    p.add_argument("--json", action="store_true")
    for verb, text in (
        ("show", "what infernet knows of NAME"),
        ("forget", "stop managing NAME; its weights and the backend are not touched"),
    ):
        p = ssub.add_parser(verb, help=text, description=text)
        _common(p, top=False)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--backend", choices=kinds, metavar="KIND", help=_KIND_HELP)
        if verb == "show":
            p.add_argument("--json", action="store_true")

    command("schema", "print the JSON Schema of infernet.yaml")
    p = command("keygen", "make this node's BIP-340 key (mode 0600); print its public key")
    p.add_argument(
        "--out",
        metavar="FILE",
        help="where to write it (default: control_plane.key_file, else "
        "~/.config/infernet/node.key)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key")

    p = command("completion", "print a shell-completion script (bash, zsh or fish)")
    p.add_argument("shell", choices=["bash", "zsh", "fish"], metavar="SHELL", help="%(choices)s")
    # What the script itself calls to complete model names: the file's, one a line.
    p.add_argument("--models", action="store_true", help=argparse.SUPPRESS)
    return parser


_KIND_HELP = "the backend: %(choices)s"


class _Kinds:
    """The registry's backend kinds as ``--backend`` choices, read only when a choice is checked
    or help is printed: building the parser must not load the registry (``infernet plan``
    starts fast), so the usage line says ``KIND`` and the help lists them."""

    def _all(self) -> list[str]:
        from reconciler import backends

        return [k.value for k in backends.kinds()]

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())
