"""Benchmarks for ``infernet watch`` (issue 4).

1. Edit → heartbeat latency for changes that need no download: each save flips a model's
   ``advertise_as`` and another's pin. Latency is from the moment the new file is renamed into
   place to the moment the control-plane test server receives the first verified heartbeat
   whose ``specs.reconciler.config_sha256`` is the new file's. Targets: p50 ≤ 300 ms, p99 ≤ 1 s.
2. The idle daemon: CPU share of one core and RSS over ``--idle`` seconds with nothing to do
   (heartbeat every 30 s). Targets: ≤ 1 % of a core, ≤ 80 MB RSS.

    .venv/bin/python -m bench.watch_bench [--edits 60] [--idle 120]
"""

from __future__ import annotations

import argparse
import hashlib
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


def _write(config: Path, doc: dict[str, Any]) -> str:
    text = yaml.safe_dump(doc, sort_keys=False)
    tmp = config.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, config)
    return hashlib.sha256(text.encode()).hexdigest()


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of ``pid`` from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return cpu, rss


def _wait_beat(cp: Any, sha: str, since: int, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in cp.received()[since:]:
            specs = (r.get("body") or {}).get("specs") or {}
            ext = specs.get("reconciler") or {}
            if r["status"] == 200 and r["pubkey"] and ext.get("config_sha256") == sha:
                return float(r["time"])
        time.sleep(0.005)
    raise SystemExit(f"no heartbeat for config {sha[:12]} within {timeout}s")


def main() -> int:
    """Run both, print RESULTS.md rows; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--idle", type=float, default=120.0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from reconciler.controlplane.identity import generate_key
    from tests.servers.controlplane_harness import start_control_plane
    from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

    with tempfile.TemporaryDirectory(prefix="infernet-watch-bench-") as tmp:
        work = Path(tmp)
        generate_key(work / "node.key")
        with (
            start_ollama_server(work / "ollama", DEFAULT_CATALOGUE) as server,
            start_control_plane(work / "cp") as cp,
        ):
            config = work / "infernet.yaml"
            base: dict[str, Any] = {
                "backends": {
                    "ollama": {
                        "url": server.url,
                        "registry": server.registry_url,
                        "models_dir": str(server.models_dir),
                    }
                },
                "budget": {"vram": "24GiB", "disk_reserve": "1GiB"},
                "control_plane": {
                    "url": cp.url,
                    "key_file": str(work / "node.key"),
                    "heartbeat_interval": "30s",
                },
            }

            def doc(i: int) -> dict[str, Any]:
                served = [
                    {"name": "smollm2:135m", "advertise_as": f"smollm2-v{i % 2}"},
                    {"name": "all-minilm:latest", "keep_alive": "forever" if i % 2 else "5m"},
                ]
                return {"served_models": served, **base}

            _write(config, doc(0))
            env = {**os.environ, "INFERNET_NO_NVML": "1"}
            log = (work / "watch.log").open("w")
            proc = subprocess.Popen(
                [INFERNET, "watch", "-c", str(config), "--state-dir", str(work / "state")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
            try:
                sha = hashlib.sha256(config.read_bytes()).hexdigest()
                _wait_beat(cp, sha, 0, timeout=60)
                latencies = []
                for i in range(1, args.edits + 1):
                    time.sleep(0.3)
                    since = len(cp.received())
                    written = time.time()
                    sha = _write(config, doc(i))
                    latencies.append(_wait_beat(cp, sha, since) - written)
                time.sleep(2)
                cpu0, _ = _proc_stats(proc.pid)
                t0 = time.monotonic()
                rss_max = 0
                while time.monotonic() - t0 < args.idle:
                    time.sleep(1)
                    rss_max = max(rss_max, _proc_stats(proc.pid)[1])
                cpu1, _ = _proc_stats(proc.pid)
                share = (cpu1 - cpu0) / (time.monotonic() - t0)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
                log.close()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    day = time.strftime("%Y-%m-%d")
    print(
        f"| {day} | {machine} | {len(latencies)} edits | p50 {p50 * 1000:.0f} ms | "
        f"p99 {p99 * 1000:.0f} ms | max {latencies[-1] * 1000:.0f} ms |"
    )
    print(
        f"| {day} | {machine} | idle {args.idle:.0f} s | CPU {share * 100:.2f} % of a core | "
        f"RSS max {rss_max / 1e6:.1f} MB |"
    )
    ok = p50 <= 0.3 and p99 <= 1.0 and share <= 0.01 and rss_max <= 80e6
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
