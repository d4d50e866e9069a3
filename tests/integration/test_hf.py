"""vLLM / SGLang / MAX models: the hub cache as inventory, engines as the way they are served.

Downloads come from the local Hub (``tests/servers/hub_server.py``) through ``HF_ENDPOINT``; the
engine is the OpenAI-compatible stand-in (``tests/servers/fake_engine.py``) launched through
the same command template a real vLLM would be, so what is under test is the supervision.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.integration.conftest import Node, keygen, verified_beats
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.servers.hub_harness import HubServer, start_hub_server, write_repo_file

pytestmark = pytest.mark.integration

REPO = "acme/tiny-llm"
OLLAMA_SMALL = "smollm2:135m"
ENGINE = (
    f"{sys.executable} -m tests.servers.fake_engine serve {{path}} "
    "--served-model-name {advertise_as} --port {port} --gpu-memory-utilization {fraction}"
)
CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 2048,
}


def safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A real safetensors file of zeros: 8-byte header length, JSON header, data."""
    header: dict[str, Any] = {}
    offset = 0
    sizes = {"F16": 2, "BF16": 2, "F32": 4}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def publish_repo(root: Path, repo: str = REPO, *, revision: str = "main", rows: int = 64) -> int:
    """A tiny model repo in the Hub; the bytes the allow patterns take."""
    files = {
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": safetensors({"w": ("F16", [rows, 64]), "b": ("F32", [64])}),
        "pytorch_model.bin": b"\0" * 5000,  # not for vLLM: never downloaded
        "README.md": b"# tiny\n",
    }
    for name, data in files.items():
        write_repo_file(root, repo, name, data, revision=revision)
    return sum(len(d) for n, d in files.items() if n.endswith((".json", ".safetensors")))


@dataclass
class Hf:
    node: Node
    hub: HubServer
    cache: Path
    port: int

    def write(self, served: list[Any], **extra: Any) -> None:
        doc: dict[str, Any] = {
            "served_models": served,
            "backends": {
                "ollama": {
                    "url": self.node.url,
                    "registry": self.node.registry,
                    "models_dir": str(self.node.models_dir),
                },
                "hf": {
                    "cache_dir": str(self.cache),
                    "url": f"http://127.0.0.1:{self.port}",
                    "gpu_memory_utilization": 0.3,
                    "commands": {"vllm": ENGINE, "sglang": ENGINE},
                },
            },
            "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
        }
        doc.update(extra)
        self.node.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def engines(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "name"]):
            cmd = proc.info.get("cmdline") or []
            if proc.info.get("name") == "sh":  # the supervising shell around each engine
                continue
            if "tests.servers.fake_engine" in cmd and str(self.cache) in " ".join(cmd):
                found.append(proc)
        return found

    def served(self, port: int | None = None) -> list[str]:
        url = f"http://127.0.0.1:{port or self.port}/v1/models"
        return [m["id"] for m in httpx.get(url, timeout=5).json()["data"]]

    def snapshots(self) -> list[str]:
        folder = self.cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
        if not folder.is_dir():
            return []
        return sorted(p.name for snap in folder.iterdir() for p in snap.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hf(node: Node, tmp_path: Path) -> Iterator[Hf]:
    hub = start_hub_server(tmp_path / "hub", tmp_path / "hub-root")
    node.env.update(hub.client_env(tmp_path / "hf-home"))
    node.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # engines run elsewhere
    env_cache = tmp_path / "hf-cache"
    h = Hf(node, hub, env_cache, free_port())
    try:
        yield h
    finally:
        for proc in h.engines():
            with_group = [proc, *proc.children(recursive=True)]
            for p in with_group:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        hub.close()


def _plan(node: Node) -> dict[str, Any]:
    out = node.run("plan", "--json")
    assert out.returncode in (0, 1) and out.stdout, out.stdout + out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_mixed_ollama_and_vllm_plan_apply_heartbeat(
    hf: Hf, node: Node, cp: ControlPlaneServer
) -> None:
    wanted = publish_repo(hf.hub.root)
    keygen(node)
    hf.write(
        [OLLAMA_SMALL, {"name": REPO, "backend": "vllm", "advertise_as": "tiny-llm"}],
        control_plane={"url": cp.url, "key_file": str(node.tmp / "node.key"), "node_id": "hf"},
    )
    plan = _plan(node)
    assert plan["errors"] == [], plan["errors"]
    ops = [(a["op"], a["model"], a["revision"]) for a in plan["actions"]]
    assert ("pull", REPO, "main") in ops and ("pin", REPO, "main") in ops  # name as written
    pull = next(a for a in plan["actions"] if a["model"] == REPO and a["op"] == "pull")
    assert pull["download_bytes"] == wanted  # weights, config, tokenizer: not the .bin
    assert pull["source"] == f"hf://{REPO}@main"
    pin = next(a for a in plan["actions"] if a["op"] == "pin")
    assert pin["advertise_as"] == "tiny-llm"
    assert hf.snapshots() == [], "plan downloads nothing"

    out = node.run("apply", "--yes", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert hf.snapshots() == ["config.json", "model.safetensors", "tokenizer.json"]
    assert hf.served() == ["tiny-llm"]
    assert len(hf.engines()) == 1
    beats = verified_beats(cp)
    assert beats[-1]["body"]["specs"]["served_models"] == [OLLAMA_SMALL, "tiny-llm"]

    again = _plan(node)
    assert again["actions"] == [] and again["errors"] == [], again


def test_removal_stops_the_engine_before_deleting(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    hf.write([OLLAMA_SMALL, {"name": REPO, "backend": "vllm"}])
    assert node.run("apply", "--yes").returncode == 0
    (engine,) = hf.engines()
    hf.write([OLLAMA_SMALL])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert hf.snapshots() == []
    assert hf.engines() == []


def test_engine_that_dies_is_started_again(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    hf.write([{"name": REPO, "backend": "vllm"}])
    assert node.run("apply", "--yes").returncode == 0
    (engine,) = hf.engines()
    engine.kill()
    engine.wait(10)
    plan = _plan(node)
    assert [(a["op"], a["model"]) for a in plan["actions"]] == [("pin", REPO)]
    assert plan["advertised"] == [REPO]  # after the apply; not now:
    assert node.run("apply", "--yes").returncode == 0
    assert hf.served() == [REPO]


def test_engine_exiting_at_start_fails_with_its_log(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    node.env["FAKE_ENGINE_EXIT_AT_START"] = "3"
    hf.write([{"name": REPO, "backend": "vllm"}])
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "exit" in text and ".log" in text
    assert hf.snapshots(), "the download stays; only serving failed"
    status = json.loads(node.run("status", "--json").stdout)
    (engine,) = status["engines"]
    assert engine["state"] == "exited" and engine["exit_code"] == 3
    assert engine["log_tail"], "status keeps the engine's last words"
    assert status["advertised"] == []


def test_port_in_use_moves_the_engine_to_the_next_port(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    hf.write([{"name": REPO, "backend": "vllm"}])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", hf.port))
        squatter.listen()
        out = node.run("apply", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        (engine,) = hf.engines()
        args = engine.cmdline()
        port = int(args[args.index("--port") + 1])
        assert port != hf.port
        assert hf.served(port) == [REPO]


def test_missing_revision_and_repo_are_plan_errors(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    hf.write(
        [
            {"name": REPO, "backend": "vllm", "revision": "v9"},
            {"name": "acme/nothing", "backend": "sglang"},
        ]
    )
    out = node.run("plan")
    assert out.returncode == 1
    assert f"revision not found in {REPO}@v9" in out.stdout
    assert "repository acme/nothing not found" in out.stdout


def test_cut_download_is_never_counted_installed_and_resumes(hf: Hf, node: Node) -> None:
    # 12 MiB of weights: huggingface_hub keeps whole 10 MiB chunks of a cut download
    publish_repo(hf.hub.root, rows=98_304)
    # cut before any whole chunk: every try restarts and fails; nothing counts as installed
    hf.hub.fault("*/model.safetensors", "cut", after_bytes=1 << 20, times=1000)
    hf.write([{"name": REPO, "backend": "vllm"}])
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    plan = _plan(node)
    assert ("pull", REPO) in [(a["op"], a["model"]) for a in plan["actions"]]
    assert plan["advertised"] == [REPO]  # once pulled; nothing is served now
    hf.hub.reset()
    # cut after the first 10 MiB chunk: the next try asks for the rest only
    hf.hub.fault("*/model.safetensors", "cut", after_bytes=11 << 20, times=1000)
    assert node.run("apply", "--yes").returncode == 0
    assert "model.safetensors" in hf.snapshots()
    gets = [
        r
        for r in hf.hub.requests()
        if r["method"] == "GET" and r["path"].endswith("model.safetensors")
    ]
    assert any((r["range"] or "").startswith("bytes=10485760-") for r in gets), gets


def test_foreign_engine_is_observed_never_touched(hf: Hf, node: Node, tmp_path: Path) -> None:
    import subprocess

    publish_repo(hf.hub.root)
    hf.write([{"name": REPO, "backend": "vllm"}])
    assert node.run("apply", "--yes").returncode == 0
    (ours,) = hf.engines()
    ours.kill()
    ours.wait(10)
    snapshot = tmp_path / "foreign-model"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    foreign = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.servers.fake_engine",
            "serve",
            str(snapshot),
            "--served-model-name",
            REPO,
            "--port",
            str(hf.port),
            "--gpu-memory-utilization",
            "0.1",
        ],
        env={**os.environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                if hf.served() == [REPO]:
                    break
            except httpx.HTTPError:
                pass
            import time

            time.sleep(0.05)
        plan = _plan(node)
        assert plan["actions"] == [], plan["actions"]
        assert plan["advertised"] == [REPO]
        hf.write([{"name": OLLAMA_SMALL}])
        plan = _plan(node)
        assert not [a for a in plan["actions"] if a["op"] == "remove"]
        assert any("did not start" in w for w in plan["warnings"])
        assert foreign.poll() is None
    finally:
        foreign.kill()
        foreign.wait()


def test_engine_claim_counts_against_the_budget(hf: Hf, node: Node) -> None:
    publish_repo(hf.hub.root)
    hf.write(
        [
            {"name": OLLAMA_SMALL, "keep_alive": -1, "vram": "4GiB"},
            {"name": REPO, "backend": "vllm", "keep_alive": "5m"},
        ]
    )
    doc = yaml.safe_load(node.config.read_text())
    doc["backends"]["hf"]["gpu_memory_utilization"] = 0.9  # 21.6 GiB of the 24 GiB budget
    node.config.write_text(yaml.safe_dump(doc))
    plan = _plan(node)
    estimates = {e["model"]: e for e in plan["budget"]["estimates"]}
    assert estimates[REPO]["source"] == "claim"
    assert estimates[REPO]["bytes"] == int(24 * 2**30 * 0.9)
    assert estimates[REPO]["pinned"] is True
    assert any(f"{REPO}: keep_alive has no effect on vllm" in w for w in plan["warnings"])
    assert plan["budget"]["fits"] is False
    assert any("pinned models need 25.6 GiB" in e and REPO in e for e in plan["errors"])
    assert hf.snapshots() == [], "a refused plan downloads nothing"
    out = node.run("apply", "--yes")
    assert out.returncode == 1 and hf.engines() == []


@pytest.mark.timeout(90)
def test_watch_restarts_an_engine_that_dies(hf: Hf, node: Node) -> None:
    import subprocess
    import time

    from tests.integration.conftest import INFERNET

    publish_repo(hf.hub.root)
    hf.write([{"name": REPO, "backend": "vllm"}])
    log = (node.tmp / "watch.log").open("w")
    watch = subprocess.Popen(
        [INFERNET, "watch", "-c", str(node.config), "--state-dir", str(node.state), "--tick", "1"],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=node.env,
        stdin=subprocess.DEVNULL,
    )
    try:

        def engines_up(n: int) -> list[psutil.Process]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = hf.engines()
                with contextlib.suppress(httpx.HTTPError):  # up, not listening yet
                    if len(found) == n and hf.served() == [REPO]:
                        return found
                time.sleep(0.1)
            raise AssertionError(
                f"no engine serving {REPO}: {(node.tmp / 'watch.log').read_text()}"
            )

        (first,) = engines_up(1)
        first.kill()
        first.wait(10)
        (second,) = engines_up(1)
        assert second.pid != first.pid
    finally:
        watch.terminate()
        watch.wait(20)
        log.close()
    # the daemon stopped; the engine it started keeps serving (KillMode=process semantics)
    assert hf.served() == [REPO]


def _tree_rss(engine: psutil.Process) -> int:
    """psutil's own reading of an engine's process tree: the supervising shell and below."""
    shell = engine.parent()
    assert shell is not None and shell.name() == "sh"
    return sum(p.memory_info().rss for p in [shell, *shell.children(recursive=True)])


def test_plan_shows_the_running_engines_resident_memory(hf: Hf, node: Node) -> None:
    other = "acme/tiny-two"
    publish_repo(hf.hub.root)
    publish_repo(hf.hub.root, other)
    node.env["FAKE_ENGINE_WORKERS"] = "2"  # worker processes, like vLLM's EngineCore
    hf.write([{"name": REPO, "backend": "vllm"}, {"name": other, "backend": "vllm"}])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    engines = {
        name: p
        for p in hf.engines()
        for name in (REPO, other)
        if f"models--{name.replace('/', '--')}" in " ".join(p.cmdline())
    }
    assert set(engines) == {REPO, other}
    # The second engine dies: its model is installed, not running, so it has no RSS.
    stopped = engines[other]
    for p in [*stopped.children(recursive=True), stopped]:
        p.kill()
    stopped.wait(10)

    plan = _plan(node)
    estimates = {e["model"]: e for e in plan["budget"]["estimates"]}
    running = estimates[REPO]
    assert running["source"] == "claim" and running["bytes"] == int(24 * 2**30 * 0.3)
    seen = _tree_rss(engines[REPO])
    assert running["rss_bytes"] is not None, running
    assert 0.5 * seen <= running["rss_bytes"] <= 1.5 * seen, (running["rss_bytes"], seen)
    # summed over the tree: more than the engine process alone holds
    assert running["rss_bytes"] > engines[REPO].memory_info().rss
    assert estimates[other]["rss_bytes"] is None
    assert [(a["op"], a["model"]) for a in plan["actions"]] == [("pin", other)]  # restart it

    text = node.run("plan", "-v").stdout
    line = next(ln for ln in text.splitlines() if ln.startswith(REPO))
    assert "engine RSS" in line, text
