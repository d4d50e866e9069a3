"""The README's main job: plan → apply → status → plan (no changes) → removal, end to end.

It drives the real ``infernet`` CLI. The backend is a real Ollama when ``OLLAMA_HOST`` points at
one that answers (small real models are downloaded: ~320 MB), else the Ollama-compatible test
server from ``tests/servers`` (the same one the integration tests use), started on loopback and
stopped at the end. Until the llama.cpp backend lands, that server is the stand-in for a real
backend on a machine without Ollama; the output says which one was used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
INFERNET = str(Path(sys.executable).with_name("infernet"))
MODELS = ["smollm2:135m", "all-minilm:latest"]


def _real_ollama() -> str | None:
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        return None
    url = host if "://" in host else f"http://{host}"
    try:
        httpx.get(f"{url}/api/version", timeout=2).raise_for_status()
    except httpx.HTTPError:
        print(f"OLLAMA_HOST={host} does not answer; using the test server instead")
        return None
    return url


def _step(title: str, *args: str, config: Path, state: Path) -> int:
    print(f"\n$ infernet {' '.join(args)}    # {title}", flush=True)
    done = subprocess.run(
        [INFERNET, *args, "-c", str(config), "--state-dir", str(state)], check=False
    )
    print(f"(exit {done.returncode})", flush=True)
    return done.returncode


def main() -> int:
    """Run the demo; exit non-zero when a step does not do what it should."""
    from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

    with tempfile.TemporaryDirectory(prefix="infernet-demo-") as tmp:
        work = Path(tmp)
        url = _real_ollama()
        server = None
        if url is None:
            server = start_ollama_server(work / "ollama", DEFAULT_CATALOGUE, bandwidth=400_000)
            url, registry, models_dir = server.url, server.registry_url, str(server.models_dir)
            print(f"Backend: Ollama-compatible test server at {url} (no Ollama on this machine)")
        else:
            registry, models_dir = "https://registry.ollama.ai", "~/.ollama/models"
            print(f"Backend: the real Ollama at {url}")
        config, state = work / "infernet.yaml", work / "state"
        config.write_text(
            "# Demo node: two small models, the embedding one pinned in memory.\n"
            "served_models:\n"
            f"  - {MODELS[0]}\n"
            f"  - name: {MODELS[1]}\n"
            "    keep_alive: forever   # pinned\n"
            "backends:\n"
            f"  ollama: {{url: '{url}', registry: '{registry}', models_dir: '{models_dir}'}}\n"
            "budget: {vram: 8GiB, disk_reserve: 1GiB}\n"
        )
        print(f"\n--- {config}\n{config.read_text()}---")
        try:
            checks = [
                _step("check the file", "validate", config=config, state=state) == 0,
                _step("what would change", "plan", config=config, state=state) == 0,
                _step(
                    "do it, with progress",
                    "apply",
                    "--yes",
                    "--verbose",
                    config=config,
                    state=state,
                )
                == 0,
                _step("where the node stands", "status", config=config, state=state) == 0,
                _step(
                    "idempotent: nothing left to do",
                    "plan",
                    "--detailed-exitcode",
                    config=config,
                    state=state,
                )
                == 0,
                _step(
                    "remove one model by name",
                    "model",
                    "remove",
                    MODELS[0],
                    config=config,
                    state=state,
                )
                == 0,
                _step("the inventory now", "model", "list", config=config, state=state) == 0,
            ]
        finally:
            if server is not None:
                server.close()
        ok = all(checks)
        print("\nDemo " + ("succeeded: every step did what it should." if ok else "FAILED."))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
