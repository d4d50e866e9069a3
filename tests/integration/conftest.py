"""Integration fixtures: a real Ollama-compatible server on loopback and the real CLI.

With ``INFERNET_TEST_OLLAMA_URL`` set, the same tests run against that real Ollama instead
(tests that need fault injection or a fake registry are skipped there, saying so).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers.controlplane_harness import ControlPlaneServer, start_control_plane
from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server

REAL_OLLAMA = os.environ.get("INFERNET_TEST_OLLAMA_URL")
INFERNET = str(Path(sys.executable).with_name("infernet"))

pytestmark = pytest.mark.integration


@dataclass
class Node:
    """A node under test: its config file, state dir, and the backend it talks to."""

    tmp: Path
    server: OllamaServer | None
    url: str
    registry: str
    models_dir: Path
    config: Path
    state: Path
    env: dict[str, str]

    def write_config(self, served: list[Any], **extra: Any) -> Path:
        """Write infernet.yaml pointing at this node's backend."""
        doc: dict[str, Any] = {"served_models": served}
        backends = {
            "ollama": {
                "url": self.url,
                "registry": self.registry,
                "models_dir": str(self.models_dir),
            }
        }
        doc["backends"] = backends
        doc.setdefault("budget", {"vram": "24GiB", "disk_reserve": "1GiB"})
        for k, v in extra.items():
            doc[k] = v
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        return self.config

    def run(self, *args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run the real ``infernet`` CLI against this node."""
        return subprocess.run(
            [INFERNET, *args, "-c", str(self.config), "--state-dir", str(self.state)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
            check=False,
            **kw,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start the CLI without waiting (for concurrency and kill tests)."""
        return subprocess.Popen(
            [INFERNET, *args, "-c", str(self.config), "--state-dir", str(self.state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def throttle(self, bandwidth: int) -> OllamaServer:
        """Swap in a fresh test server whose downloads crawl at ``bandwidth`` bytes/s."""
        if self.server is None:
            pytest.skip("needs the Ollama-compatible test server (bandwidth limit)")
        self.server.close()
        self.server = start_server(self.tmp / f"slow-{bandwidth}", bandwidth=bandwidth)
        self.url, self.registry = self.server.url, self.server.registry_url
        self.models_dir = self.server.models_dir
        return self.server

    def installed(self) -> set[str]:
        """Names /api/tags lists right now."""
        import httpx

        return {m["name"] for m in httpx.get(f"{self.url}/api/tags").json()["models"]}

    def loaded(self) -> dict[str, dict[str, Any]]:
        """``/api/ps`` by name."""
        import httpx

        return {m["name"]: m for m in httpx.get(f"{self.url}/api/ps").json()["models"]}


def start_server(where: Path, **kw: Any) -> OllamaServer:
    """The Ollama-compatible test server with the default catalogue, in its own folder."""
    return start_ollama_server(where, DEFAULT_CATALOGUE, **kw)


def needs_fake(node: Node) -> OllamaServer:
    """The fake server, or skip: a real Ollama can't inject faults."""
    if node.server is None:
        pytest.skip("needs the Ollama-compatible test server (fault injection / fake registry)")
    return node.server


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A fresh node: test server (or the real Ollama), empty state, isolated HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "INFERNET_"))}
    env.update(
        {
            "HOME": str(tmp_path / "home"),
            "INFERNET_RETRY_BACKOFF": "0.05",
            "INFERNET_LOCK_TIMEOUT": "2",
            "INFERNET_NO_NVML": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    (tmp_path / "home").mkdir()
    if REAL_OLLAMA:
        models = Path(os.environ.get("OLLAMA_MODELS", "~/.ollama/models")).expanduser()
        yield Node(
            tmp_path,
            None,
            REAL_OLLAMA,
            "https://registry.ollama.ai",
            models,
            tmp_path / "infernet.yaml",
            tmp_path / "state",
            env,
        )
        return
    server = start_server(tmp_path / "ollama")
    node = Node(
        tmp_path,
        server,
        server.url,
        server.registry_url,
        server.models_dir,
        tmp_path / "infernet.yaml",
        tmp_path / "state",
        env,
    )
    try:
        yield node
    finally:
        if node.server is not None:
            node.server.close()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlaneServer]:
    """The control-plane test server (verifies every signature like the real one)."""
    server = start_control_plane(tmp_path / "cp")
    try:
        yield server
    finally:
        server.close()


def keygen(node: Node) -> str:
    """``infernet keygen`` into the node's folder; returns the public key it printed."""
    key = node.tmp / "node.key"
    out = subprocess.run(
        [INFERNET, "keygen", "--out", str(key)],
        capture_output=True,
        text=True,
        env=node.env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    pubkey = out.stdout.strip().splitlines()[-1]
    assert len(pubkey) == 64 and int(pubkey, 16) >= 0
    return pubkey


def verified_beats(cp: ControlPlaneServer) -> list[dict[str, Any]]:
    """Heartbeats that verified and were accepted, with their pubkey and time."""
    return [
        r
        for r in cp.received()
        if r["path"] == "/api/v1/node/heartbeat" and r["pubkey"] and r["status"] == 200
    ]
