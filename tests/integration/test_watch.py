"""The daemon end to end: ``infernet watch`` as a real process, the Ollama-compatible server, and
(where named) the control-plane test server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import INFERNET, Node, keygen, needs_fake, verified_beats
from tests.servers.controlplane_harness import start_control_plane

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"
EMBED = "all-minilm:latest"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_LAST_GOOD: dict[Path, dict[str, Any]] = {}


def _last_served(cp: Any) -> list[str]:
    """served_models of the last verified heartbeat; [] before the first."""
    beats = verified_beats(cp)
    return beats[-1]["body"]["specs"]["served_models"] if beats else []  # type: ignore[no-any-return]


def save(node: Node, served: list[Any], **extra: Any) -> None:
    """Write the file the way editors and git do: a temp file renamed over the old one."""
    try:
        doc = yaml.safe_load(node.config.read_text())
        _LAST_GOOD[node.config] = doc
    except yaml.YAMLError:  # the test broke it on purpose; start from the last good one
        doc = dict(_LAST_GOOD[node.config])
    doc["served_models"] = served
    doc.update(extra)
    tmp = node.config.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, node.config)


class Watch:
    """A running ``infernet watch``; its stderr (logs) is collected in a file."""

    def __init__(self, node: Node, *extra: str) -> None:
        self.log = node.tmp / f"watch-{time.monotonic_ns()}.log"
        self._log = self.log.open("w")
        self.proc = subprocess.Popen(
            [
                INFERNET,
                "watch",
                "-c",
                str(node.config),
                "--state-dir",
                str(node.state),
                "--tick",
                "1",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=node.env,
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()


@pytest.fixture
def watch(node: Node) -> Iterator[Callable[..., Watch]]:
    started: list[Watch] = []

    def start(*extra: str) -> Watch:
        w = Watch(node, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL)


def test_file_changes_reconcile_and_sigterm_stops_cleanly(node: Node, watch: Any) -> None:
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    save(node, [SMALL, QWEN])
    wait_for("the added model", lambda: QWEN in node.installed())
    save(node, [QWEN])
    wait_for("the dropped model to go", lambda: SMALL not in node.installed())
    started = time.monotonic()
    assert w.stop() == 0, w.text()
    assert time.monotonic() - started < 5
    status = json.loads(node.run("status", "--json").stdout)
    assert status["daemon"]["running"] is False


def test_invalid_file_keeps_the_last_valid_state(node: Node, watch: Any) -> None:
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    node.config.write_text("served_models: [\n")  # half-written
    wait_for("the error in the log", lambda: "last valid desired state" in w.text())
    time.sleep(1.5)  # a tick passes: nothing may be removed
    assert SMALL in node.installed()
    out = node.run("status", "--json")
    assert out.returncode == 1, out.stderr  # an invalid file is an error status exits on
    status = json.loads(out.stdout)
    assert status["daemon"]["config_valid"] is False
    assert "half-written" in status["config_error"]
    node.config.unlink()  # deleted: the same
    time.sleep(1.5)
    assert SMALL in node.installed()
    node.write_config([QWEN], policy={"prune": "managed"})
    wait_for(
        "the fixed file to apply",
        lambda: QWEN in node.installed() and SMALL not in node.installed(),
    )


def test_a_storm_of_saves_ends_on_the_last_content(node: Node, watch: Any) -> None:
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    choices = [[SMALL], [SMALL, QWEN], [SMALL, EMBED]]
    for i in range(100):
        save(node, choices[i % 3])
        time.sleep(0.01)
    last = choices[99 % 3]
    wait_for("the last content", lambda: node.installed() == set(last), timeout=30)
    time.sleep(1.5)
    assert node.installed() == set(last)
    assert w.text().count("file changed") <= 3, w.text()


def test_drift_is_healed_deleted_model_repulled_evicted_pin_repinned(
    node: Node, watch: Any
) -> None:
    server = needs_fake(node)
    node.write_config([SMALL, {"name": EMBED, "keep_alive": "forever"}])
    watch()
    wait_for("pinned", lambda: EMBED in node.loaded())
    import ollama

    with ollama.Client(host=node.url) as client:
        client.delete(SMALL)
    wait_for("re-pulled", lambda: SMALL in node.installed())
    server.evict(EMBED)
    wait_for("re-pinned", lambda: EMBED in node.loaded())


def test_drift_only_reported_without_self_heal(node: Node, watch: Any) -> None:
    node.write_config([SMALL], policy={"self_heal": False})
    import ollama

    with ollama.Client(host=node.url) as client:
        client.pull(SMALL)
        w = watch("--log-level", "debug")
        # The start and a first tick have both run; from now on only ticks see the drift.
        wait_for("a tick", lambda: w.text().count("reconcile done: converged") >= 2)
        client.delete(SMALL)
    wait_for("the drift report", lambda: "drift (self_heal is off)" in w.text())
    assert SMALL not in node.installed()


def test_sigterm_abandons_a_pull_within_5s(node: Node, watch: Any) -> None:
    node.throttle(5_000)  # a pull that takes half a minute
    node.write_config([SMALL])
    w = watch()
    wait_for("the pull to start", lambda: "reconciling" in w.text())
    started = time.monotonic()
    assert w.stop() == 0, w.text()
    assert time.monotonic() - started < 5, "SIGTERM must stop within 5 s"
    assert SMALL not in node.installed()


def test_killed_daemon_restarts_and_converges(node: Node, watch: Any, tmp_path: Any) -> None:
    node.throttle(40_000)
    with start_control_plane(tmp_path / "cp") as cp:
        keygen(node)
        node.write_config(
            [SMALL, QWEN],
            control_plane={
                "url": cp.url,
                "key_file": str(node.tmp / "node.key"),
                "heartbeat_interval": "1s",
            },
        )
        w = watch()
        wait_for("the pull to start", lambda: "reconciling" in w.text())
        w.stop(signal.SIGKILL)
        assert QWEN not in node.installed()
        watch()
        violations: list[str] = []

        def converged() -> bool:
            installed = node.installed()
            for beat in verified_beats(cp):
                for name in beat["body"]["specs"]["served_models"]:
                    if name not in installed:
                        violations.append(f"advertised {name} before it was installed")
            return QWEN in installed and SMALL in installed

        wait_for("convergence after the restart", converged, timeout=60)
        assert violations == []
        wait_for("a beat listing both", lambda: _last_served(cp) == [SMALL, QWEN])


def test_apply_from_a_shell_while_the_daemon_acts(node: Node, watch: Any) -> None:
    node.throttle(10_000)
    node.write_config([QWEN])
    w = watch()
    wait_for("the daemon to act", lambda: "reconciling" in w.text())
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert "watch" in out.stderr and "daemon is running" in out.stderr


def test_sighup_reloads(node: Node, watch: Any) -> None:
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    w.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: "SIGHUP" in w.text())
    assert w.proc.poll() is None


def test_dashboard_commands_heartbeats_and_goodbye(node: Node, watch: Any, tmp_path: Any) -> None:
    with start_control_plane(tmp_path / "cp") as cp:
        pubkey = keygen(node)
        node.write_config(
            [SMALL],
            control_plane={
                "url": cp.url,
                "key_file": str(node.tmp / "node.key"),
                "heartbeat_interval": "1s",
            },
        )
        w = watch()
        wait_for("the first heartbeat", lambda: bool(verified_beats(cp)))
        install = cp.enqueue_command(pubkey, "model_install", {"model": QWEN})
        unknown = cp.enqueue_command(pubkey, "train_shard", {"shard_url": "x"})
        wait_for("the install", lambda: cp.command(install)["status"] == "completed", 30)
        assert QWEN in node.installed()
        assert QWEN in node.config.read_text()  # commands: edit wrote it into the file
        wait_for("the unknown verb refused", lambda: cp.command(unknown)["status"] == "failed")
        assert "unsupported" in (cp.command(unknown)["error"] or "")

        wait_for("a beat listing it", lambda: _last_served(cp) == [SMALL, QWEN])
        cp.set_down(3600)  # the control plane goes away; a command answer waits in the outbox
        time.sleep(1.5)
        cp.set_down(None)
        remove = cp.enqueue_command(pubkey, "model_remove", {"model": QWEN})
        wait_for("the removal", lambda: cp.command(remove)["status"] == "completed", 30)
        assert QWEN not in node.installed()
        assert w.stop() == 0, w.text()
        last = [r for r in cp.received() if r["path"].endswith("/heartbeat")][-1]
        assert last["body"] == {"role": "provider", "status": "offline"}
        assert last["pubkey"] == pubkey


def test_idle_daemon_does_not_wake_on_its_own_reads(node: Node, watch: Any) -> None:
    """Regression: inotify reports our own open/close of the file; waking on those re-read
    it forever (1.7 % of a core while idle)."""
    node.write_config([SMALL])
    w = watch("--log-level", "debug")
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    time.sleep(2.5)  # ticks happen (every 1 s here) and read the file
    assert w.text().count("file event") == 0, w.text()
    save(node, [SMALL, QWEN])
    wait_for("a real edit to be seen", lambda: "file event" in w.text())


def test_symlink_swaps_and_git_style_targets_are_seen(node: Node, watch: Any) -> None:
    """/etc/infernet/infernet.yaml -> repo/nodes/host.yaml: a `git pull` rewrites the target in
    another folder; a deploy may also swap the link itself."""
    repo = node.tmp / "repo"
    repo.mkdir()
    node.write_config([SMALL])
    target = repo / "host.yaml"
    node.config.rename(target)
    node.config.symlink_to(target)
    watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    doc = yaml.safe_load(target.read_text())
    doc["served_models"] = [SMALL, QWEN]
    tmp = repo / ".host.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, target)  # what git does to the checkout
    wait_for("the target's change", lambda: QWEN in node.installed())
    other = repo / "host-v2.yaml"
    doc["served_models"] = [QWEN, EMBED]
    other.write_text(yaml.safe_dump(doc))
    link = node.tmp / "infernet.yaml.new"
    link.symlink_to(other)
    os.replace(link, node.config)  # an atomic symlink swap
    wait_for("the swapped link", lambda: EMBED in node.installed())


def test_ollama_down_then_back(node: Node, watch: Any) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    server.stop()
    save(node, [SMALL, QWEN])
    wait_for("the outage in the log", lambda: "can't reach Ollama" in w.text())
    assert w.proc.poll() is None, "a backend outage must not stop the daemon"
    server.start()
    node.url = server.url  # same port: the restart keeps it
    wait_for("convergence once Ollama is back", lambda: QWEN in node.installed(), timeout=30)


def test_invalid_yaml_mid_storm_and_metrics(node: Node, watch: Any) -> None:
    import httpx

    node.write_config([SMALL])
    w = watch("--metrics-addr", "127.0.0.1:0", "--log-format", "json")
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    for i in range(30):
        if i % 7 == 3:
            node.config.write_text("served_models: [\n")
        else:
            save(node, [SMALL, QWEN] if i % 2 else [SMALL])
    save(node, [SMALL, EMBED])
    wait_for("the last content", lambda: node.installed() == {SMALL, EMBED}, timeout=30)
    lines = [json.loads(x) for x in w.text().splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
    port = next(x["port"] for x in lines if "metrics" in x["msg"] and "port" in x)
    body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'infernet_reconciles_total{outcome="converged"}' in body
    assert "infernet_config_valid 1.0" in body


def test_once_reconciles_and_exits(node: Node) -> None:
    node.write_config([SMALL])
    out = subprocess.run(
        [INFERNET, "watch", "--once", "-c", str(node.config), "--state-dir", str(node.state)],
        capture_output=True,
        text=True,
        env=node.env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert SMALL in node.installed()
    assert "stopped" in out.stderr


def test_a_storm_of_sighups_never_deadlocks_the_daemon(node: Node, watch: Any) -> None:
    # A signal handler runs on the main thread, which sits in the wake-up queue's get(); a
    # put() needing that queue's lock used to hang the daemon for good (seen after 717 HUPs).
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    for _ in range(3000):
        w.proc.send_signal(signal.SIGHUP)
        time.sleep(0.0005)
    assert w.stop(signal.SIGTERM, timeout=30) == 0
    assert "signal SIGTERM: stopping" in w.text()
