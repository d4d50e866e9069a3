"""``infernet watch`` survives what it is fed and stops when told.

Real processes on loopback: the daemon, the Ollama-compatible test server, the control-plane
test server, and (for SIGTERM) a peer that accepts a request and then trickles one byte every
1.5 s, the slow-loris that used to hold the daemon past the unit's 15 s stop timeout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.conftest import Node, keygen, verified_beats
from tests.integration.test_watch import Watch, save, wait_for
from tests.servers.controlplane_harness import ControlPlaneServer

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"
DEEP = "backends:\n" + "[" * 2000 + "\n"  # the 4 KB file
REJECTED = "this node is managed from infernet.yaml"


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


def _cp_config(node: Node, cp_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": cp_url,
        "key_file": str(node.tmp / "node.key"),
        "heartbeat_interval": "1s",
        **extra,
    }


def _daemon(node: Node, *, code: int = 0) -> dict[str, Any]:
    """``status --json``; ``code`` 1 while the file is invalid (the exit code says so too)."""
    out = node.run("status", "--json")
    assert out.returncode == code and "Traceback" not in out.stderr, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


# --------------------------------------------------------------------------- a file nested too deep


def test_a_file_nested_2000_deep_keeps_the_last_valid_state_also_across_a_restart(
    node: Node, watch: Any
) -> None:
    node.write_config([SMALL])
    w = watch()
    wait_for("the first reconcile", lambda: SMALL in node.installed())
    node.config.write_text(DEEP)
    wait_for("the one-line error", lambda: "nested more than" in w.text())
    time.sleep(1.5)  # a tick passes
    assert w.proc.poll() is None, w.text()
    assert "Traceback" not in w.text() and "RecursionError" not in w.text()
    assert SMALL in node.installed()
    assert w.stop() == 0, w.text()

    # A restart with the file still broken serves the last valid version the store kept.
    again = watch()
    wait_for("the restart's error", lambda: "last valid version" in again.text())
    time.sleep(1.5)
    assert again.proc.poll() is None, again.text()
    assert SMALL in node.installed()
    daemon = _daemon(node, code=1)["daemon"]
    assert daemon["running"] is True and daemon["config_valid"] is False
    assert "nested more than 32 levels" in daemon["config_error"]
    assert again.stop() == 0, again.text()


_FAULT = """\
import os
from reconciler.converge import session

_observe_and_plan = session.Session.observe_and_plan


def observe_and_plan(self, *args, **kwargs):
    # Injected for the test: a bug that no InfernetError handler expects.
    if os.path.exists(os.environ["INFERNET_TEST_FAULT"]):
        raise RuntimeError("injected fault: a bug in planning")
    return _observe_and_plan(self, *args, **kwargs)


session.Session.observe_and_plan = observe_and_plan
"""


def test_a_bug_inside_a_reconcile_is_contained_reported_and_backed_off(
    node: Node, cp: ControlPlaneServer, watch: Any
) -> None:
    inject = node.tmp / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAULT)
    fault = node.tmp / "fault-on"
    keygen(node)
    node.write_config([SMALL], control_plane=_cp_config(node, cp.url))
    node.state.mkdir(mode=0o755)  # as systemd's StateDirectory= makes it
    node.state.chmod(0o755)
    plain = dict(node.env)
    paths = [str(inject), node.env.get("PYTHONPATH", "")]
    node.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    node.env["INFERNET_TEST_FAULT"] = str(fault)
    w = watch()  # only the daemon has the bug; `status` below is the plain CLI
    node.env.clear()
    node.env.update(plain)
    wait_for(
        "a first heartbeat listing the model",
        lambda: any(
            b["body"]["specs"]["served_models"] == [SMALL]
            for b in verified_beats(cp)
            if b["body"].get("specs")
        ),
    )

    fault.touch()
    wait_for("the fault in the log", lambda: "injected fault" in w.text())
    wait_for("the fault in status", lambda: _daemon(node)["daemon"].get("errors"))
    errors = _daemon(node)["daemon"]["errors"]
    assert errors == [
        "reconcile failed: internal error RuntimeError: injected fault: a bug in planning"
    ], errors

    def fault_beats() -> list[dict[str, Any]]:
        return [
            b
            for b in verified_beats(cp)
            if b["body"].get("specs") and errors[0] in b["body"]["specs"]["reconciler"]["errors"]
        ]

    wait_for("a heartbeat carrying the fault", lambda: bool(fault_beats()))
    # Serving goes on: the beat still advertises what the last good reconcile verified.
    assert fault_beats()[-1]["body"]["specs"]["served_models"] == [SMALL]
    time.sleep(3)  # ticks pass: backed off, and logged once however often it is met again
    assert w.proc.poll() is None, w.text()
    lines = [line for line in w.text().splitlines() if "injected fault" in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in w.text()
    reports = list(node.state.glob("crash-*.txt"))
    assert len(reports) == 1 and "injected fault" in reports[0].read_text()
    assert str(reports[0]) in lines[0]

    fault.unlink()
    save(node, [SMALL, QWEN])  # new input: tried at once, not after the backoff
    wait_for("the reconcile working again", lambda: QWEN in node.installed(), 30)
    wait_for("the fault cleared", lambda: _daemon(node)["daemon"]["errors"] == [])
    assert "reconcile works again" in w.text()
    assert w.stop() == 0, w.text()
    # Item 13: everything infernet wrote in the 0755 state dir is private.
    modes = {
        str(p.relative_to(node.state)): stat.S_IMODE(p.stat().st_mode)
        for p in node.state.rglob("*")
        if p.is_file()
    }
    assert "state.db" in modes and "lock" in modes, modes
    assert modes == dict.fromkeys(modes, 0o600), modes


# --------------------------------------------------------------------------- control-plane edits


def test_editing_control_plane_settings_while_watching_keeps_the_command_poll_alive(
    node: Node, cp: ControlPlaneServer, watch: Any
) -> None:
    pubkey = keygen(node)
    node.write_config([SMALL], control_plane=_cp_config(node, cp.url, commands="edit"))
    w = watch()
    wait_for("the first heartbeat", lambda: bool(verified_beats(cp)))
    save(node, [SMALL], control_plane=_cp_config(node, cp.url, commands="reject"))
    wait_for("the edit read", lambda: "reject" in node.config.read_text())
    time.sleep(2.5)  # ticks pass with the new settings: the poll runs on the new client
    install = cp.enqueue_command(pubkey, "model_install", {"model": QWEN})
    wait_for("the refusal", lambda: cp.command(install)["status"] == "failed", 15)
    assert cp.command(install)["error"] == REJECTED
    assert w.proc.poll() is None, w.text()
    assert "client has been closed" not in w.text()

    save(node, [SMALL], control_plane=_cp_config(node, cp.url, commands="edit"))
    time.sleep(2.5)
    install = cp.enqueue_command(pubkey, "model_install", {"model": QWEN})
    wait_for("the install", lambda: cp.command(install)["status"] == "completed", 30)
    assert w.stop() == 0, w.text()


# -------------------------------------------------------------------- SIGTERM while a peer trickles


class TricklingPeer:
    """Accepts connections, keeps each request's bytes, answers one byte every ``every`` s."""

    def __init__(self, every: float = 1.5) -> None:
        self.every = every
        self.requests: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.requests.append(head + b"\r\n\r\n" + body)
                answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                for byte in answer * 100:  # never finishes within the test
                    if self._closed.wait(self.every):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._sock.close()


@pytest.fixture
def trickle() -> Iterator[TricklingPeer]:
    peer = TricklingPeer()
    try:
        yield peer
    finally:
        peer.close()


def _stop_within(w: Watch, seconds: float) -> float:
    started = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    try:
        w.proc.wait(timeout=seconds + 10)
    finally:
        took = time.monotonic() - started
    assert took < seconds, f"took {took:.1f}s to stop:\n{w.text()}"
    assert w.proc.returncode == 0, w.text()
    return took


def test_sigterm_stops_within_5s_while_the_control_plane_trickles_bytes(
    node: Node, watch: Any, trickle: TricklingPeer
) -> None:
    keygen(node)
    node.write_config([SMALL], control_plane=_cp_config(node, trickle.url))
    w = watch()
    wait_for("the first heartbeat to be sent", lambda: bool(trickle.requests), 30)
    time.sleep(1)  # well inside the trickle
    _stop_within(w, 5.0)
    bodies = [r.partition(b"\r\n\r\n")[2] for r in trickle.requests]
    offline = [b for b in bodies if b'"status":"offline"' in b]
    assert offline, bodies  # the goodbye was attempted, to the same slow peer
    status = _daemon(node)["daemon"]
    assert status["running"] is False


def test_sigterm_stops_within_5s_while_ollama_trickles_and_says_goodbye(
    node: Node, cp: ControlPlaneServer, watch: Any, trickle: TricklingPeer
) -> None:
    pubkey = keygen(node)
    node.write_config([SMALL], control_plane=_cp_config(node, cp.url))
    out = node.run("apply", "--yes")  # registers the node: its goodbye then marks it offline
    assert out.returncode == 0, out.stderr
    doc = node.config.read_text().replace(node.url, trickle.url)
    node.config.write_text(doc)
    w = watch()
    wait_for("the daemon stuck on Ollama", lambda: bool(trickle.requests), 30)
    time.sleep(1)
    _stop_within(w, 5.0)
    beats = [r for r in cp.received() if r["path"].endswith("/heartbeat")]
    assert beats and beats[-1]["body"] == {"role": "provider", "status": "offline"}, beats
    assert beats[-1]["pubkey"] == pubkey and beats[-1]["status"] == 200
    node.config.write_text(doc.replace(trickle.url, node.url))  # `status` asks Ollama too
    assert _daemon(node)["daemon"]["running"] is False
    assert "blocked in" in w.text()  # the log says where the main thread was stuck


def test_a_validator_bug_counts_as_an_invalid_file_and_the_kept_state_stays(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.config import desired
    from reconciler.converge.session import Session
    from reconciler.daemon.loop import Daemon

    node.write_config([SMALL])
    monkeypatch.setenv("INFERNET_NO_NVML", "1")
    first = Daemon(node.config, node.state)
    first.session = Session.open(desired.load(node.config), node.state)
    try:
        first._keep_valid()  # what a reconcile does: the text in force is kept for a restart

        def bug(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("a bug in the validator")

        monkeypatch.setattr(desired, "load", bug)
        before = first.session
        assert first.reload() is False
        assert first.session is before
        assert first.config_error is not None
        assert "internal error RuntimeError: a bug in the validator" in first.config_error
    finally:
        first.session.close()
    # A restart while the validator still fails on the file serves the kept text.
    again = Daemon(node.config, node.state)
    kept = again._load_initial()
    assert [m.name for m in kept.models] == [SMALL]
    assert again.config_error is not None and "a bug in the validator" in again.config_error
