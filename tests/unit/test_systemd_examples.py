"""The systemd units in examples/systemd: the settings they promise, and flags the CLI has."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from reconciler.cli.parser import build_parser
from reconciler.daemon import logs

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "examples" / "systemd"
WATCH, GITPULL, TIMER = (
    "infernet-watch.service",
    "infernet-gitpull.service",
    "infernet-gitpull.timer",
)
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
}


def unit(name: str) -> configparser.ConfigParser:
    # systemd's syntax is INI-like but not Python's: no interpolation ($MAINPID), repeatable
    # keys (strict=False), and case-sensitive keys (optionxform).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text(), source=name)
    return parser


def words(value: str) -> set[str]:
    return set(value.split())


def test_watch_service_settings() -> None:
    u = unit(WATCH)
    assert words(u["Unit"]["After"]) >= {"network-online.target", "ollama.service"}
    assert "network-online.target" in words(u["Unit"]["Wants"])
    service = u["Service"]
    expected = {
        "ExecStart": "/usr/local/bin/infernet watch -c /etc/infernet/infernet.yaml "
        "--log-format json",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "RestartSec": "5",
        "TimeoutStopSec": "90",
        "KillSignal": "SIGTERM",
        "StateDirectory": "infernet",
        "Environment": "INFERNET_STATE_DIR=/var/lib/infernet",
    } | HARDENING
    assert {k: service.get(k) for k in expected} == expected
    assert words(service["ReadWritePaths"]) == {"/etc/infernet", "/var/lib/infernet"}
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_watch_service_leaves_out_memory_deny_write_execute_and_says_why() -> None:
    assert "MemoryDenyWriteExecute" not in unit(WATCH)["Service"]
    comments = "\n".join(
        line for line in (UNITS / WATCH).read_text().splitlines() if line.startswith("#")
    )
    assert "MemoryDenyWriteExecute" in comments
    assert "cffi" in comments and "coincurve" in comments


def test_watch_exec_start_is_a_command_line_the_cli_accepts() -> None:
    argv = shlex.split(unit(WATCH)["Service"]["ExecStart"])
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert Path(argv[0]).name in pyproject["project"]["scripts"]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:  # argparse has printed why on stderr
        pytest.fail(f"infernet does not accept the unit's command line: {argv[1:]}")
    assert args.command == "watch"
    assert args.config == "/etc/infernet/infernet.yaml"
    assert args.log_format == "json"
    assert args.log_format in logs.FORMATS


def test_gitpull_service_is_a_fast_forward_only_oneshot() -> None:
    u = unit(GITPULL)
    service = u["Service"]
    assert service["Type"] == "oneshot"
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "git"
    assert argv[1:5] == ["-C", "/etc/infernet/repo", "pull", "--ff-only"]
    assert u["Unit"]["ConditionPathIsDirectory"] == "/etc/infernet/repo/.git"
    assert {k: service.get(k) for k in HARDENING} == HARDENING
    assert words(service["ReadWritePaths"]) == {"/etc/infernet/repo"}
    assert "Install" not in u  # started by the timer only


def test_gitpull_timer_runs_every_minute_with_a_random_delay() -> None:
    u = unit(TIMER)
    timer = u["Timer"]
    assert timer["OnCalendar"] in {"minutely", "*-*-* *:*:00", "*:*:00"}
    assert timer["RandomizedDelaySec"] == "15"
    assert timer["Unit"] == GITPULL
    assert u["Install"]["WantedBy"] == "timers.target"


def test_readme_walks_through_installing_and_verifying_every_unit() -> None:
    readme = (UNITS / "README.md").read_text()
    for name in (WATCH, GITPULL, TIMER):
        assert re.search(rf"systemd-analyze verify .*{re.escape(name)}", readme), name
        assert re.search(rf"install -m 0644 .*{re.escape(name)}", readme), name
    assert "systemctl enable --now infernet-watch.service" in readme
    assert "systemctl enable --now infernet-gitpull.timer" in readme
    assert "ln -s repo/nodes/" in readme


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not on PATH (no systemd here); the units were only parsed",
)
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify also checks that each Exec*= program exists and is executable; /usr/local/bin/
    # infernet is not installed on a test machine, so a missing program is swapped for a stub
    # in a copy of the unit. Every other line is verified as written.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    copies = []
    for name in (WATCH, GITPULL, TIMER):
        text = (UNITS / name).read_text()
        for program in set(re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", text, flags=re.MULTILINE)):
            if not os.access(program, os.X_OK):
                stub = stubs / Path(program).name
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
                text = text.replace(program, str(stub))
        copy = tmp_path / name
        copy.write_text(text)
        copies.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    # verify only warns (exit 0) about unknown keys or bad values, so its output must be clean
    # too; lines about other units on this machine are not ours to judge.
    ours = [line for line in output.splitlines() if any(n in line for n in (WATCH, GITPULL, TIMER))]
    assert done.returncode == 0, output
    assert ours == [], output
