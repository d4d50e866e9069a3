"""The operator's commands through the real CLI (issue 16, area C), against the Ollama-compatible,
control-plane and llama.cpp test servers:

* ``model install NAME --source URL [--sha256 HEX]`` for llama.cpp files; flags that can't work
  and HuggingFace repo ids on an Ollama node are refused before the file is touched;
* a dashboard command in the seed's flat shape runs like ``{command, args}``, checks included;
* ``adopt`` and ``state list | show | forget`` edit what infernet owns, never the backend;
* ``model remove`` asks on a terminal (a pty here) and refuses off one without ``--yes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config import desired
from state import NodeLock, Store
from tests.integration.conftest import INFERNET, Node, keygen, needs_fake
from tests.integration.test_llamacpp import Llama
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.servers.hub_harness import start_hub_server
from tests.servers.llamacpp_harness import start_router

pytestmark = pytest.mark.integration

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"


def models_in(node: Node) -> list[str]:
    return [m.name for m in desired.load(node.config).models]


def hand_pull(node: Node, name: str) -> None:
    """A model pulled straight from Ollama: infernet never installed it."""
    import ollama

    with ollama.Client(host=node.url) as client:
        client.pull(name)
    assert name in node.installed()


def owned(node: Node) -> list[str]:
    with Store.open(node.state) as store:
        return [r.name for r in store.owned()]


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    return out.stderr


def on_terminal(node: Node, *args: str, answer: str, timeout: float = 90) -> tuple[int, str]:
    """Run the CLI with a pty as its terminal; type ``answer`` at its confirmation prompt.
    Returns the exit code and everything it wrote."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [INFERNET, *args, "-c", str(node.config), "--state-dir", str(node.state)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=node.env,
        start_new_session=True,
    )
    os.close(slave)
    out, answered = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal's other end has gone
                break
            if not chunk:
                break
            out += chunk
            if not answered and b"Only 'yes' will be accepted" in out:
                os.write(master, answer.encode())
                answered = True
        else:
            proc.kill()
            raise AssertionError(f"timed out; output so far: {out!r}")
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    return code, out.decode(errors="replace")


# --------------------------------------------------------------------------- install --source


@pytest.fixture
def llama(node: Node, tmp_path: Path) -> Iterator[Llama]:
    """A llama.cpp node: the real router on its folder and the local Hub (as test_llamacpp)."""
    models_dir = tmp_path / "gguf"
    models_dir.mkdir()
    sources = tmp_path / "sources"
    sources.mkdir()
    hub = start_hub_server(tmp_path / "hub", tmp_path / "hub-root")
    router = start_router(tmp_path / "router", models_dir)
    node.env.update(hub.client_env(tmp_path / "hf-home"))
    try:
        yield Llama(node, router, hub, models_dir, sources)
    finally:
        router.close()
        hub.close()


def test_model_install_with_a_source_and_checksum_downloads_that_file(
    llama: Llama, node: Node
) -> None:
    source = llama.gguf("tiny-s.gguf")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    llama.write([SMALL])
    out = node.run(
        "model", "install", "tiny-s.gguf", "--source", source.as_uri(), "--sha256", digest
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert llama.files() == ["tiny-s.gguf"]
    entry = desired.load(node.config).models[-1]
    assert (entry.name, entry.backend.value) == ("tiny-s.gguf", "llamacpp")
    assert (entry.source, entry.sha256) == (source.as_uri(), digest)
    again = node.run("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr


def test_model_install_with_a_wrong_checksum_puts_the_file_back(llama: Llama, node: Node) -> None:
    source = llama.gguf("tiny-w.gguf")
    llama.write([SMALL])
    before = node.config.read_bytes()
    out = node.run(
        "model", "install", "tiny-w.gguf", "--source", source.as_uri(), "--sha256", "ab" * 32
    )
    assert out.returncode == 1
    assert "checksum mismatch" in out.stdout + out.stderr
    assert node.config.read_bytes() == before
    assert llama.files() == []


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["x.gguf", "--sha256", "ab" * 32], "--sha256 checks a downloaded file: give its --source"),
        (["x.gguf", "--source", "file:///x.gguf", "--sha256", "12ab"], "is not a SHA-256"),
        (["x.gguf", "--source", "ftp://u:secret@h/x.gguf"], "is not a URL infernet downloads"),
        (["qwen.gguf", "--backend", "ollama", "--source", "https://h/q.gguf"], "--source: Ollama"),
    ],
    ids=["sha-without-source", "bad-sha", "bad-scheme", "ollama-source"],
)
def test_model_install_flags_that_cannot_work_are_refused_before_the_file_changes(
    node: Node, flags: list[str], says: str
) -> None:
    node.write_config([SMALL])
    before = node.config.read_bytes()
    out = node.run("model", "install", *flags)
    assert says in one_line_error(out)
    assert "secret" not in out.stderr  # a source's credentials never reach a message
    assert node.config.read_bytes() == before


def test_a_huggingface_repo_id_on_an_ollama_node_says_to_add_a_backend(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    before = node.config.read_bytes()
    out = node.run("model", "install", "Qwen/Qwen2.5-14B-Instruct")
    error = one_line_error(out)
    assert (
        "Qwen/Qwen2.5-14B-Instruct looks like a HuggingFace repo id: add --backend vllm "
        "(or sglang, max)"
    ) in error
    assert node.config.read_bytes() == before
    assert not [r for r in server.registry_requests() if "qwen2.5-14b" in r["path"].lower()]


# --------------------------------------------------------------------------- the seed's flat shape


def _plane(node: Node, cp: ControlPlaneServer) -> dict[str, Any]:
    return {"url": cp.url, "key_file": str(node.tmp / "node.key"), "heartbeat_interval": "1s"}


def test_a_dashboard_command_in_the_seeds_flat_shape_installs_like_command_args(
    node: Node, cp: ControlPlaneServer
) -> None:
    pubkey = keygen(node)
    node.write_config([SMALL], control_plane=_plane(node, cp))
    assert node.run("apply", "--yes").returncode == 0
    flat = cp.enqueue_command(pubkey, "model_install", {"model": QWEN}, shape="flat")
    out = node.run("watch", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    row = cp.command(flat)
    assert row["status"] == "completed", row["error"]
    assert row["result"]["model"] == QWEN
    assert models_in(node) == [SMALL, QWEN]
    assert QWEN in node.installed()


def test_a_flat_command_meets_the_same_checks_as_command_args(
    node: Node, cp: ControlPlaneServer
) -> None:
    pubkey = keygen(node)
    node.write_config([SMALL], control_plane=_plane(node, cp))
    before = node.config.read_bytes()
    bad = [
        ("model_install", {"model": "http://evil.example/x"}),
        ("model_remove", {"model": "../../etc"}),
    ]
    ids = {
        (verb, shape): cp.enqueue_command(pubkey, verb, args, shape=shape)
        for verb, args in bad
        for shape in ("flat", "")
    }
    out = node.run("watch", "--once", timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {k: cp.command(i) for k, i in ids.items()}
    for verb, _args in bad:
        flat, nested = rows[(verb, "flat")], rows[(verb, "")]
        assert flat["status"] == nested["status"] == "failed"
        assert flat["error"] == nested["error"] and flat["error"]
    assert "looks like a file path" in rows[("model_remove", "flat")]["error"]
    assert node.config.read_bytes() == before


# --------------------------------------------------------------------------- adopt and state


def test_adopt_makes_an_installed_model_managed_so_dropping_it_removes_it(node: Node) -> None:
    needs_fake(node)
    hand_pull(node, SMALL)
    node.write_config([SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    assert owned(node) == [QWEN]  # what it pulled; SMALL was there already
    listed = node.run("state", "list", "--json")
    assert [m["model"] for m in json.loads(listed.stdout)["models"]] == [QWEN]

    out = node.run("adopt", SMALL)
    assert out.returncode == 0, out.stderr
    assert f"{SMALL} (ollama): adopted" in out.stdout
    assert sorted(owned(node)) == sorted([SMALL, QWEN])
    again = node.run("adopt", SMALL)
    assert again.returncode == 0 and "already managed" in again.stdout
    shown = node.run("state", "show", SMALL, "--json")
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)
    assert (row["model"], row["backend"], row["protected"]) == (SMALL, "ollama", False)
    assert row["digest"]
    text = node.run("state", "list")
    assert text.returncode == 0 and SMALL in text.stdout and "MANAGED SINCE" in text.stdout

    node.write_config([QWEN])  # prune: managed now removes it
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert SMALL not in node.installed()


def test_adopt_takes_only_models_installed_and_listed_all_or_nothing(node: Node) -> None:
    needs_fake(node)
    hand_pull(node, SMALL)
    hand_pull(node, QWEN)
    node.write_config([SMALL, "llama3.2:1b"])
    out = node.run("adopt", SMALL, "llama3.2:1b")
    assert "llama3.2:1b is not installed on ollama; nothing adopted" in one_line_error(out)
    out = node.run("adopt", QWEN)
    assert f"{QWEN} is not in {node.config}; add it there first" in one_line_error(out)
    assert owned(node) == []  # SMALL was not adopted either: all or nothing
    assert "llama3.2:1b" not in node.installed()  # adopt never pulls


def test_state_forget_keeps_the_weights_and_prune_then_leaves_the_model(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    assert sorted(owned(node)) == sorted([SMALL, QWEN])
    out = node.run("state", "forget", QWEN)
    assert out.returncode == 0, out.stderr
    assert "no longer manages it; its weights stay" in out.stdout
    assert owned(node) == [SMALL] and QWEN in node.installed()
    assert "does not manage" in one_line_error(node.run("state", "show", QWEN))
    assert "does not manage" in one_line_error(node.run("state", "forget", QWEN))
    node.write_config([SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert QWEN in node.installed(), "a forgotten model is no longer infernet's to prune"


@pytest.mark.parametrize("command", [("adopt", SMALL), ("state", "forget", SMALL)])
def test_ownership_edits_wait_for_the_node_lock(node: Node, command: tuple[str, ...]) -> None:
    hand_pull(node, SMALL)
    node.write_config([SMALL])
    if command[0] == "state":
        assert node.run("adopt", SMALL).returncode == 0
    before = owned(node)
    node.env["INFERNET_LOCK_TIMEOUT"] = "1"
    holder = NodeLock(node.state, purpose="test: another writer")
    holder.acquire(timeout=5)
    try:
        out = node.run(*command)
    finally:
        holder.release()
    assert "test: another writer" in one_line_error(out)
    assert owned(node) == before


# --------------------------------------------------------------------------- remove asks


def test_model_remove_off_a_terminal_without_yes_refuses_and_touches_nothing(node: Node) -> None:
    node.write_config([SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    before = node.config.read_bytes()
    out = node.run("model", "remove", QWEN)
    assert "stdin is not a terminal; pass --yes" in one_line_error(out)
    assert node.config.read_bytes() == before
    assert QWEN in node.installed()


@pytest.mark.parametrize("answer", ["no\n", "\x04"], ids=["no", "ctrl-d"])
def test_model_remove_asks_on_a_terminal_and_no_puts_the_file_back(node: Node, answer: str) -> None:
    node.write_config([SMALL, QWEN])
    assert node.run("apply", "--yes").returncode == 0
    before = node.config.read_bytes()
    code, text = on_terminal(node, "model", "remove", QWEN, answer=answer)
    assert code == 1, text
    assert f"Remove {QWEN}? Only 'yes' will be accepted" in text
    assert "Apply cancelled" in text and "Traceback" not in text
    assert node.config.read_bytes() == before
    assert QWEN in node.installed()
    code, text = on_terminal(node, "model", "remove", QWEN, answer="yes\n")
    assert code == 0, text
    assert models_in(node) == [SMALL]
    assert QWEN not in node.installed()
