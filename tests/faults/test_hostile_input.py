"""The CLI never dies on what it is fed.

* a file nested thousands of levels deep (flow, block, aliases) is one more invalid file: a
  ``FILE:LINE:COL: message`` line per problem, exit 1, no traceback, no crash report;
* a reader that goes away (``infernet plan | head -1``) ends the command quietly with the
  status SIGPIPE gives any tool (141), no traceback and no crash report;
* a crash report (a real bug) goes to a new 0600 file in the state dir, not to a fixed name in
  the shared temp folder;
* random bytes inside stored rows of the state database: the store is set aside like a damaged
  file, every model counts as unmanaged (nothing is pruned) and the node carries on.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import installed, run_cli, status, write_config
from tests.integration.conftest import INFERNET, Node

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"
ONE_LINE = re.compile(r"^\S+:\d+:\d+: \S.*$")


def _aliases(levels: int) -> str:
    lines = ["served_models: [a]", "x0: &a0 [1]"]
    lines += [f"x{i}: &a{i} [*a{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


DEEP = {
    "flow-unclosed": "backends:\n" + "[" * 2000 + "\n",  # the 4 KB file
    "flow-closed": "backends: " + "[" * 2000 + "]" * 2000 + "\n",
    "flow-mappings": "backends: " + "{a: " * 2000 + "\n",
    "block-lists": "served_models: [a]\nbackends:\n" + "- " * 2000 + "x\n",
    "block-mappings": "served_models: [a]\n" + "".join(" " * i + "a:\n" for i in range(1200)),
    "aliases": _aliases(200),
}


def _crash_files(*folders: Path) -> list[Path]:
    found: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            found += [p for p in folder.rglob("*") if "crash" in p.name]
    return found


@pytest.mark.parametrize("shape", sorted(DEEP))
def test_deep_nesting_is_a_one_line_error_never_a_crash(fnode: Node, shape: str) -> None:
    tmp = fnode.tmp / "tmpdir"
    tmp.mkdir()
    fnode.env["TMPDIR"] = str(tmp)
    fnode.config.write_text(DEEP[shape])
    for args in (("validate",), ("plan",), ("apply", "--yes"), ("status",), ("model", "list")):
        out = fnode.run(*args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr, out.stderr
        lines = out.stderr.splitlines()
        assert lines and all(ONE_LINE.match(line) for line in lines), (args, lines)
        assert any("nested more than 32 levels" in line for line in lines), (args, lines)
        assert all(line.startswith(str(fnode.config)) for line in lines), lines
    assert _crash_files(tmp, fnode.state) == []


# ------------------------------------------------------------------------ a reader that goes away


@pytest.mark.parametrize(
    "args",
    [
        ("plan",),
        ("plan", "--json"),
        ("status",),
        ("status", "--json"),
        ("schema",),
        ("validate",),
        ("model", "list"),
    ],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(fnode: Node, args: tuple[str]) -> None:
    tmp = fnode.tmp / "tmpdir"
    tmp.mkdir()
    fnode.env["TMPDIR"] = str(tmp)
    write_config(fnode, [SMALL])
    assert run_cli(fnode, "apply", "--yes").returncode == 0
    proc = subprocess.Popen(
        [INFERNET, *args, "-c", str(fnode.config), "--state-dir", str(fnode.state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=fnode.env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first byte is written
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 141, err
    assert err == ""
    assert _crash_files(tmp, fnode.state) == []


def test_infernet_plan_piped_into_a_reader_that_exits_at_once(fnode: Node) -> None:
    tmp = fnode.tmp / "tmpdir"
    tmp.mkdir()
    fnode.env["TMPDIR"] = str(tmp)
    write_config(fnode, [SMALL, QWEN])
    plan = f"{INFERNET} plan -c {fnode.config} --state-dir {fnode.state}"
    # `true` exits without reading: the pipe is closed long before infernet has imported.
    out = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {plan} 2>{fnode.tmp / 'err'} | true"],
        env=fnode.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 141, (fnode.tmp / "err").read_text()
    assert (fnode.tmp / "err").read_text() == ""
    assert _crash_files(tmp, fnode.state) == []


# --------------------------------------------------------------------------- a crash report

_BUG = """\
import sys
from reconciler import cli

def bug(_args):
    raise ZeroDivisionError("a bug in infernet")

cli.COMMANDS["validate"] = bug
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_crash_report_is_a_new_private_file_in_the_state_dir(fnode: Node) -> None:
    tmp = fnode.tmp / "tmpdir"
    tmp.mkdir()
    fnode.env["TMPDIR"] = str(tmp)
    fnode.state.mkdir(mode=0o755)
    fnode.state.chmod(0o755)
    write_config(fnode, [SMALL])
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _BUG,
            "validate",
            "-c",
            str(fnode.config),
            "--state-dir",
            str(fnode.state),
        ],
        env=fnode.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "ZeroDivisionError: a bug in infernet" in out.stderr
    reports = _crash_files(fnode.state)
    assert len(reports) == 1, out.stderr
    report = reports[0]
    assert f"details in {report};" in out.stderr
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert "ZeroDivisionError" in report.read_text()
    assert list(tmp.iterdir()) == []  # nothing in the shared temp folder


# --------------------------------------------------------------------------- damaged rows

GARBAGE = bytes([0xFF, 0xFE, 0xC3, 0x28, 0x80]) * 20


def _damage_rows(state: Path) -> None:
    conn = sqlite3.connect(state / "state.db", isolation_level=None)
    try:
        for table, column in (("owned", "name"), ("status", "value"), ("cache", "value")):
            conn.execute(f"UPDATE {table} SET {column} = CAST(? AS TEXT)", (GARBAGE,))
    finally:
        conn.close()


def test_random_bytes_in_stored_rows_never_stop_the_node_nor_prune(fnode: Node) -> None:
    write_config(fnode, [SMALL], policy={"prune": "managed", "max_removals": 10})
    assert run_cli(fnode, "apply", "--yes").returncode == 0
    assert run_cli(fnode, "status").returncode == 0  # leaves status rows too
    _damage_rows(fnode.state)

    doc = status(fnode)  # exit 0, no traceback
    # Its canary's record went with the damaged database: tested again before it is advertised.
    assert SMALL in doc["untested"] and SMALL not in doc["advertised"]
    out = run_cli(fnode, "plan")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check the disk" not in out.stdout + out.stderr
    assert list(fnode.state.glob("state.db.corrupt-*")), "the damaged file is kept aside"

    # SMALL leaves the file: its ownership was unreadable, so it counts as unmanaged now,
    # and prune: managed must keep it.
    write_config(fnode, [QWEN], policy={"prune": "managed", "max_removals": 10})
    out = run_cli(fnode, "apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert {SMALL, QWEN} <= installed(fnode)
    again = run_cli(fnode, "plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout
    assert stat.S_IMODE(os.stat(fnode.state / "state.db").st_mode) == 0o600
