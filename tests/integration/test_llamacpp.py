"""llama.cpp against a real ``llama-server`` router, with sources served over loopback.

The router is the real binary (built once by ``tests/servers/llamabuild.py``); GGUF files are
tiny random-weight models written by ``tests/servers/tinygguf.py``; ``hf://`` and ``https://``
sources come from the local Hub (``tests/servers/hub_server.py``) through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import Node, keygen, verified_beats
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.servers.hub_harness import HubServer, start_hub_server, write_repo_file
from tests.servers.llamacpp_harness import Router, start_router
from tests.servers.tinygguf import corrupt_gguf, write_tiny_gguf

pytestmark = pytest.mark.integration

REPO = "acme/tiny-GGUF"
OLLAMA_SMALL = "smollm2:135m"


@dataclass
class Llama:
    """A llama.cpp node: router, its folder, the Hub serving sources, and the source files."""

    node: Node
    router: Router
    hub: HubServer
    models_dir: Path
    sources: Path  # file:// sources live here

    def gguf(self, name: str, **kw: Any) -> Path:
        """A tiny model as a file:// source (not in the served folder)."""
        path = self.sources / name
        write_tiny_gguf(path, name=name.removesuffix(".gguf"), **kw)
        return path

    def publish(self, name: str, **kw: Any) -> bytes:
        """A tiny model in the Hub repo and as a plain https file; its bytes."""
        path = self.gguf(name, **kw)
        data = path.read_bytes()
        write_repo_file(self.hub.root, REPO, name, data)
        (self.hub.files_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (self.hub.files_dir / name).write_bytes(data)
        return data

    def write(self, served: list[Any], **extra: Any) -> Path:
        """infernet.yaml with both backends pointed at this node's servers."""
        doc: dict[str, Any] = {
            "served_models": served,
            "backends": {
                "ollama": {
                    "url": self.node.url,
                    "registry": self.node.registry,
                    "models_dir": str(self.node.models_dir),
                },
                "llamacpp": {"models_dir": str(self.models_dir), "url": self.router.url},
            },
            "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
        }
        doc.update(extra)
        self.node.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.node.config

    def files(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir())

    def status(self, model: str) -> str | None:
        entry = self.router.model(model.removesuffix(".gguf"))
        return None if entry is None else str(entry["status"]["value"])


@pytest.fixture
def llama(node: Node, tmp_path: Path) -> Iterator[Llama]:
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


def _plan(node: Node) -> dict[str, Any]:
    out = node.run("plan", "--json")
    assert out.returncode in (0, 1), out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_mixed_file_plans_applies_pins_and_heartbeats(
    llama: Llama, node: Node, cp: ControlPlaneServer
) -> None:
    local = llama.gguf("tiny-a.gguf")
    llama.publish("tiny-b.gguf", hidden=128, f16=True)
    data_c = llama.publish("tiny-c.gguf", hidden=96, layers=4, ff=192, heads=6, kv_heads=3)
    served = [
        OLLAMA_SMALL,
        {"name": "tiny-a.gguf", "backend": "llamacpp", "source": local.as_uri(), "keep_alive": -1},
        {"name": "tiny-b.gguf", "backend": "llamacpp", "source": f"hf://{REPO}/tiny-b.gguf"},
        {
            "name": "tiny-c.gguf",
            "backend": "llamacpp",
            "source": llama.hub.file_url("tiny-c.gguf"),
            "sha256": hashlib.sha256(data_c).hexdigest(),
            "advertise_as": "tiny-c",
        },
    ]
    pubkey = keygen(node)
    llama.write(
        served,
        control_plane={
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "node_id": "mixed",
        },
    )

    plan = _plan(node)
    assert plan["errors"] == [], plan["errors"]
    pulls = {a["model"]: a for a in plan["actions"] if a["op"] == "pull"}
    assert set(pulls) == {OLLAMA_SMALL, "tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"}
    assert pulls["tiny-a.gguf"]["download_bytes"] == local.stat().st_size
    assert pulls["tiny-c.gguf"]["download_bytes"] == len(data_c)
    assert pulls["tiny-b.gguf"]["source"] == f"hf://{REPO}/tiny-b.gguf"
    assert [a["model"] for a in plan["actions"] if a["op"] == "pin"] == ["tiny-a.gguf"]
    assert llama.files() == [], "plan must not download"

    out = node.run("apply", "--yes", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert llama.files() == ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]
    assert (llama.models_dir / "tiny-c.gguf").read_bytes() == data_c
    assert llama.status("tiny-a.gguf") == "loaded"  # pinned through the router
    assert llama.status("tiny-b.gguf") == "unloaded"  # listed after the rescan, not loaded

    beats = verified_beats(cp)
    assert beats and beats[-1]["pubkey"] == pubkey
    served_now = beats[-1]["body"]["specs"]["served_models"]
    assert served_now == [OLLAMA_SMALL, "tiny-a.gguf", "tiny-b.gguf", "tiny-c"]

    again = _plan(node)
    assert again["actions"] == [] and again["errors"] == [], again
    estimates = {e["model"]: e for e in again["budget"]["estimates"]}
    assert estimates["tiny-a.gguf"]["source"] == "measured"  # the child's memory, recorded
    # ...and the metadata estimate beside it, so a fleet can see where estimates drift
    assert estimates["tiny-a.gguf"]["measured_bytes"] == estimates["tiny-a.gguf"]["bytes"]
    assert estimates["tiny-a.gguf"]["estimated_bytes"] > 0
    assert estimates["tiny-b.gguf"]["source"] == "metadata"

    model_list = node.run("model", "list", "--json")
    rows = {r["model"]: r for r in json.loads(model_list.stdout)["models"]}
    assert rows["tiny-a.gguf"]["backend"] == "llamacpp"
    assert rows["tiny-a.gguf"]["status"] == "pinned"
    assert rows["tiny-b.gguf"]["status"] == "installed"


def test_download_is_invisible_until_complete_and_resumes(llama: Llama, node: Node) -> None:
    data = llama.publish("tiny-c.gguf", hidden=256, layers=4, ff=512)
    cut = len(data) // 3
    # The plan's header read (256 KiB) takes one of the two; the download takes the other.
    llama.hub.fault("*/tiny-c.gguf", "cut", after_bytes=cut, times=2)
    llama.hub.fault("*/tiny-c.gguf", "slow", rate=len(data))  # about a second in all
    llama.write(
        [{"name": "tiny-c.gguf", "backend": "llamacpp", "source": f"hf://{REPO}/tiny-c.gguf"}]
    )
    seen: list[list[str]] = []
    listed: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(llama.files())
            listed.append({m["id"] for m in llama.router.models(reload=True)})
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = node.run("apply", "--yes")
    finally:
        stop.set()
        watcher.join()
    assert out.returncode == 0, out.stdout + out.stderr
    during = [names for names in seen if names and "tiny-c.gguf" not in names]
    assert any(".tiny-c.gguf.part" in names for names in during), seen
    assert all(not n.endswith(".gguf") for names in during for n in names)
    assert all(ids <= {"tiny-c"} for ids in listed)
    assert (llama.models_dir / "tiny-c.gguf").read_bytes() == data
    gets = [r for r in llama.hub.requests() if r["method"] == "GET" and "tiny-c" in r["path"]]
    ranges = [r["range"] for r in gets if r["range"] and not r["range"].startswith("bytes=0-")]
    assert ranges, f"the retry must resume with a Range: {gets}"
    assert int(ranges[-1].removeprefix("bytes=").split("-")[0]) > 0
    assert llama.files() == ["tiny-c.gguf"], "no partial left behind"


def test_checksum_mismatch_discards_the_download(llama: Llama, node: Node) -> None:
    llama.publish("tiny-b.gguf")
    llama.write(
        [
            {
                "name": "tiny-b.gguf",
                "backend": "llamacpp",
                "source": llama.hub.file_url("tiny-b.gguf"),
                "sha256": "ab" * 32,
            }
        ]
    )
    out = node.run("apply", "--yes")
    assert out.returncode != 0
    assert "checksum mismatch" in out.stdout + out.stderr
    assert "ab" * 32 in out.stdout + out.stderr
    assert llama.files() == []


def test_missing_source_is_a_plan_error_naming_the_url(llama: Llama, node: Node) -> None:
    url = llama.hub.file_url("nope.gguf")
    llama.publish("tiny-a.gguf")  # the repository exists; the file doesn't
    llama.write(
        [
            {"name": "nope.gguf", "backend": "llamacpp", "source": url},
            {"name": "gone.gguf", "backend": "llamacpp", "source": f"hf://{REPO}/gone.gguf"},
            {"name": "norepo.gguf", "backend": "llamacpp", "source": "hf://acme/missing/x.gguf"},
        ]
    )
    out = node.run("plan")
    assert out.returncode == 1
    assert f"source {url}: 404 Not Found" in out.stderr + out.stdout
    assert f"no file gone.gguf in {REPO}@main" in out.stderr + out.stdout
    assert "repository acme/missing not found" in out.stdout
    assert llama.files() == []


def test_damaged_gguf_is_not_advertised_and_named(llama: Llama, node: Node) -> None:
    good = llama.gguf("tiny-a.gguf")
    (llama.models_dir / "tiny-a.gguf").write_bytes(good.read_bytes())
    corrupt_gguf(llama.models_dir / "broken.gguf")
    llama.write(
        [
            {"name": "tiny-a.gguf", "backend": "llamacpp", "keep_alive": "10m"},
            {"name": "broken.gguf", "backend": "llamacpp", "keep_alive": -1},
        ]
    )
    plan = _plan(node)
    assert plan["advertised"] == ["tiny-a.gguf"]
    assert any("keep_alive 600s can't be set per model on llama.cpp" in w for w in plan["warnings"])
    assert any("broken.gguf" in w and "not advertised" in w for w in plan["warnings"])
    assert str(llama.models_dir / "broken.gguf") in " ".join(plan["warnings"])


def test_damaged_file_with_a_source_is_downloaded_again(llama: Llama, node: Node) -> None:
    data = llama.publish("tiny-b.gguf")
    corrupt_gguf(llama.models_dir / "tiny-b.gguf")
    llama.write(
        [
            {
                "name": "tiny-b.gguf",
                "backend": "llamacpp",
                "source": llama.hub.file_url("tiny-b.gguf"),
            }
        ]
    )
    plan = _plan(node)
    assert [(a["op"], a["model"]) for a in plan["actions"]] == [("pull", "tiny-b.gguf")]
    assert "damaged" in plan["actions"][0]["reason"]
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (llama.models_dir / "tiny-b.gguf").read_bytes() == data


def test_removal_unloads_deletes_and_rescans(llama: Llama, node: Node) -> None:
    a, b = llama.gguf("tiny-a.gguf"), llama.gguf("tiny-b.gguf", seed=1)
    both = [
        {"name": "tiny-a.gguf", "backend": "llamacpp", "source": a.as_uri(), "keep_alive": -1},
        {"name": "tiny-b.gguf", "backend": "llamacpp", "source": b.as_uri(), "keep_alive": -1},
    ]
    llama.write(both)
    assert node.run("apply", "--yes").returncode == 0
    assert llama.status("tiny-b.gguf") == "loaded"
    child = llama.router.child("tiny-b")
    assert child is not None
    llama.write(both[:1])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stdout + out.stderr
    assert llama.files() == ["tiny-a.gguf"]
    assert llama.router.model("tiny-b") is None  # the router's list was rescanned
    assert not child.is_running() or child.status() == "zombie"
    assert llama.status("tiny-a.gguf") == "loaded"


def test_pinned_model_is_loaded_again_after_a_router_restart(llama: Llama, node: Node) -> None:
    a = llama.gguf("tiny-a.gguf")
    llama.write(
        [
            {
                "name": "tiny-a.gguf",
                "backend": "llamacpp",
                "source": a.as_uri(),
                "keep_alive": "forever",
            }
        ]
    )
    assert node.run("apply", "--yes").returncode == 0
    llama.router.stop()
    llama.router.start()
    assert llama.status("tiny-a.gguf") == "unloaded"
    plan = _plan(node)
    assert [(x["op"], x["model"]) for x in plan["actions"]] == [("pin", "tiny-a.gguf")]
    assert node.run("apply", "--yes").returncode == 0
    assert llama.status("tiny-a.gguf") == "loaded"


def test_router_down_inventory_still_works_pins_fail_clearly(llama: Llama, node: Node) -> None:
    a = llama.gguf("tiny-a.gguf")
    (llama.models_dir / "tiny-a.gguf").write_bytes(a.read_bytes())
    llama.router.stop()
    llama.write([{"name": "tiny-a.gguf", "backend": "llamacpp", "keep_alive": -1}])
    plan = _plan(node)
    assert plan["errors"] == []
    assert [(x["op"], x["model"]) for x in plan["actions"]] == [("pin", "tiny-a.gguf")]
    assert plan["advertised"] == []
    assert any("not answering" in w and "not advertised" in w for w in plan["warnings"])
    out = node.run("apply", "--yes")
    assert out.returncode == 1
    assert f"llama-server router at {llama.router.url} is not answering" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert llama.files() == ["tiny-a.gguf"], "a failed pin never loses the model"


def test_models_dir_that_does_not_exist_is_a_plan_error(llama: Llama, node: Node) -> None:
    llama.models_dir.rmdir()
    llama.write([{"name": "tiny-a.gguf", "backend": "llamacpp"}])
    out = node.run("plan")
    assert out.returncode == 1
    assert f"backends.llamacpp.models_dir {llama.models_dir} does not exist" in out.stdout
    assert "mkdir -p" in out.stdout


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` unwritable: permission bits for a user; for root (who writes through them) a
    read-only tmpfs mounted over it, or a skip where mounting isn't allowed."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"root writes through permission bits and can't mount here: {mounted.stderr}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_models_dir_fails_the_download_clearly(llama: Llama, node: Node) -> None:
    a = llama.gguf("tiny-a.gguf")
    llama.write([{"name": "tiny-a.gguf", "backend": "llamacpp", "source": a.as_uri()}])
    with _read_only(llama.models_dir):
        plan = _plan(node)
        assert any("not writable" in w for w in plan["warnings"])
        out = node.run("apply", "--yes")
        assert out.returncode == 1
        assert f"can't write to backends.llamacpp.models_dir {llama.models_dir}" in (
            out.stdout + out.stderr
        )
        assert "Traceback" not in out.stderr


def test_hf_revision_and_gated_repo_with_token(llama: Llama, node: Node, tmp_path: Path) -> None:
    from tests.servers.hub_harness import gate_repo

    a = llama.gguf("tiny-a.gguf")
    b = llama.gguf("tiny-b.gguf", seed=7)
    root = tmp_path / "gated-root"
    write_repo_file(root, "acme/pinned", "m.gguf", a.read_bytes(), revision="v1")
    write_repo_file(root, "acme/pinned", "m.gguf", b.read_bytes())  # main moved on
    gate_repo(root, "acme/pinned")
    with start_hub_server(tmp_path / "gated", root, token="hf_secret") as hub:
        node.env.update(hub.client_env(tmp_path / "hf-home-2"))
        llama.write(
            [{"name": "v1.gguf", "backend": "llamacpp", "source": "hf://acme/pinned@v1/m.gguf"}]
        )
        out = node.run("plan")
        assert out.returncode == 1
        assert "acme/pinned is gated" in out.stdout and "HF_TOKEN" in out.stdout
        node.env["HF_TOKEN"] = "hf_secret"
        node.env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
        hub.reset()
        out = node.run("apply", "--yes")
        assert out.returncode == 0, out.stdout + out.stderr
        assert (llama.models_dir / "v1.gguf").read_bytes() == a.read_bytes()
        assert all(r["auth"] for r in hub.requests() if "/resolve/" in r["path"])
