"""The command line itself: flags before or after the command, the schema it prints, and the
confirmation ``apply`` asks for on a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess

from tests.integration.conftest import INFERNET, Node

SMALL = "smollm2:135m"


def test_flags_before_or_after_the_command(node: Node) -> None:
    node.write_config([SMALL])
    before = subprocess.run(
        [INFERNET, "-c", str(node.config), "--state-dir", str(node.state), "plan", "--json"],
        capture_output=True,
        text=True,
        env=node.env,
        check=False,
    )
    after = node.run("plan", "--json")
    assert before.returncode == after.returncode == 0, before.stderr
    assert json.loads(before.stdout)["actions"] == json.loads(after.stdout)["actions"]


def test_schema_command_prints_the_shipped_schema(node: Node) -> None:
    out = node.run("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    assert "served_models" in schema["properties"]


def test_apply_asks_on_a_terminal(node: Node) -> None:
    node.write_config([SMALL])
    for answer, code, installed in ((b"no\n", 1, False), (b"yes\n", 0, True)):
        primary, secondary = pty.openpty()
        proc = subprocess.Popen(
            [INFERNET, "apply", "-c", str(node.config), "--state-dir", str(node.state)],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=node.env,
            close_fds=True,
        )
        os.close(secondary)
        seen = b""
        while b"Only 'yes' will be accepted" not in seen:
            ready, _, _ = select.select([primary], [], [], 30)
            assert ready, seen
            seen += os.read(primary, 4096)
        os.write(primary, answer)
        while True:  # drain until the child closes the terminal
            ready, _, _ = select.select([primary], [], [], 30)
            try:
                chunk = os.read(primary, 4096) if ready else b""
            except OSError:
                break
            if not chunk:
                break
        assert proc.wait(timeout=30) == code
        os.close(primary)
        assert (SMALL in node.installed()) is installed
