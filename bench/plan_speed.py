"""Benchmark: ``infernet plan`` on a node with 100 installed models and nothing to change.

The file lists 50 of them (the most a heartbeat may advertise); the other 50 were pulled by
hand, so ``prune: managed`` leaves them alone. Nothing needs changing.

Target (issue 2): at most 2x the wall time of a bare Python script that only lists the models
with the ``ollama`` client. Both run as fresh processes (start-up and imports count: that is
what an operator waits for), against the same Ollama-compatible test server, alternating, after
one warm-up run each; the figure is the median of ``--runs`` runs.

    .venv/bin/python -m bench.plan_speed [--models 100] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
INFERNET = str(Path(sys.executable).with_name("infernet"))
DESIRED = 50  # the control plane's cap on served_models; the other installed ones are unmanaged


def _catalogue(n: int) -> dict[str, Any]:
    return {
        "models": {
            f"bench{i:04d}:1b": {
                "params": "1.2B",
                "parameter_count": 1_200_000_000,
                "family": "llama",
                "quantization": "Q4_K_M",
                "weights_size": 4096,
                "context_length": 8192,
                "block_count": 16,
                "head_count": 32,
                "head_count_kv": 8,
                "embedding_length": 2048,
            }
            for i in range(n)
        }
    }


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return elapsed


def measure(models: int, runs: int) -> dict[str, float]:
    """Median seconds of the bare listing script and of ``infernet plan``."""
    sys.path.insert(0, str(ROOT))
    from tests.servers.harness import start_ollama_server

    with tempfile.TemporaryDirectory(prefix="infernet-bench-") as tmp:
        work = Path(tmp)
        catalogue = _catalogue(models)
        server = start_ollama_server(work / "ollama", catalogue)
        try:
            import ollama

            client = ollama.Client(host=server.url)
            for name in catalogue["models"]:
                client.pull(name)
            config = work / "infernet.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "served_models": list(catalogue["models"])[:DESIRED],
                        "backends": {
                            "ollama": {
                                "url": server.url,
                                "registry": server.registry_url,
                                "models_dir": str(server.models_dir),
                            }
                        },
                        "budget": {"vram": "80GiB", "disk_reserve": "1GiB"},
                    }
                )
            )
            env = {**os.environ, "INFERNET_NO_NVML": "1"}
            script = f"import ollama; print(len(ollama.Client(host={server.url!r}).list().models))"
            bare = [sys.executable, "-c", script]
            plan = [
                INFERNET,
                "plan",
                "--detailed-exitcode",
                "-c",
                str(config),
                "--state-dir",
                str(work / "state"),
            ]
            _time(bare, env)
            _time(plan, env)  # warm-up fills the show cache, as on any node after its first plan
            bare_t, plan_t = [], []
            for _ in range(runs):
                bare_t.append(_time(bare, env))
                plan_t.append(_time(plan, env))
        finally:
            server.close()
    return {"bare": statistics.median(bare_t), "plan": statistics.median(plan_t)}


def main() -> int:
    """Print the figures as a RESULTS.md row; exit 1 when the target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    result = measure(args.models, args.runs)
    ratio = result["plan"] / result["bare"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"| {time.strftime('%Y-%m-%d')} | {machine} | {args.models} models | "
        f"bare list {result['bare'] * 1000:.0f} ms | infernet plan {result['plan'] * 1000:.0f} ms"
        f" | ratio {ratio:.2f} (target ≤ 2.00) |"
    )
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
