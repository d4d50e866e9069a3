"""Issue 16, automation: what ``status`` exits on, and the command tree completion is made from
(pure logic, data tables)."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.cli.completion import commands, script
from reconciler.cli.parser import EXIT_USAGE, build_parser
from reconciler.cli.status import verdict

UP = {"url": "http://127.0.0.1:11434", "reachable": True, "error": None, "used": True}
DOWN = {**UP, "reachable": False, "error": "connection refused"}


def _doc(**parts: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "backends": {"ollama": UP},
        "drift": [],
        "errors": [],
        "untested": [],
        "unserved": [],
        "config_error": None,
    }
    doc.update(parts)
    return doc


PULL = {"op": "pull", "model": "qwen2.5:14b", "revision": None, "reason": "not installed"}

# (case, document parts, errors expected?, pending expected)
CASES = [
    ("converged", {}, False, []),
    ("used backend down", {"backends": {"ollama": DOWN}}, True, []),
    (
        "unused backend down",
        {"backends": {"ollama": UP, "vllm": {**DOWN, "used": False}}},
        False,
        [],
    ),
    (
        "router down: models readable, nothing served",
        {"backends": {"llamacpp": {**UP, "serving_error": "router down"}}},
        True,
        [],
    ),
    ("file invalid now", {"config_error": "infernet.yaml:1:1: bad"}, True, []),
    ("plan refused", {"errors": ["does not fit"]}, True, []),
    ("drift", {"drift": [PULL]}, False, ["pull qwen2.5:14b"]),
    ("canary pending", {"untested": ["a:1b"]}, False, ["untested a:1b"]),
    (
        "installed, not advertised",
        {"unserved": ["a:1b: failed canary"]},
        False,
        ["a:1b: failed canary"],
    ),
]


@pytest.mark.parametrize(("case", "parts", "error", "pending"), CASES, ids=[c[0] for c in CASES])
def test_status_verdict(case: str, parts: dict[str, Any], error: bool, pending: list[str]) -> None:
    errors, waiting = verdict(_doc(**parts))
    assert bool(errors) is error, case
    assert waiting == pending, case


def test_a_usage_error_exits_with_the_error_code_never_changes() -> None:
    assert EXIT_USAGE == 1
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["plan", "--detailed-exitcode", "--jsn"])
    assert stopped.value.code == EXIT_USAGE


def test_the_completion_tree_is_the_parsers() -> None:
    tree = {c.path: c for c in commands(build_parser())}
    assert {"", "plan", "status", "model", "model remove", "completion"} <= set(tree)
    assert {"list", "install", "remove"} <= set(tree["model"].subcommands)
    assert tree["model remove"].positional == "models"
    assert tree["model install"].positional is None  # a name to install is not in the file
    assert tree["apply"].positional == "file"
    assert tree["completion"].choices == ("bash", "zsh", "fish")
    status_flags = {f for o in tree["status"].options for f in o.flags}
    assert "--detailed-exitcode" in status_flags
    assert "--models" not in {f for o in tree["completion"].options for f in o.flags}
    out = {o.flags: o for o in tree["plan"].options}
    assert out[("--out",)].value == "file"
    assert out[("--detailed-exitcode",)].value is None


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_every_command_is_in_every_script(shell: str) -> None:
    text = script(build_parser(), shell)
    for path in (c.path for c in commands(build_parser())):
        assert path.rpartition(" ")[2] in text


def test_a_backend_error_the_plan_repeats_is_said_once() -> None:
    errors, _ = verdict(_doc(backends={"ollama": DOWN}, errors=["connection refused", "other"]))
    assert errors == ["backend ollama unreachable: connection refused", "other"]
