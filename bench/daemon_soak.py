"""The daemon's memory over many reconciles (issue 9, item 5).

``infernet watch`` runs as a real process against the Ollama-compatible test server and the
control-plane test server (so every reconcile also signs and sends a heartbeat). It is sent
SIGHUP (re-read the file, reconcile) ``--reconciles`` times, each time waiting for the
reconcile to finish (its ``reconcile done`` debug log line) before the next; its RSS is read
from ``/proc`` before the first and after every ``--every`` reconciles. Target: no growth.

The idle half of item 5 (CPU and RSS over minutes with nothing to do) is
``bench/watch_bench.py``'s ``--idle``; ``bench/all.py`` runs both.

    .venv/bin/python -m bench.daemon_soak [--reconciles 1000] [--every 100]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.watch_bench import _proc_stats

ROOT = Path(__file__).resolve().parent.parent
INFERNET = str(Path(sys.executable).with_name("infernet"))
DONE = b"reconcile done"


def soak(reconciles: int = 1000, every: int = 100) -> dict[str, Any]:
    """RSS samples (reconciles done, bytes) and the time per reconcile."""
    sys.path.insert(0, str(ROOT))
    from reconciler.controlplane.identity import generate_key
    from tests.servers.controlplane_harness import start_control_plane
    from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

    with tempfile.TemporaryDirectory(prefix="infernet-soak-") as tmp:
        work = Path(tmp)
        generate_key(work / "node.key")
        with (
            start_ollama_server(work / "ollama", DEFAULT_CATALOGUE) as server,
            start_control_plane(work / "cp") as cp,
        ):
            config = work / "infernet.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "served_models": [
                            "smollm2:135m",
                            {"name": "all-minilm:latest", "keep_alive": "forever"},
                        ],
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
                    },
                    sort_keys=False,
                )
            )
            log_path = work / "watch.log"
            env = {**os.environ, "INFERNET_NO_NVML": "1"}
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [
                        INFERNET,
                        "watch",
                        "-c",
                        str(config),
                        "--state-dir",
                        str(work / "state"),
                        "--log-level",
                        "debug",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    env=env,
                )
            try:
                result = _drive(proc, log_path, reconciles, every)
                result["heartbeats_received"] = sum(
                    1
                    for r in cp.received()
                    if isinstance(r.get("body"), dict) and "specs" in r["body"]
                )
                return result
            except Hung as hung:
                return {"hung": str(hung), "stack": _stack(proc.pid), **hung.partial}
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()  # a daemon that ignores SIGTERM is reported, not waited for
                    proc.wait()


class Hung(Exception):
    """The daemon stopped finishing reconciles; ``partial`` holds what was measured."""

    def __init__(self, message: str, partial: dict[str, Any]) -> None:
        super().__init__(message)
        self.partial = partial


def _stack(pid: int) -> str:
    """The hung daemon's Python stacks (py-spy, when installed)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return ""
    done = subprocess.run(
        [str(spy), "dump", "--pid", str(pid)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return (done.stdout + done.stderr).strip()


def _drive(proc: subprocess.Popen[bytes], log_path: Path, n: int, every: int) -> dict[str, Any]:
    seen = 0
    offset = 0
    tail = b""

    def poll() -> None:
        nonlocal seen, offset, tail
        with log_path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        offset += len(data)
        data = tail + data
        cut = data.rfind(b"\n") + 1
        seen += data[:cut].count(DONE)
        tail = data[cut:]

    def wait_for(count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        poll()
        while seen < count:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited ({proc.returncode}):\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                partial = {
                    "sighups": count - base,
                    "reconciles": seen - base,
                    "rss_samples": samples,
                }
                raise Hung(f"reconcile {count - base} not done within {timeout:g} s", partial)
            time.sleep(0.002)
            poll()

    base = 0
    samples: list[tuple[int, int]] = []
    wait_for(2, 60)  # start-up: the first reconcile and the first tick
    time.sleep(1)
    poll()
    base = seen
    samples.append((0, _proc_stats(proc.pid)[1]))
    cpu0 = _proc_stats(proc.pid)[0]
    started = time.monotonic()
    for i in range(1, n + 1):
        proc.send_signal(signal.SIGHUP)
        wait_for(base + i, 30)  # a tick's reconcile counts too; the total is reported
        if i % every == 0:
            samples.append((i, _proc_stats(proc.pid)[1]))
    elapsed = time.monotonic() - started
    cpu = _proc_stats(proc.pid)[0] - cpu0
    time.sleep(0.5)
    poll()
    return {
        "sighups": n,
        "reconciles": seen - base,
        "rss_samples": samples,
        "seconds": elapsed,
        "ms_per_reconcile": elapsed / n * 1000,
        "cpu_s": cpu,
        "growth_bytes": samples[-1][1] - samples[0][1],
        "growth_after_first_100_bytes": samples[-1][1] - samples[min(1, len(samples) - 1)][1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reconciles", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    result = soak(args.reconciles, args.every)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
