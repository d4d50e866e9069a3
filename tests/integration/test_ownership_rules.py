"""Never delete what it must keep, through the real CLI, the daemon's own
reconcile and ``infernet watch``, against the Ollama-compatible and control-plane test servers.

* a remote ``model_remove`` follows the rules of a file edit: the entry leaves the file and
  the prune policy decides what is deleted; protected models never;
* protection is recorded by every apply and reconcile, changes or not;
* a writer that waited for the node lock reads the file only once it holds the lock;
* a failed ``model install`` leaves the file byte for byte; ``model remove`` of a name the
  file doesn't list exits 1;
* a remote install cut off by a crash is taken back out of the file and answered failed;
* protection is checked with the entry's revision.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from reconciler.config import desired
from reconciler.config import edit as configedit
from reconciler.converge.session import Session
from reconciler.daemon.loop import Daemon
from state import NodeLock, Store
from tests.integration.conftest import INFERNET, Node, keygen, needs_fake, verified_beats
from tests.servers.controlplane_harness import ControlPlaneServer

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"
LLAMA = "llama3.2:1b"
EMBED = "all-minilm:latest"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def hand_pull(node: Node, name: str) -> None:
    """A model pulled by someone else, straight from Ollama: infernet never installed it."""
    import ollama

    with ollama.Client(host=node.url) as client:
        client.pull(name)
    assert name in node.installed()


def plane(node: Node, cp: ControlPlaneServer) -> dict[str, Any]:
    return {"url": cp.url, "key_file": str(node.tmp / "node.key"), "heartbeat_interval": "1s"}


def models_in(node: Node) -> list[str]:
    return [m.name for m in desired.load(node.config).models]


@contextlib.contextmanager
def daemon(node: Node, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """The daemon of ``infernet watch`` in this process, driven one tick at a time: its own
    reconcile and command runner, without the event loop."""
    for name in ("INFERNET_NO_NVML", "INFERNET_RETRY_BACKOFF", "INFERNET_LOCK_TIMEOUT"):
        monkeypatch.setenv(name, node.env[name])
    monkeypatch.setenv("INFERNET_WITHDRAW_TIMEOUT", "2")
    watch = Daemon(node.config, node.state)
    watch.session = Session.open(desired.load(node.config), node.state)
    try:
        yield watch
    finally:
        watch._stop_serving(0.0)  # a tick may have started the job runner: its poller ends first
        watch.session.close()


# --------------------------------------------------------------------------- remote removals


@pytest.mark.parametrize(("prune", "deleted"), [("none", False), ("managed", False), ("all", True)])
def test_a_remote_removal_deletes_only_what_the_prune_policy_would(
    node: Node, cp: ControlPlaneServer, monkeypatch: pytest.MonkeyPatch, prune: str, deleted: bool
) -> None:
    pubkey = keygen(node)
    hand_pull(node, QWEN)  # installed by hand: infernet does not own it
    node.write_config([SMALL, QWEN], control_plane=plane(node, cp), policy={"prune": prune})
    with daemon(node, monkeypatch) as watch:
        watch.tick()
        assert cp.heartbeats()[-1]["specs"]["served_models"] == [SMALL, QWEN]
        command = cp.enqueue_command(pubkey, "model_remove", {"model": QWEN})
        watch.tick()
    row = cp.command(command)
    assert row["status"] == "completed", row["error"]
    assert row["result"]["removed"] == [QWEN]
    assert models_in(node) == [SMALL]  # the entry left the file either way
    assert (QWEN in node.installed()) is not deleted
    assert cp.heartbeats()[-1]["specs"]["served_models"] == [SMALL]
    if not deleted:
        assert row["result"]["note"].startswith(
            f"removed {QWEN} from infernet.yaml; nothing deleted"
        )


def test_a_remote_removal_of_a_model_the_file_does_not_list_deletes_nothing_unowned(
    node: Node, cp: ControlPlaneServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pubkey = keygen(node)
    hand_pull(node, QWEN)
    node.write_config([SMALL], control_plane=plane(node, cp))  # prune: managed
    before = node.config.read_bytes()
    with daemon(node, monkeypatch) as watch:
        watch.tick()
        command = cp.enqueue_command(pubkey, "model_remove", {"model": QWEN})
        watch.tick()
    row = cp.command(command)
    assert row["status"] == "completed", row["error"]
    assert row["result"]["note"] == (
        f"{QWEN} is not in infernet.yaml; nothing deleted (infernet did not install it, and "
        "policy.prune: managed deletes only what it did)"
    )
    assert QWEN in node.installed()
    assert node.config.read_bytes() == before


def test_a_remote_removal_never_touches_a_protected_model(
    node: Node, cp: ControlPlaneServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pubkey = keygen(node)
    node.write_config(
        [SMALL, {"name": QWEN, "protect": True}],
        control_plane=plane(node, cp),
        policy={"prune": "all"},
    )
    before = node.config.read_bytes()
    with daemon(node, monkeypatch) as watch:
        watch.tick()
        command = cp.enqueue_command(pubkey, "model_remove", {"model": QWEN})
        watch.tick()
    row = cp.command(command)
    assert row["status"] == "failed"
    assert "protect: true" in row["error"]
    assert QWEN in node.installed()
    assert node.config.read_bytes() == before


# --------------------------------------------------------------------------- protection recorded


@pytest.mark.parametrize("noop", ["apply", "watch"])
def test_protection_is_remembered_by_a_run_that_changed_nothing(node: Node, noop: str) -> None:
    policy = {"prune": "all"}
    node.write_config([SMALL, QWEN], policy=policy)
    assert node.run("apply", "--yes").returncode == 0
    node.write_config([SMALL, {"name": QWEN, "protect": True}], policy=policy)
    assert node.run("plan").returncode == 0
    with Store.open(node.state) as store:
        assert store.get_status("protected") is None, "plan stays read-only"
    if noop == "apply":
        out = node.run("apply", "--yes")
        assert out.returncode == 0, out.stderr
        assert "No changes" in out.stdout
    else:
        out = node.run("watch", "--once")
        assert out.returncode == 0, out.stderr
    node.write_config([SMALL], policy=policy)  # the protected entry leaves the file
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert QWEN in node.installed()
    assert f"{QWEN} left the file but was declared protect: true" in out.stdout


# ------------------------------------------------------------------------- the lock before the file


@pytest.mark.parametrize(
    "command",
    [("apply", "--yes"), ("model", "install", LLAMA), ("model", "remove", SMALL, "--yes")],
    ids=["apply", "install", "remove"],
)
def test_a_writer_that_waited_for_the_lock_acts_on_the_file_the_holder_left(
    node: Node, command: tuple[str, ...]
) -> None:
    policy = {"prune": "all"}
    node.write_config([SMALL, QWEN], policy=policy)
    assert node.run("apply", "--yes").returncode == 0
    node.env["INFERNET_LOCK_TIMEOUT"] = "60"
    holder = NodeLock(node.state, purpose="test: another writer")
    holder.acquire(timeout=5)
    try:
        waiting = node.popen(*command)
        time.sleep(3)  # it has started, and waits for the lock
        assert waiting.poll() is None
        # Meanwhile the lock's holder adds a model to the file and installs it.
        configedit.add_model(node.config, EMBED)
        hand_pull(node, EMBED)
    finally:
        holder.release()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, out + err
    assert EMBED in models_in(node)
    assert EMBED in node.installed(), "a stale file made it delete a model the file lists"
    if command[1:2] == ("install",):
        assert LLAMA in models_in(node) and LLAMA in node.installed()
    if command[1:2] == ("remove",):
        assert SMALL not in models_in(node) and SMALL not in node.installed()


def test_the_daemon_reads_the_file_again_once_it_holds_the_lock(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.write_config([SMALL], policy={"prune": "all"})
    with daemon(node, monkeypatch) as watch:
        watch.tick()
        # A writer from a shell edits the file and installs a model while the daemon waits for
        # the lock; the daemon acts before the file's change event reaches it.
        configedit.add_model(node.config, EMBED)
        hand_pull(node, EMBED)
        watch.reconcile("tick")
    assert EMBED in node.installed(), "the daemon applied the file it had read before"


def test_concurrent_model_installs_all_end_in_the_file_and_installed(node: Node) -> None:
    node.throttle(300_000)  # each pull takes a moment: the installs queue on the lock
    node.write_config([SMALL])
    assert node.run("apply", "--yes").returncode == 0
    node.env["INFERNET_LOCK_TIMEOUT"] = "120"
    wanted = [QWEN, LLAMA, EMBED]
    procs = [node.popen("model", "install", name) for name in wanted]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, out + err
    assert sorted(models_in(node)) == sorted([SMALL, *wanted])
    assert {SMALL, *wanted} <= node.installed()
    assert node.run("plan", "--detailed-exitcode").returncode == 0


# --------------------------------------------------------------------------- failed installs


def _crlf_file_with_comments(node: Node, **extra: Any) -> bytes:
    node.write_config([SMALL], **extra)
    text = "# my node: comments, CRLF and all\n" + node.config.read_text()
    node.config.write_bytes(text.replace("\n", "\r\n").encode())
    return node.config.read_bytes()


@pytest.mark.parametrize("failure", ["not in the registry", "over the budget", "pull fails"])
def test_a_failed_model_install_leaves_the_file_byte_for_byte(node: Node, failure: str) -> None:
    server = needs_fake(node)
    budget = {"vram": "1GiB", "reserve": "100MiB", "disk_reserve": "1MiB"}
    before = _crlf_file_with_comments(node, budget=budget)
    assert node.run("apply", "--yes").returncode == 0
    name = {"not in the registry": "nosuch:1b", "over the budget": LLAMA, "pull fails": QWEN}
    args = ["--pin"] if failure == "over the budget" else []
    if failure == "pull fails":
        server.fault(QWEN, "digest_mismatch")
    out = node.run("model", "install", name[failure], *args)
    assert out.returncode == 1, out.stdout + out.stderr
    why = {
        "not in the registry": "is not in the registry",
        "over the budget": "> VRAM budget",
        "pull fails": "digest mismatch",
    }
    assert why[failure] in out.stderr and "Traceback" not in out.stderr
    assert node.config.read_bytes() == before
    assert f"Restored {node.config} as it was before the install" in out.stderr
    server.clear_faults()
    after = node.run("plan", "--detailed-exitcode")
    assert after.returncode == 0, after.stdout  # nothing left behind that every plan trips on


def test_model_remove_of_a_name_not_in_the_file_exits_1_and_deletes_nothing(node: Node) -> None:
    node.write_config([SMALL])
    assert node.run("apply", "--yes").returncode == 0
    hand_pull(node, QWEN)
    before = node.config.read_bytes()
    out = node.run("model", "remove", QWEN)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and f"{QWEN} is not in {node.config}" in out.stderr
    assert QWEN in node.installed()
    assert node.config.read_bytes() == before


# --------------------------------------------------------------------------- crashes mid-install


def _watch(node: Node, n: int) -> tuple[subprocess.Popen[bytes], Any]:
    log = (node.tmp / f"watch-{n}.log").open("w")
    proc = subprocess.Popen(
        [INFERNET, "watch", "-c", str(node.config), "--state-dir", str(node.state), "--tick", "1"],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=node.env,
        stdin=subprocess.DEVNULL,
    )
    return proc, log


def test_a_remote_install_cut_off_by_a_crash_is_taken_back_and_answered_failed(
    node: Node, cp: ControlPlaneServer
) -> None:
    server = needs_fake(node)
    pubkey = keygen(node)
    node.write_config([SMALL], control_plane=plane(node, cp))
    assert node.run("apply", "--yes").returncode == 0
    before = node.config.read_bytes()
    server.fault(QWEN, "stall", after_bytes=50_000)  # the pull hangs mid-way
    first, log = _watch(node, 1)
    try:
        wait_for("a heartbeat", lambda: bool(verified_beats(cp)))
        command = cp.enqueue_command(pubkey, "model_install", {"model": QWEN})
        wait_for("the file edit", lambda: QWEN in models_in(node))
        wait_for("the pull", lambda: any(r["path"] == "/api/pull" for r in server.requests()))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        log.close()
    server.clear_faults()  # a re-pull now would succeed: only the file can stop it
    served_after_restart: list[list[str]] = []
    second, log = _watch(node, 2)
    try:
        wait_for("the answer", lambda: cp.command(command)["status"] == "failed")
        assert "interrupted" in (cp.command(command)["error"] or "")
        assert node.config.read_bytes() == before, "the cut-off edit was taken back"
        since = len(verified_beats(cp))
        wait_for("a heartbeat after the restart", lambda: len(verified_beats(cp)) > since + 1)
        # The pull the crash cut off may still finish inside Ollama: it is ours, then pruned.
        wait_for(f"{QWEN} gone", lambda: QWEN not in node.installed())
        served_after_restart = [b["body"]["specs"]["served_models"] for b in verified_beats(cp)]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)
        log.close()
    assert all(QWEN not in served for served in served_after_restart[since:])
    assert "Traceback" not in (node.tmp / "watch-2.log").read_text()
    with Store.open(node.state) as store:
        assert store.get_status("command_undo") in (None, {})


# --------------------------------------------------------------------------- revisions


def test_model_remove_checks_protection_with_the_entrys_revision(node: Node) -> None:
    node.config.write_text(
        "served_models:\n"
        "  - {name: org/tiny, backend: vllm, revision: v1, protect: true}\n"
        f"backends: {{hf: {{cache_dir: {node.tmp / 'hub'}}}}}\n"
    )
    before = node.config.read_bytes()
    out = node.run("model", "remove", "org/tiny")
    assert out.returncode == 1
    assert "org/tiny is protect: true" in out.stderr
    assert node.config.read_bytes() == before
