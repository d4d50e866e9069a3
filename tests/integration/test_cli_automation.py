"""Issue 16, automation: exit codes, usage errors, the bare command, shell completion,
``validate --json``, the daemon's heartbeat log lines, ``watch --once`` and saved plans — all
through the real ``infernet`` process, the Ollama-compatible test server and the control-plane
test server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import INFERNET, Node, keygen, needs_fake, verified_beats

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"


def _infernet(node: Node, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with exactly ``args`` (no -c added), from ``cwd``."""
    return subprocess.run(
        [INFERNET, *args],
        capture_output=True,
        text=True,
        env=node.env,
        cwd=cwd or node.tmp,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------- status exit codes


def test_status_exits_1_when_the_backend_is_down_and_never_says_no_drift(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    server.close()
    out = node.run("status")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "unreachable" in out.stderr and node.url in out.stderr
    assert "Drift: none" not in out.stdout
    assert "Drift: unknown (ollama unreachable)" in out.stdout
    as_json = node.run("status", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["converged"] is False


def test_status_detailed_exitcode_is_2_until_converged(node: Node) -> None:
    node.write_config([SMALL])
    plain = node.run("status")
    assert plain.returncode == 0, plain.stderr  # drift alone is not an error
    pending = node.run("status", "--detailed-exitcode", "--json")
    assert pending.returncode == 2, pending.stderr
    assert json.loads(pending.stdout)["converged"] is False
    assert node.run("apply", "--yes").returncode == 0
    done = node.run("status", "--detailed-exitcode", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["converged"] is True


def test_status_exits_1_while_the_file_is_invalid(node: Node) -> None:
    node.write_config([SMALL])
    assert node.run("apply", "--yes").returncode == 0
    node.config.write_text("served_models: [{name: x, keepalive: 1}]\n")
    out = node.run("status", "--detailed-exitcode")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "invalid" in out.stderr


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args",
    [
        ("plan", "--detailed-exitcode", "--jsn"),
        ("apply", "--detailed-exitcode", "--bogus"),
        ("status", "--detailed-exitcode", "extra"),
        ("frobnicate",),
        ("completion", "tcsh"),
    ],
)
def test_a_usage_error_never_exits_2(node: Node, args: tuple[str, ...]) -> None:
    node.write_config([SMALL])
    out = node.run(*args)
    assert out.returncode == 1, out.stderr
    assert "usage: infernet" in out.stderr and "error:" in out.stderr
    assert "Traceback" not in out.stderr


def test_bare_infernet_prints_the_help(node: Node) -> None:
    out = _infernet(node)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: infernet")
    for command in ("validate", "plan", "apply", "status", "completion"):
        assert command in out.stdout


# --------------------------------------------------------------------------- completion


_BASH_DRIVER = """
source "$1"
compopt() { :; }  # readline options mean nothing outside an interactive completion
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
_infernet
printf '%s\\n' "${COMPREPLY[@]}"
"""


def _bash_complete(node: Node, script: Path, *words: str) -> list[str]:
    out = subprocess.run(
        ["bash", "-c", _BASH_DRIVER, "driver", str(script), "infernet", *words],
        capture_output=True,
        text=True,
        env={**node.env, "PATH": f"{Path(INFERNET).parent}:{node.env.get('PATH', '')}"},
        cwd=node.tmp,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [w for w in out.stdout.splitlines() if w]


def test_bash_completion_of_commands_flags_choices_and_the_files_models(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    script = node.tmp / "infernet.bash"
    made = _infernet(node, "completion", "bash")
    assert made.returncode == 0, made.stderr
    script.write_text(made.stdout)
    assert _bash_complete(node, script, "mo") == ["model"]
    assert _bash_complete(node, script, "model", "re") == ["remove"]
    assert _bash_complete(node, script, "plan", "--det") == ["--detailed-exitcode"]
    assert _bash_complete(node, script, "status", "--det") == ["--detailed-exitcode"]
    assert _bash_complete(node, script, "watch", "--log-format", "") == ["text", "json"]
    assert _bash_complete(node, script, "completion", "") == ["bash", "zsh", "fish"]
    # Model names come from the file, the one -c names on the line being completed.
    config = str(node.config)
    assert _bash_complete(node, script, "model", "remove", "-c", config, "") == [SMALL, QWEN]
    assert _bash_complete(node, script, "-c", config, "model", "remove", "sm") == [SMALL]
    # readline replaces what follows the ':' only
    assert _bash_complete(node, script, "model", "remove", "-c", config, "qwen2.5:") == ["0.5b"]
    # ./infernet.yaml when no -c is given (the cwd is the node's folder)
    assert _bash_complete(node, script, "model", "remove", "") == [SMALL, QWEN]


def test_completion_models_is_silent_without_a_valid_file(node: Node) -> None:
    node.config.write_text("served_models: [{name: x, keepalive: 1}]\n")
    out = _infernet(node, "completion", "bash", "--models", "-c", str(node.config))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_of_commands_and_the_files_models(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    script = node.tmp / "infernet.fish"
    script.write_text(_infernet(node, "completion", "fish").stdout)

    def complete(line: str) -> list[str]:
        out = subprocess.run(
            ["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
            capture_output=True,
            text=True,
            env={**node.env, "PATH": f"{Path(INFERNET).parent}:{node.env.get('PATH', '')}"},
            cwd=node.tmp,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return [w.split("\t")[0] for w in out.stdout.splitlines()]

    assert "model" in complete("infernet mo")
    assert sorted(complete("infernet model remove ")) == sorted([SMALL, QWEN])
    other = node.tmp / "other.yaml"
    other.write_text(f"served_models: [{QWEN}]\n")
    assert complete(f"infernet model remove -c {other} ") == [QWEN]
    assert "--detailed-exitcode" in complete("infernet status --")


# zsh's completion widgets only run inside the line editor: stand-ins print what the function
# offers (the ``name:description`` pairs _describe gets, the words compadd gets).
_ZSH_DRIVER = """
compdef() { : }
_describe() { local -a pairs; pairs=( ${(P)${@[-1]}} ); print -l -- ${pairs%%:*} }
compadd() { [[ $1 == -- ]] && shift; print -l -- "$@" }
_files() { print -- '<files>' }
_directories() { print -- '<dirs>' }
_message() { : }
source "$1"
shift
words=( "$@" )
CURRENT=${#words}
_infernet
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_of_commands_flags_and_the_files_models(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    script = node.tmp / "_infernet"
    script.write_text(_infernet(node, "completion", "zsh").stdout)

    def complete(*words: str) -> list[str]:
        out = subprocess.run(
            ["zsh", "-f", "-c", _ZSH_DRIVER, "driver", str(script), "infernet", *words],
            capture_output=True,
            text=True,
            env={**node.env, "PATH": f"{Path(INFERNET).parent}:{node.env.get('PATH', '')}"},
            cwd=node.tmp,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert "model" in complete("")
    assert complete("model", "") == ["list", "install", "remove"]
    assert "--detailed-exitcode" in complete("status", "--")
    assert complete("watch", "--log-format", "") == ["text", "json"]
    assert complete("plan", "--out", "") == ["<files>"]
    assert complete("model", "remove", "-c", str(node.config), "") == [SMALL, QWEN]


@pytest.mark.parametrize("shell", ["zsh", "fish", "bash"])
def test_completion_scripts_are_valid_shell(node: Node, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    made = _infernet(node, "completion", shell)
    assert made.returncode == 0, made.stderr
    script = node.tmp / f"infernet.{shell}"
    script.write_text(made.stdout)
    check = subprocess.run(
        [shell, "--no-execute" if shell == "fish" else "-n", str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------- validate --json


def test_validate_json_valid_invalid_and_missing(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    good = node.run("validate", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == {
        "path": str(node.config),
        "valid": True,
        "served_models": 2,
        "errors": [],
    }
    node.config.write_text("served_models:\n  - name: x\n    keepalive: 1\n")
    bad = node.run("validate", "--json")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["valid"] is False
    assert doc["errors"][0]["file"] == str(node.config)
    assert doc["errors"][0]["line"] == 3 and doc["errors"][0]["column"] == 5
    assert "keep_alive" in doc["errors"][0]["message"]
    missing = _infernet(node, "validate", "--json", "-c", str(node.tmp / "nope.yaml"))
    assert missing.returncode == 1
    doc = json.loads(missing.stdout)
    assert doc["valid"] is False and doc["errors"][0]["line"] is None


# --------------------------------------------------------------------------- saved plans


def test_a_saved_plan_records_the_files_absolute_path(node: Node) -> None:
    node.write_config([SMALL])
    state = str(node.state)
    made = _infernet(node, "plan", "-c", "infernet.yaml", "--state-dir", state, "--out", "p.json")
    assert made.returncode == 0, made.stderr
    saved = json.loads((node.tmp / "p.json").read_text())
    assert saved["config"]["path"] == str(node.config)
    elsewhere = node.tmp / "elsewhere"
    elsewhere.mkdir()
    out = _infernet(
        node, "apply", str(node.tmp / "p.json"), "--yes", "--state-dir", state, cwd=elsewhere
    )
    assert out.returncode == 0, out.stderr
    assert SMALL in node.installed()


# --------------------------------------------------------------------------- the daemon


def _control_plane(node: Node, cp: Any) -> None:
    keygen(node)
    node.write_config(
        [SMALL],
        control_plane={
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "heartbeat_interval": "1s",
        },
    )


def test_watch_once_sends_no_offline_heartbeat(node: Node, cp: Any) -> None:
    _control_plane(node, cp)
    out = node.run("watch", "--once")
    assert out.returncode == 0, out.stderr
    beats = [r for r in cp.received() if r["path"] == "/api/v1/node/heartbeat"]
    assert verified_beats(cp), "the run's own heartbeat"
    assert all(b["body"].get("status") != "offline" for b in beats), beats[-1]["body"]


def _heartbeat_lines(node: Node, cp: Any, level: str) -> tuple[int, list[dict[str, Any]]]:
    """Run the daemon at ``level`` until it has sent 5 more heartbeats; its heartbeat lines."""
    log = node.tmp / f"watch-{level}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [
                *(INFERNET, "watch", "-c", str(node.config), "--state-dir", str(node.state)),
                *("--tick", "1", "--log-format", "json", "--log-level", level),
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=node.env,
            stdin=subprocess.DEVNULL,
        )
        try:
            before = len(verified_beats(cp))
            deadline = time.monotonic() + 40
            while len(verified_beats(cp)) < before + 6 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    sent = len(verified_beats(cp)) - before
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return sent, [x for x in lines if str(x.get("msg", "")).startswith("heartbeat:")]


def test_routine_heartbeats_are_logged_at_debug(node: Node, cp: Any) -> None:
    _control_plane(node, cp)
    assert node.run("apply", "--yes").returncode == 0
    sent, shown = _heartbeat_lines(node, cp, "info")
    assert sent >= 5
    # The first beat says something new (the daemon's first); the ones repeating it don't.
    assert len(shown) <= 2, shown
    sent, shown = _heartbeat_lines(node, cp, "debug")
    assert sent >= 5
    assert sum(1 for x in shown if x["level"] == "debug") >= 3, shown
