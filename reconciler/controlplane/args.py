"""The arguments of remote commands, checked strictly before anything reaches a backend.

The dashboard sends free text (trimmed, 1–256 characters, nothing more is checked there), and
the name ends up in a file we edit, in backend API paths and in the heartbeat. So on top of
each backend's grammar (``names.is_valid``) every name must be a string of at most 200
characters (the heartbeat's limit) with no whitespace, control or invisible characters, and
nothing that reads as a file path (``/x``, ``~/x``, ``..``, backslashes). An Ollama name to
install names no URL scheme and no registry host but the configured one (or one the file
already pulls from): the node fetches that host's manifest, so a dashboard must not be able
to point it at any URL it can reach (the Ollama driver's ``remote_install_problem``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from reconciler import names
from reconciler.errors import one_line
from reconciler.limits import MAX_MODEL_NAME, SHOWN_NAME
from reconciler.model import BackendKind

NO_HF = "HuggingFace models need the vllm backend, which this node doesn't run yet"
_ABOUT_A_COMMAND = ("id", "type", "issued_at", "status")
"""The flat shape's keys that say which command it is, not what it does."""


def command_of(row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The verb and arguments of a polled command, in either shape it comes in: the control
    plane's ``{id, command, args}``, or the seed's flat ``{id, type, model, hf?, issued_at}``,
    whose other keys are the arguments. Both then meet the same checks: nothing here
    validates, it only finds the fields."""
    if "command" in row or "type" not in row:
        verb: object = row.get("command", "")
        args = row.get("args")
    else:
        verb = row["type"]
        args = row.get("args")
        if not isinstance(args, dict):
            args = {k: v for k, v in row.items() if k not in _ABOUT_A_COMMAND}
    return str(verb), args if isinstance(args, dict) else {}


def name_problem(value: object, *, field: str = "model") -> str | None:
    """Why ``args.<field>`` can't be a model name on any backend, or None.

    These are the checks every backend shares (and the heartbeat's 200-character limit);
    each backend's own grammar (``names.is_valid``) comes on top.
    """
    if not isinstance(value, str):
        return f"args.{field} must be a model name (a string), not {type(value).__name__}"
    if not value:
        return f"args.{field} is empty; send the model name to use"
    if len(value) > MAX_MODEL_NAME:
        most = MAX_MODEL_NAME
        return f"args.{field} is {len(value)} characters long; model names have at most {most}"
    shown = one_line(value, SHOWN_NAME, mark="")
    if any(c.isspace() for c in value):
        return f"args.{field} '{shown}' contains whitespace; model names have none"
    if any(unicodedata.category(c).startswith("C") for c in value):
        return f"args.{field} {value!r:.80} contains a control or invisible character"
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "~")) or "\\" in value or any(p in (".", "..") for p in parts):
        return f"args.{field} '{shown}' looks like a file path, not a model name"
    return None


def model_problem(value: object, backend: BackendKind) -> str | None:
    """Why ``value`` can't be installed on ``backend``, or None (shared checks + grammar)."""
    problem = name_problem(value)
    if problem is None:
        assert isinstance(value, str)
        problem = names.is_valid(backend, value)
    return problem
