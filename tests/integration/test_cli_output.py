"""What a person sees, through the real CLI (issue 16, items 1, 2 and 9): the seed's progress
lines (redrawn in place on a terminal, every few seconds when piped), sizes as ``ollama list``
prints them, ``--quiet``, and colour on a terminal only (``NO_COLOR``, ``--no-color``).

A terminal is a real pseudo-terminal (``pty``): the child sees a tty on stdout and stderr.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from reconciler.cli.progress import PIPE_INTERVAL
from reconciler.units import format_size
from tests.integration.conftest import INFERNET, Node

QWEN = "qwen2.5:0.5b"  # about 160 kB of weights in the test server's catalogue
SMALL = "smollm2:135m"
SIZE = r"\d+(\.\d)? [KMG]?B"
SEED_LINE = re.compile(rf"^[█░]{{20}} \d{{1,3}}% \({SIZE} / {SIZE}\)( {SIZE}/s)?$")
GREEN_PLUS = re.compile(r"\x1b\[[0-9;]*32m\+")
ESCAPE = "\x1b["


def _env(node: Node, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in node.env.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update({"TERM": "xterm-256color", **extra})
    return env


def in_terminal(
    node: Node, *args: str, env: dict[str, str] | None = None, answer: bytes | None = None
) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (160 columns) as its stdout and stderr, and as its
    stdin when there is a question to ``answer`` (typed once the prompt is shown)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [INFERNET, *args, "-c", str(node.config), "--state-dir", str(node.state)],
        stdin=slave if answer is not None else subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env or _env(node),
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                break
            if not data:
                break
            chunks.append(data)
            if answer is not None and b"Only 'yes' will be accepted" in b"".join(chunks):
                os.write(master, answer)
                answer = None
        else:
            proc.kill()
            raise AssertionError("the CLI did not finish within 60 s")
    finally:
        os.close(master)
    return proc.wait(timeout=10), b"".join(chunks).decode("utf-8", "replace")


def uncoloured(text: str) -> str:
    """``text`` without its escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def piped(node: Node, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INFERNET, *args, "-c", str(node.config), "--state-dir", str(node.state)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(node, **extra),
        stdin=subprocess.DEVNULL,
        check=False,
    )


# ---- item 1: the seed's progress lines


def test_verbose_install_piped_prints_the_seeds_lines_every_few_seconds(node: Node) -> None:
    node.throttle(30_000)  # 160 kB at 30 kB/s: 5 to 6 s of download
    node.write_config([], policy={"allow_empty": True})  # one download: the seed's lines alone
    with subprocess.Popen(
        [
            INFERNET,
            "model",
            "install",
            QWEN,
            "--verbose",
            "-c",
            str(node.config),
            "--state-dir",
            str(node.state),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(node),
    ) as proc:
        assert proc.stderr is not None
        # When each line arrives: the test reads the pipe as the lines are written.
        timed = [(time.monotonic(), line.rstrip("\n")) for line in proc.stderr]
        assert proc.wait(timeout=60) == 0, timed
    lines = [line for _, line in timed]
    assert lines[0] == f"Pulling {QWEN} from Ollama registry...", lines
    bars = [(at, line) for at, line in timed if line.startswith(("█", "░"))]
    assert len(bars) >= 2, lines  # at least one line while it moves, and the last one
    assert all(SEED_LINE.match(line) for _, line in bars), bars
    assert re.search(r" 100% \((\S+ [KMG]?B) / \1\) \S+ [KMG]?B/s$", bars[-1][1]), bars
    moving = [at for at, line in bars if " 100% " not in line]
    # Piped, a line every few seconds: never two lines of one download closer than that.
    gaps = [b - a for a, b in itertools.pairwise(moving)]
    assert all(gap > PIPE_INTERVAL - 0.5 for gap in gaps), gaps
    assert len(bars) <= 8 / PIPE_INTERVAL + 2, bars
    assert f"pull {QWEN}: ok" in lines
    assert QWEN in node.installed()


def test_install_on_a_terminal_redraws_one_progress_line_in_place(node: Node) -> None:
    node.throttle(60_000)  # about 3 s: a dozen redraws at rich's four a second
    node.write_config([], policy={"allow_empty": True})
    code, out = in_terminal(node, "model", "install", QWEN, "--verbose")
    assert code == 0, out
    assert f"Pulling {QWEN} from Ollama registry..." in out
    assert "\x1b[2K" in out  # the live line is erased and drawn again, not appended
    shown = set(re.findall(r"[█░]{20} (\d{1,3})% \(", out))
    assert len(shown) >= 2 and "100" in shown, shown  # it moved, and ended at 100%
    assert re.search(r"100% \((\S+ [KMG]?B) / \1\) \S+ [KMG]?B/s", out), out


def test_parallel_downloads_on_a_terminal_each_get_a_named_line(node: Node) -> None:
    node.throttle(60_000)
    node.write_config([SMALL])  # not installed yet: the install pulls both at once
    code, out = in_terminal(node, "model", "install", QWEN)
    assert code == 0, out  # one download ending while the other runs once crashed the display
    text = uncoloured(out)
    assert f"Pulling {SMALL} from Ollama registry..." in text
    assert f"Pulling {QWEN} from Ollama registry..." in text
    assert re.search(rf"\d% \([^)]*\)( \S+ [KMG]?B/s)?  {re.escape(QWEN)}", text), text
    assert f"pull {SMALL}: ok" in text and f"pull {QWEN}: ok" in text
    assert {SMALL, QWEN} <= node.installed()


# ---- item 2: sizes as `ollama list` prints them; VRAM in GiB; exact bytes in JSON


def test_sizes_are_decimal_vram_binary_json_exact(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    doc = json.loads(piped(node, "plan", "--json").stdout)
    pulls = {a["model"]: a["download_bytes"] for a in doc["actions"]}
    assert isinstance(pulls[QWEN], int) and pulls[QWEN] > 100_000  # exact bytes, not text
    text = piped(node, "plan").stdout
    row = next(line for line in text.splitlines() if QWEN in line)
    assert f"{format_size(pulls[QWEN])} to download" in row, row
    disk = next(line for line in text.splitlines() if line.startswith("Disk:"))
    assert "iB" not in disk, disk  # downloads and free disk: decimal
    vram_line = next(line for line in text.splitlines() if line.startswith("VRAM ["))
    assert "of 24.0 GiB" in vram_line, vram_line  # VRAM: binary, as GPUs are sold

    assert piped(node, "apply", "--yes").returncode == 0
    listed = json.loads(piped(node, "model", "list", "--json").stdout)["models"]
    size = next(m["size"] for m in listed if m["model"] == QWEN)
    assert isinstance(size, int) and size > 0
    table = piped(node, "model", "list").stdout
    row = next(line for line in table.splitlines() if line.startswith(QWEN))
    assert format_size(size) in row and "iB" not in row, row
    status = piped(node, "status").stdout
    row = next(line for line in status.splitlines() if line.startswith(QWEN))
    assert format_size(size) in row and "iB" not in row, row


# ---- item 9: --quiet, colour


def test_quiet_prints_only_errors(node: Node) -> None:
    node.write_config([SMALL])
    out = piped(node, "plan", "--quiet", "--detailed-exitcode")
    assert (out.returncode, out.stdout, out.stderr) == (2, "", "")
    out = piped(node, "-q", "apply", "--yes")
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert SMALL in node.installed()
    out = piped(node, "status", "-q")
    assert (out.stdout, out.stderr) == ("", "")
    # --json is asked for: it is printed whatever --quiet says
    assert json.loads(piped(node, "plan", "-q", "--json").stdout)["actions"] == []
    # an error is still said, in one line
    node.write_config(["nosuchmodel:1b"])
    out = piped(node, "plan", "-q")
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.startswith("error: ") and "nosuchmodel:1b" in out.stderr, out.stderr


def test_quiet_apply_still_shows_the_plan_it_asks_about(node: Node) -> None:
    node.write_config([SMALL])
    code, out = in_terminal(node, "apply", "-q", answer=b"no\n")
    assert code == 1, out
    assert "Plan for " in uncoloured(out) and "\n+  pull " in uncoloured(out), out
    assert SMALL not in node.installed()


def test_plan_is_coloured_on_a_terminal_and_plain_when_piped(node: Node) -> None:
    node.write_config([SMALL])
    code, out = in_terminal(node, "plan")
    assert code == 0, out
    assert GREEN_PLUS.search(out), repr(out)  # "+" green, as Terraform draws a create
    plain = piped(node, "plan")
    assert plain.returncode == 0 and plain.stdout.startswith("Plan for ")
    assert ESCAPE not in plain.stdout + plain.stderr
    assert "\n+  pull " in plain.stdout


def test_no_color_and_dash_dash_no_color_turn_colour_off(node: Node) -> None:
    node.write_config([SMALL])
    code, out = in_terminal(node, "plan", env=_env(node, NO_COLOR="1"))
    assert code == 0 and "+  pull " in out and ESCAPE not in out, repr(out)
    code, out = in_terminal(node, "plan", "--no-color")
    assert code == 0 and "+  pull " in out and ESCAPE not in out, repr(out)
