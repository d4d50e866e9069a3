"""Hostile peers: a control plane, registry or download source
that trickles, floods, lies about sizes or asks for internal URLs, and secrets in source URLs.

Every peer here is a real process on loopback (``tests/servers/``) with a fault mode: the
control plane's ``trickle``/``huge``/``poll_limit``, the Ollama registry's ``trickle``/
``huge_config``/``bad_config``, the hub's ``grow``/``short``/``trickle``/``error``. What is
checked is what the issue reproduced: each must end in a one-line error within its deadline,
with bounded memory and state, nothing a peer sent repeated to another, and no secret of a
source URL anywhere but the file.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reconciler.backends import sources
from reconciler.backends.hf.engines import Engines, EngineSpec
from reconciler.config import desired
from reconciler.controlplane.client import ControlPlane, ControlPlaneError
from reconciler.controlplane.identity import NodeKey, generate_key, load_key
from reconciler.converge.session import Session
from reconciler.daemon.commands import CommandRunner
from reconciler.daemon.verbs import ReconcileOutcome
from reconciler.errors import BackendError, PullFailed
from reconciler.events import Progress
from reconciler.model import ControlPlaneSettings
from state import Store
from state.ledger import KEEP_COMMANDS
from tests.faults.conftest import node_env, write_config
from tests.integration.conftest import INFERNET, Node
from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane
from tests.servers.hub_harness import HubServer, start_hub_server
from tests.servers.tinygguf import write_tiny_gguf

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SMALL = "smollm2:135m"
PASSWORD, SIGNATURE = "pa55-w0rd-XYZZY", "SIG-0f1e2d3c4b5a"


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneServer]:
    with start_control_plane(tmp_path / "cp") as server:
        yield server


@pytest.fixture
def key(tmp_path: Path) -> NodeKey:
    generate_key(tmp_path / "node.key")
    return load_key(tmp_path / "node.key")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with start_hub_server(tmp_path / "hub", tmp_path / "hub-root") as server:
        server.files_dir.mkdir(parents=True, exist_ok=True)
        yield server


def _run(
    config: Path, state: Path, env: dict[str, str], *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [INFERNET, *args, "-c", str(config), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


# --------------------------------------------------------------------------- the control plane


@pytest.mark.timeout(60)
def test_a_trickling_control_plane_ends_at_the_call_deadline(
    cp: ControlPlaneServer, key: NodeKey
) -> None:
    """A byte every half second never trips a per-read timeout: the call's deadline ends it."""
    with ControlPlane(ControlPlaneSettings(url=cp.url), key, timeout=2.0) as client:
        cp.set_down(120, mode="trickle", interval=0.5)
        began = time.monotonic()
        with pytest.raises(ControlPlaneError, match="did not answer within 2 s") as caught:
            client.heartbeat({"status": "available"})
        assert time.monotonic() - began < 4.0
        assert caught.value.retryable
        cp.set_down(None)
        assert client.heartbeat({"status": "available", "specs": {"served_models": []}})


@pytest.mark.timeout(120)
def test_a_trickling_control_plane_does_not_hold_apply(
    fnode: Node, cp: ControlPlaneServer, tmp_path: Path
) -> None:
    """``apply`` heartbeats after converging; a slow-loris control plane held it for good."""
    generate_key(tmp_path / "node.key")
    plane = {"url": cp.url, "key_file": str(tmp_path / "node.key")}
    write_config(fnode, [SMALL], control_plane=plane)
    cp.set_down(600, mode="trickle", interval=2.0)
    env = {**fnode.env, "INFERNET_HTTP_TIMEOUT": "2"}
    began = time.monotonic()
    out = _run(fnode.config, fnode.state, env, "apply", "--yes", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - began < 45
    assert SMALL in fnode.installed()
    assert "did not answer within 2 s" in out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_a_huge_control_plane_answer_is_refused_unread(
    cp: ControlPlaneServer, key: NodeKey
) -> None:
    """A 400 MB poll reply took 1.3 GB: the client reads at most 1 MiB of any answer."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ControlPlane(ControlPlaneSettings(url=cp.url), key) as client:
        cp.set_down(60, mode="huge", size=400_000_000)
        began = time.monotonic()
        with pytest.raises(ControlPlaneError, match="1 MiB") as caught:
            client.poll_commands()
        assert time.monotonic() - began < 5
        assert "\n" not in str(caught.value)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024, f"the process grew by {grown_kib} KiB reading the answer"


@pytest.mark.timeout(60)
def test_a_poll_answered_with_more_than_the_limit_runs_only_the_limit(
    cp: ControlPlaneServer, key: NodeKey, tmp_path: Path
) -> None:
    """43 commands for ``limit: 5`` ran all 43: the first five run, the rest are ignored."""
    cp.ignore_poll_limit()
    ids = [cp.enqueue_command(key.pubkey, "train_shard", {"n": i}) for i in range(8)]

    def never(progress: Progress, cancel: threading.Event, force: frozenset[str]) -> Any:
        raise AssertionError("an unknown verb must not reconcile")

    store = Store.open(tmp_path / "state")
    with ControlPlane(ControlPlaneSettings(url=cp.url), key) as client:
        client.heartbeat({"status": "available", "specs": {"served_models": []}})
        runner = CommandRunner(
            client=client, store=store, config_path=tmp_path / "x.yaml", reconcile=never
        )
        handled = runner.run_pending(limit=5)
    assert handled == ids[:5]
    statuses = [cp.command(i)["status"] for i in ids]
    assert statuses == ["failed"] * 5 + ["running"] * 3  # claimed by the server, never run


def test_the_command_ledger_stays_bounded(tmp_path: Path) -> None:
    """A 400 MB poll reply grew the state DB to 400 MB: payloads and rows are bounded."""
    store = Store.open(tmp_path / "state")
    big = {"model": "x", "pad": "y" * (2 << 20)}
    assert store.record_command(command_id="big", verb="model_install" * 100, payload=big)
    kept = store.command_seen("big")
    assert kept is not None and kept.payload.get("_truncated") is True
    assert len(kept.verb) <= 64
    for i in range(KEEP_COMMANDS + 200):
        store.record_command(command_id=f"c{i}", verb="model_install", payload={"model": "m"})
        store.set_command_state(f"c{i}", state="failed", error="no")
        store.mark_command_reported(f"c{i}")
    store.record_command(command_id="owed", verb="model_install", payload={"model": "m"})
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        rows = db.execute("SELECT count(*) FROM commands").fetchone()[0]
    assert rows <= KEEP_COMMANDS + 1
    assert store.command_seen("owed") is not None  # an unanswered command is never dropped
    assert store.command_seen(f"c{KEEP_COMMANDS + 199}") is not None
    assert (tmp_path / "state" / "state.db").stat().st_size < 8 << 20


@pytest.mark.timeout(60)
def test_node_id_taken_by_another_key_says_how_to_fix_it(
    cp: ControlPlaneServer, tmp_path: Path
) -> None:
    """Cloned hosts share a host name, the default node_id: the 403 must say what to do."""
    settings = ControlPlaneSettings(url=cp.url, node_id="clone")
    beat = {"status": "available", "specs": {"served_models": []}}
    for name in ("first.key", "second.key"):
        generate_key(tmp_path / name)
    with ControlPlane(settings, load_key(tmp_path / "first.key")) as first:
        first.heartbeat(beat)
    second = ControlPlane(settings, load_key(tmp_path / "second.key"))
    with second, pytest.raises(ControlPlaneError) as caught:
        second.heartbeat(beat)
    message = str(caught.value)
    assert caught.value.status == 403 and not caught.value.retryable
    assert "control_plane.node_id" in message and "key_file" in message


def test_a_plain_http_control_plane_off_loopback_is_refused(tmp_path: Path) -> None:
    """Commands could be injected on the network path, and the URL was accepted silently."""
    config, env = tmp_path / "infernet.yaml", node_env(tmp_path)
    doc: dict[str, Any] = {
        "served_models": [SMALL],
        "control_plane": {"url": "http://cp.example.net:8080", "key_file": "k"},
    }
    config.write_text(yaml.safe_dump(doc))
    out = _run(config, tmp_path / "state", env, "validate")
    assert out.returncode == 1
    assert "control_plane.url: plain http://" in out.stderr
    assert "control_plane.insecure: true" in out.stderr
    doc["control_plane"]["insecure"] = True
    config.write_text(yaml.safe_dump(doc))
    assert _run(config, tmp_path / "state", env, "validate").returncode == 0
    with pytest.raises(Exception, match="insecure"):  # the client keeps the rule too
        ControlPlane(ControlPlaneSettings(url="http://cp.example.net"), _any_key(tmp_path))


def _any_key(tmp_path: Path) -> NodeKey:
    generate_key(tmp_path / "any.key")
    return load_key(tmp_path / "any.key")


@pytest.mark.timeout(60)
def test_a_failed_heartbeat_is_logged_as_a_warning(fnode: Node, cp: ControlPlaneServer) -> None:
    """A node the network routes nothing to is not an info line."""
    generate_key(fnode.tmp / "node.key")
    write_config(fnode, [], control_plane={"url": cp.url, "key_file": str(fnode.tmp / "node.key")})
    cp.set_down(120, mode="503")
    out = _run(fnode.config, fnode.state, fnode.env, "watch", "--once")
    lines = [
        line for line in out.stderr.splitlines() if "heartbeat to" in line and "offline" not in line
    ]
    assert lines, out.stderr
    assert all(" WARNING " in line for line in lines), lines


# --------------------------------------------------------------------------- the registry


@pytest.mark.timeout(90)
def test_a_trickling_registry_does_not_stall_plan(fnode: Node) -> None:
    """A manifest trickled a byte a second stalled ``plan`` indefinitely."""
    assert fnode.server is not None
    fnode.server.fault(SMALL, "trickle", rate=1)
    write_config(fnode, [SMALL])
    env = {**fnode.env, "INFERNET_HTTP_TIMEOUT": "2"}
    began = time.monotonic()
    out = _run(fnode.config, fnode.state, env, "plan", "--json", timeout=60)
    assert time.monotonic() - began < 30
    assert out.returncode == 1
    errors = json.loads(out.stdout)["errors"]
    assert any("did not answer" in e and "in time" in e for e in errors), errors


@pytest.mark.timeout(90)
def test_a_huge_registry_config_blob_is_refused_with_bounded_memory(fnode: Node) -> None:
    """A 1.5 GB config blob took ``plan`` to 3.1 GB RSS; it is refused past 4 MiB."""
    assert fnode.server is not None
    fnode.server.fault(SMALL, "huge_config", 300_000_000)
    write_config(fnode, [SMALL])
    # The plan's peak memory, measured in a fresh parent so no other child counts.
    probe = (
        "import resource, subprocess, sys; "
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, stdin=subprocess.DEVNULL); "  # noqa: E501
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(out.stdout, end='', file=sys.stderr); print(out.stderr, end='', file=sys.stderr)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            INFERNET,
            "plan",
            "--json",
            "-c",
            str(fnode.config),
            "--state-dir",
            str(fnode.state),
        ],
        capture_output=True,
        text=True,
        env=fnode.env,
        timeout=60,
        check=False,
    )
    peak_mib = int(out.stdout.split()[0]) / 1024
    assert "Traceback" not in out.stderr, out.stderr
    assert "refused" in out.stderr and "4 MiB" in out.stderr, out.stderr
    assert peak_mib < 250, f"plan peaked at {peak_mib:.0f} MiB"


@pytest.mark.timeout(60)
def test_a_registry_config_blob_that_is_not_json_is_a_plan_error(fnode: Node) -> None:
    """It raised JSONDecodeError; now it is one line naming the registry."""
    assert fnode.server is not None
    fnode.server.fault(SMALL, "bad_config")
    write_config(fnode, [SMALL])
    out = _run(fnode.config, fnode.state, fnode.env, "plan", "--json")
    assert out.returncode == 1
    errors = json.loads(out.stdout)["errors"]
    assert any("config blob is not JSON" in e and fnode.registry in e for e in errors), errors


# --------------------------------------------------------------------------- SSRF


def _reconcile(node: Node) -> Any:
    def reconcile(
        progress: Progress, cancel: threading.Event, force: frozenset[str]
    ) -> ReconcileOutcome:
        fresh = desired.load(node.config)
        with Session.open(fresh, node.state) as session, session.lock("remote command"):
            observed, plan = session.observe_and_plan(force_remove=force)
            if plan.errors:
                return ReconcileOutcome(False, plan.advertised, plan.errors[0])
            result = session.apply(plan, observed, progress=progress, cancel=cancel)
        error = result.failed[0].error if result.failed else None
        return ReconcileOutcome(result.converged, result.advertised, error)

    return reconcile


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "spelling", ["http://{host}/internal/admin:secret", "{host}/internal/admin"]
)
def test_a_remote_install_may_not_point_the_node_at_another_host(
    fnode: Node,
    cp: ControlPlaneServer,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    spelling: str,
) -> None:
    """SSRF: a name carrying a host made the node fetch it and echo the answer upstream."""
    monkeypatch.setenv("INFERNET_NO_NVML", "1")
    internal = f"127.0.0.1:{_port(hub.url)}"
    hub.fault("/v2/*", "error", status=500, message="TOP-SECRET admin page", times=100)
    pubkey = generate_key(fnode.tmp / "node.key")
    plane = {"url": cp.url, "key_file": str(fnode.tmp / "node.key")}
    write_config(fnode, [SMALL], control_plane=plane)
    before = fnode.config.read_bytes()
    command = cp.enqueue_command(pubkey, "model_install", {"model": spelling.format(host=internal)})
    store = Store.open(fnode.state)
    with ControlPlane(ControlPlaneSettings(url=cp.url), load_key(fnode.tmp / "node.key")) as client:
        runner = CommandRunner(
            client=client,
            store=store,
            config_path=fnode.config,
            reconcile=_reconcile(fnode),
            progress_interval=0.0,
        )
        assert runner.run_pending() == [command]
    row = cp.command(command)
    assert row["status"] == "failed"
    assert row["error"].startswith("args.model") and "registry" in row["error"], row["error"]
    sent = json.dumps(cp.received())
    assert "TOP-SECRET" not in sent
    assert [r for r in hub.requests() if r["path"].startswith("/v2/")] == []  # nothing fetched
    assert fnode.config.read_bytes() == before


@pytest.mark.timeout(60)
def test_registry_error_pages_are_never_repeated(fnode: Node, hub: HubServer) -> None:
    """A registry the file names answers 500 with a page: the plan says the status, no page."""
    internal = f"127.0.0.1:{_port(hub.url)}"
    hub.fault("/v2/*", "error", status=500, message="TOP-SECRET admin page", times=100)
    write_config(fnode, [f"http://{internal}/internal/admin:secret"])
    out = _run(fnode.config, fnode.state, fnode.env, "plan", "--json")
    errors = json.loads(out.stdout)["errors"]
    assert any("HTTP 500" in e for e in errors), errors
    assert "TOP-SECRET" not in out.stdout + out.stderr


# --------------------------------------------------------------------------- download sources


def _gguf_node(tmp_path: Path, hub: HubServer, source: str, name: str) -> tuple[Path, Path]:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    config, state = tmp_path / "infernet.yaml", tmp_path / "state"
    doc = {
        "served_models": [{"name": name, "backend": "llamacpp", "source": source}],
        "backends": {"llamacpp": {"models_dir": str(models), "url": "http://127.0.0.1:9"}},
        "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
    }
    config.write_text(yaml.safe_dump(doc))
    return config, state


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "extra"), [("grow", 200_000_000), ("short", 4096)])
def test_a_source_lying_about_its_size_is_stopped_and_deleted(
    tmp_path: Path, hub: HubServer, kind: str, extra: int
) -> None:
    """HEAD said 4 KiB, GET streamed 200 MB and apply kept it: stop at the size, delete."""
    name = f"liar-{kind}.gguf"
    size = write_tiny_gguf(hub.files_dir / name, name="liar")
    config, state = _gguf_node(tmp_path, hub, hub.file_url(name), name)
    env = {**node_env(tmp_path), "INFERNET_RETRY_BACKOFF": "0.01"}
    plan = json.loads(_run(config, state, env, "plan", "--json").stdout)
    assert [a["download_bytes"] for a in plan["actions"]] == [size]
    hub.fault(f"*/{name}", kind, extra)
    out = _run(config, state, env, "apply", "--yes")
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "announced" in text and "deleted" in text, text
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []  # no partial kept
    if kind == "grow":  # what the node read stops at the announced size (plus one read)
        assert "sent more than the" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_source_fails_as_a_stall(tmp_path: Path, hub: HubServer, where: str) -> None:
    """A byte every few seconds kept the download (and ``apply``) going for ever."""
    name = f"trickle-{where}.gguf"
    write_tiny_gguf(hub.files_dir / name, name="trickle", hidden=256, layers=4)
    config, state = _gguf_node(tmp_path, hub, hub.file_url(name), name)
    env = {
        **node_env(tmp_path),
        "INFERNET_PULL_STALL_TIMEOUT": "2",
        "INFERNET_RETRY_BACKOFF": "0.01",
    }
    if where == "headers":
        hub.fault(f"*/{name}", "trickle", rate=2, method="GET")
    else:
        hub.fault(f"*/{name}", "slow", rate=2000)
    began = time.monotonic()
    out = _run(config, state, env, "apply", "--yes", timeout=90)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "stalled or trickling" in out.stdout + out.stderr
    assert time.monotonic() - began < 60
    assert not (tmp_path / "models" / name).exists()


def test_a_download_stops_before_eating_the_disk_reserve(tmp_path: Path) -> None:
    """The reserve was checked in the plan only: now while the bytes land, and the partial
    file is deleted when the next bytes would leave less than the reserve free."""
    src = tmp_path / "src" / "big.gguf"
    src.parent.mkdir()
    size = write_tiny_gguf(src, name="big", hidden=512, layers=8, ff=1024)
    assert size > 4 << 20
    dest = tmp_path / "models" / "big.gguf"
    dest.parent.mkdir()
    source = sources.parse(src.as_uri())
    with httpx.Client() as http:
        remote = sources.probe(source, http, metadata=False)
        free = os.statvfs(dest.parent).f_bavail * os.statvfs(dest.parent).f_frsize
        reserve = free - size // 2  # room for half the file above the reserve
        with pytest.raises(PullFailed, match=r"disk full.*disk_reserve") as caught:
            sources.fetch(
                source,
                remote,
                dest,
                http=http,
                expected_sha256=None,
                progress=lambda *_: None,
                cancel=threading.Event(),
                reserve=reserve,
            )
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in dest.parent.iterdir()) == []


# --------------------------------------------------------------------------- secrets


@pytest.mark.timeout(180)
def test_source_credentials_never_leave_the_file(
    tmp_path: Path, hub: HubServer, cp: ControlPlaneServer
) -> None:
    """``user:pass@`` and signed query strings showed up in heartbeats, status, logs and the
    state DB. They stay in infernet.yaml; everything else shows ``***``."""
    port = _port(hub.url)
    write_tiny_gguf(hub.files_dir / "tiny-secret.gguf", name="tiny-secret")
    good = (
        f"http://alice:{PASSWORD}@127.0.0.1:{port}/files/tiny-secret.gguf"
        f"?X-Amz-Signature={SIGNATURE}"
    )
    bad = f"http://alice:{PASSWORD}@127.0.0.1:{port}/files/missing.gguf?sig={SIGNATURE}"
    config, state = _gguf_node(tmp_path, hub, good, "tiny-secret.gguf")
    generate_key(tmp_path / "node.key")
    doc = yaml.safe_load(config.read_text())
    doc["control_plane"] = {"url": cp.url, "key_file": str(tmp_path / "node.key")}
    config.write_text(yaml.safe_dump(doc))
    env = node_env(tmp_path)
    said: list[str] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        out = _run(config, state, env, *args)
        said.extend([out.stdout, out.stderr])
        return out

    plan = json.loads(run("plan", "--json").stdout)
    assert plan["actions"][0]["source"] == (
        f"http://***@127.0.0.1:{port}/files/tiny-secret.gguf?***"
    )
    run("plan", "--out", str(tmp_path / "saved.json"))
    saved = tmp_path / "saved.json"
    said.append(saved.read_text())
    run("apply", str(saved), "--yes")  # the saved plan's redacted source is restored
    assert (tmp_path / "models" / "tiny-secret.gguf").exists(), said[-2:]
    doc["served_models"].append({"name": "missing.gguf", "backend": "llamacpp", "source": bad})
    config.write_text(yaml.safe_dump(doc))
    out = run("apply", "--yes")
    assert out.returncode == 1 and "404" in out.stdout + out.stderr
    run("watch", "--once")
    run("status", "--json")
    beats = [r["raw"] for r in cp.received()]
    assert any("missing.gguf" in b and "404" in b for b in beats), beats  # errors are sent...
    # The store keeps one copy of the file itself (the last valid infernet.yaml, to keep
    # serving it while the file is broken); every record derived from it is redacted.
    with sqlite3.connect(state / "state.db") as db:
        rows = [line for line in db.iterdump() if "'last_valid_config'" not in line]
    stored = "\n".join(rows).encode()
    others = [p for p in state.rglob("*") if p.is_file() and not p.name.startswith("state.db")]
    stored += b"".join(p.read_bytes() for p in others)
    stored += b"".join(p.read_bytes() for p in (tmp_path / "models").glob(".*") if p.is_file())
    for secret in (PASSWORD, SIGNATURE):  # ...without the secrets
        assert secret not in "".join(said), secret
        assert secret not in "".join(beats), secret
        assert secret.encode() not in stored, secret


# --------------------------------------------------------------------------- engines


def test_an_engine_with_a_relative_state_dir_records_its_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--state-dir state`` gave "Directory nonexistent" for the exit file: the code was lost."""
    monkeypatch.chdir(tmp_path)
    spec = EngineSpec(
        key="vllm:acme/x@main",
        kind="vllm",
        path=str(tmp_path),
        command="{python} -c 'import sys; sys.exit(3)'",
        served_name="x",
        fraction=0.5,
    )
    with Engines(Path("state/engines"), base_port=18_700) as engines:
        engines.start(spec)
        with pytest.raises(BackendError, match="exit code 3") as caught:
            engines.wait_ready(spec.key, 30)
    assert "nonexistent" not in str(caught.value)
