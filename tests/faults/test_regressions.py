"""Regression tests for the invariant violations the fault campaigns found (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reconciler.config import desired
from reconciler.controlplane import heartbeat
from reconciler.controlplane.heartbeat import Heartbeater
from reconciler.errors import BackendUnreachable, ValidationError
from reconciler.model import ControlPlaneSettings
from state import Store

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("char", ["\x1f", "\x00", "\x7f", "\ufffe"])
def test_a_control_character_is_one_line_naming_the_file(tmp_path: Path, char: str) -> None:
    """Found by the fuzz campaign: PyYAML's reader error spans two lines."""
    path = tmp_path / "infernet.yaml"
    path.write_text(f"served_models: []\npolicy: {{prune: {char}all}}\n")
    with pytest.raises(ValidationError) as caught:
        desired.load(path)
    [problem] = caught.value.problems
    assert "\n" not in str(problem)
    assert str(problem).startswith(f"{path}:2:")
    assert "not allowed" in str(problem)


@pytest.mark.parametrize("timeout", [4.0, 20.0, 0.7])
def test_withdrawal_waits_out_the_whole_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout: float
) -> None:
    """Found by the control-plane outage campaign: the retry loop gave up a whole backoff step
    early (3.5 s of 4 s, 17.5 s of 20 s), deleting before the documented timeout."""
    now = [1000.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: now[0])
    sent: list[float] = []

    def sleep(seconds: float) -> None:
        assert seconds > 0
        now[0] += seconds

    def down(*_: Any) -> Exception:
        sent.append(now[0])
        return BackendUnreachable("control plane unreachable")

    with Store.open(tmp_path / "state") as store:
        beater = Heartbeater(
            ControlPlaneSettings(url="https://cp.example"),
            store,
            withdraw_timeout=timeout,
            sleep=sleep,
        )
        monkeypatch.setattr(beater, "_send", down)
        note = beater.withdraw((), None, {})  # type: ignore[arg-type]
    assert note is not None and "not confirmed" in note
    assert now[0] - 1000.0 >= timeout, f"gave up after {now[0] - 1000.0}s of {timeout}s"
    assert now[0] - 1000.0 < timeout + 0.01
    assert len(sent) >= 2


def test_huge_numbers_are_validation_errors(tmp_path: Path) -> None:
    """Found by the fuzz campaign: an int past float range raised OverflowError."""
    huge = "1" + "0" * 400
    path = tmp_path / "infernet.yaml"
    for text in (
        f"served_models: []\nbudget: {{vram: 24GiB, reserve: {huge}}}\n",
        f"served_models: []\ncontrol_plane: {{url: 'https://cp.x', heartbeat_interval: {huge}}}\n",
        f"served_models: [{{name: qwen2.5:0.5b, keep_alive: {huge}}}]\n",
    ):
        path.write_text(text)
        with pytest.raises(ValidationError) as caught:
            desired.load(path)
        assert all("\n" not in str(p) for p in caught.value.problems)


def test_integrity_failure_moves_the_database_aside(tmp_path: Path) -> None:
    """Found by the state campaign: a failed quick_check raised an sqlite3 error without an
    error code, and the CLI crashed with an AttributeError instead of rebuilding."""
    import sqlite3

    state = tmp_path / "state"
    with Store.open(state) as store:
        store.put_status("x", list(range(2000)))
    db = state / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE filler (v TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    data = bytearray(db.read_bytes())
    page = 4096
    data[3 * page + 8 : 3 * page + 40] = bytes(range(32))  # damage a b-tree page's cells
    db.write_bytes(bytes(data))
    with Store.open(state) as store:  # never an exception: rebuilt or still usable
        store.put_status("y", 1)


def test_a_non_finite_argument_is_answered_once(tmp_path: Path) -> None:
    """Found by the fuzz campaign: ``{"model": Infinity}`` (valid for Python's JSON parser) made
    the ledger raise, and the command was never answered."""
    from reconciler.controlplane.client import RemoteCommand
    from reconciler.daemon.commands import CommandRunner
    from tests.faults.test_fuzz import _Client

    config = tmp_path / "infernet.yaml"
    config.write_text("served_models: [smollm2:135m]\n")
    client = _Client()
    client.queue = [
        RemoteCommand("c1", "model_install", {"model": float("inf")}),
        RemoteCommand("c2", "model_remove", {"model": float("nan")}),
    ]
    with Store.open(tmp_path / "state") as store:
        runner = CommandRunner(
            client=client,
            store=store,
            config_path=config,  # type: ignore[arg-type]
            reconcile=lambda *_: None,
            progress_interval=0.0,
        )  # type: ignore[arg-type,return-value]
        runner.run_pending()
        assert store.unreported_commands() == []
    assert client.answers == {"c1": 1, "c2": 1}
    assert all(status == "failed" for status, _ in client.last.values())


@pytest.mark.integration
def test_a_pull_finished_after_a_crash_is_owned_and_pruned(fnode: Any) -> None:
    """Found by the watch-kill campaign: ``infernet watch`` killed mid-pull while Ollama went on
    and finished the download; the restart saw the model installed but not owned, so dropping
    it from the file later never removed it. The interrupted pull now adopts the model."""
    import ollama

    from tests.faults.conftest import installed, write_config

    small, qwen = "smollm2:135m", "qwen2.5:0.5b"
    write_config(fnode, [small])
    assert fnode.run("apply", "--yes").returncode == 0
    with Store.open(fnode.state) as store:  # the crashed apply: its pull journaled, unfinished
        run = store.begin_run(config_sha256="0" * 64, plan={"actions": [qwen]})
        canonical = "registry.ollama.ai/library/qwen2.5:0.5b"
        store.begin_action(run_id=run, op="pull", backend="ollama", canonical=canonical, model=qwen)
    with ollama.Client(host=fnode.url) as client:
        client.pull(qwen)  # the backend finished it after infernet died
    write_config(fnode, [small, qwen])
    out = fnode.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    write_config(fnode, [small])  # dropped from the file: managed, so it goes
    out = fnode.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert installed(fnode) == {small}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_pull_that_failed_is_never_advertised_while_it_backs_off(
    fnode: Any, tmp_path: Path
) -> None:
    """Found by the hostile-peer campaign: once a pull had failed, the daemon's next ticks
    planned without the pull (it was backing off), so the heartbeat no longer saw it pending
    and advertised the model it had failed to install."""
    import time

    from tests.faults.conftest import Beats, installed, wait_for, write_config
    from tests.faults.test_watch_kill import Watch
    from tests.integration.conftest import keygen
    from tests.servers.controlplane_harness import start_control_plane

    small, qwen = "smollm2:135m", "qwen2.5:0.5b"
    fnode.server.fault(qwen, "error_mid", 1000)  # every pull of it fails
    with start_control_plane(tmp_path / "cp") as cp:
        keygen(fnode)
        plane = {"url": cp.url, "key_file": str(fnode.tmp / "node.key"), "heartbeat_interval": "1s"}
        write_config(fnode, [small, qwen], control_plane=plane)
        watch = Watch(fnode, 0)
        try:
            wait_for("the failed pull", lambda: "next try in" in watch.text(), 60)
            time.sleep(4)  # ticks while the pull backs off
            assert "Traceback" not in watch.text()
        finally:
            watch.kill()
        beats = Beats(cp).all()
    served = [set(b["body"]["specs"]["served_models"]) for b in beats if b["body"].get("specs")]
    assert served and small in served[-1], served
    assert qwen not in installed(fnode)
    assert [s for s in served if qwen in s] == [], "advertised while its pull backed off"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_unfinished_download_of_a_model_that_left_the_file_is_deleted(tmp_path: Path) -> None:
    """Found by the hostile-peer campaign: a download cut off keeps its partial so that the
    next try resumes; once the model left the file nothing ever tried again, and the partial
    (up to the model's size) stayed in llama.cpp's folder for good."""
    import subprocess

    import yaml

    from tests.faults.conftest import node_env
    from tests.integration.conftest import INFERNET
    from tests.servers.hub_harness import start_hub_server
    from tests.servers.tinygguf import write_tiny_gguf

    models = tmp_path / "models"
    models.mkdir()
    config, state = tmp_path / "infernet.yaml", tmp_path / "state"
    env = {**node_env(tmp_path), "INFERNET_RETRY_BACKOFF": "0.01"}

    def apply(*served: dict[str, str]) -> subprocess.CompletedProcess[str]:
        doc = {
            "served_models": list(served),
            "backends": {"llamacpp": {"models_dir": str(models), "url": "http://127.0.0.1:9"}},
            "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
            "policy": {"allow_empty": True},
        }
        config.write_text(yaml.safe_dump(doc))
        return subprocess.run(
            [INFERNET, "apply", "--yes", "-c", str(config), "--state-dir", str(state)],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    with start_hub_server(tmp_path / "hub", tmp_path / "hub-root") as hub:
        hub.files_dir.mkdir(parents=True, exist_ok=True)
        size = write_tiny_gguf(hub.files_dir / "cut.gguf", name="cut", hidden=256, layers=4)
        hub.fault("*/cut.gguf", "cut", after_bytes=size // 10, times=100)  # 4 tries: 40 %
        out = apply({"name": "cut.gguf", "backend": "llamacpp", "source": hub.file_url("cut.gguf")})
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert ".cut.gguf.part" in {p.name for p in models.iterdir()}  # kept to resume
        out = apply()  # the model leaves the file
        assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in models.iterdir()) == []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_daemon_started_on_a_broken_file_serves_what_apply_last_applied(fnode: Any) -> None:
    """Found by the hostile-peer campaign: only ``watch`` kept the last valid file, so a daemon
    started while the file was broken served the version an earlier daemon had kept, older
    than what ``apply`` had applied since, and pulled the model that apply had removed."""
    from tests.faults.conftest import installed, write_config

    small, qwen = "smollm2:135m", "qwen2.5:0.5b"
    write_config(fnode, [small, qwen])
    out = fnode.run("watch", "--once")  # a daemon keeps this version
    assert out.returncode == 0, out.stderr
    write_config(fnode, [small])
    out = fnode.run("apply", "--yes")  # qwen leaves the file and the node
    assert out.returncode == 0, out.stderr
    assert installed(fnode) == {small}
    fnode.config.write_text("backends:\n" + "[" * 2000 + "\n")
    out = fnode.run("watch", "--once")
    assert "Traceback" not in out.stderr, out.stderr
    assert "last valid version" in out.stderr, out.stderr
    assert installed(fnode) == {small}, "the daemon served a version older than the last apply"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_download_the_backend_cannot_resume_fails_cleanly_until_repaired(fnode: Any) -> None:
    """Found by the backend-kill campaign at full size: Ollama killed while writing a part
    file (``…-partial-<N>``, JSON written in place) can never resume that download until the
    file is deleted; every pull of the blob fails. The apply must fail with one line, keep
    what the node has and remove nothing, and converge once the file is gone."""
    import time

    from tests.faults.conftest import installed, write_config
    from tests.faults.test_backend_kill import half_written_parts

    small, qwen = "smollm2:135m", "qwen2.5:0.5b"
    server = fnode.throttle(20_000)
    write_config(fnode, [small])
    assert fnode.run("apply", "--yes").returncode == 0
    write_config(fnode, [qwen])  # small leaves the file: removed only after the pull works
    proc = fnode.popen("apply", "--yes")
    blobs = fnode.models_dir / "blobs"
    deadline = time.monotonic() + 30
    while not list(blobs.glob("*-partial-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # no retry that would finish the download on the restarted backend
    proc.communicate(timeout=60)
    server.restart(kill=True)
    parts = sorted(blobs.glob("*-partial-*"))
    assert parts, "the pull never started"
    parts[0].write_bytes(b"")  # the kill landed mid-write
    assert half_written_parts(fnode.models_dir) == [parts[0]]

    out = fnode.run("apply", "--yes")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and qwen in error[0], out.stderr
    assert installed(fnode) == {small}  # the removal waits for the pull

    for path in blobs.glob(parts[0].name.rsplit("-partial", 1)[0] + "-partial*"):
        path.unlink()
    out = fnode.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert installed(fnode) == {qwen}
