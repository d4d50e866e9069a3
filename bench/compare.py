"""infernet side by side with what an operator would otherwise use (issue 9, items 1-3).

Three tools converge the same Ollama-compatible test server (``tests/servers/``) to the same
list of models, in the same run, as fresh processes (start-up and imports count):

* ``ansible``: ``bench/baselines/converge.yml``, the builtin ``uri`` module against the Ollama
  API (``GET /api/tags``, ``POST /api/pull`` with ``stream: false``, ``DELETE /api/delete``),
  run by ``ansible-playbook`` against localhost (local connection, no facts);
* ``shell``: ``bench/baselines/converge.sh``, the same with ``curl`` and ``jq``;
* ``infernet``: ``infernet apply --yes`` with a config and its own state directory.

Requests are counted from the server's own request log (the Ollama API port) and from the
registry's (only requests the tool itself sent there: the server's downloads are left out).

1. ``convergence``: nothing to change, and 3 changes (2 pulls + 1 removal), median of ``reps``.
2. ``plan_scaling``: ``infernet plan`` (and the baselines' listing step) against 10, 100, 1000
   installed models, 10 of them in the file; and the floor: ``ollama_client``, a fresh Python
   process that imports the official ``ollama`` client and lists the models
   (``ollama.Client(host=URL).list()``, same venv, same server). Goal: ``infernet plan`` ≤ 1.5×
   that at 100 models (issue 17, item 7).
3. ``parallel_pulls``: K missing models with a per-pull bandwidth limit; infernet with
   ``policy.parallel_pulls`` 1 and K, the baselines (which pull one after the other). Each pull
   takes ``--pull-seconds`` (10: long enough that start-up and the canaries do not hide the
   gain; goal ``parallel_pulls: 4`` ≥ 3.2× serial, issue 17, item 8).

    .venv/bin/python -m bench.compare [--reps 5] [--only 2,3] [--sizes 100] [--pull-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INFERNET = str(BIN / "infernet")
PLAYBOOK = ROOT / "bench" / "baselines" / "converge.yml"
SCRIPT = ROOT / "bench" / "baselines" / "converge.sh"
TOOLS = ("ansible", "shell", "infernet")
OLLAMA_CLIENT = "ollama_client"
"""Item 2's floor: the official Python client listing the models, nothing else."""
PULL_BANDWIDTH = 1_000_000
"""Item 3: bytes/s each pull may take from the test registry."""

# Item 1: the 3-change scenario pulls the last two and removes all-minilm.
NOOP = ["qwen2.5:0.5b", "llama3.2:1b", "smollm2:135m"]
CHANGE_FROM = ["qwen2.5:0.5b", "llama3.2:1b", "all-minilm:latest"]
CHANGE_TO = ["qwen2.5:0.5b", "llama3.2:1b", "smollm2:135m", "llama3.2:1b-instruct-q8_0"]


def generated_catalogue(prefix: str, n: int, weights_size: int = 4096) -> dict[str, Any]:
    """``n`` small llama models named ``{prefix}0000:1b`` …, distinct weights each."""
    return {
        "models": {
            f"{prefix}{i:04d}:1b": {
                "params": "1.2B",
                "parameter_count": 1_200_000_000,
                "family": "llama",
                "quantization": "Q4_K_M",
                "weights_size": weights_size,
                "context_length": 8192,
                "block_count": 16,
                "head_count": 32,
                "head_count_kv": 8,
                "embedding_length": 2048,
            }
            for i in range(n)
        }
    }


@dataclass
class Run:
    """One timed run of one tool."""

    seconds: float
    api_requests: int
    registry_requests: int
    by_path: dict[str, int] = field(default_factory=dict)


def _require_tools() -> None:
    missing = [t for t in ("ansible-playbook", "curl", "jq", "bash") if not _which(t)]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: pip install 'ansible-core>=2.16'; apt-get install "
            "curl jq"
        )


def _which(tool: str) -> str | None:
    local = BIN / tool
    return str(local) if local.exists() else shutil.which(tool)


class Bench:
    """One test server plus the three tools pointed at it."""

    def __init__(self, server: Any, work: Path) -> None:
        self.server = server
        self.work = work
        self.http = httpx.Client(timeout=600.0, trust_env=False)
        self.env = {
            **os.environ,
            "INFERNET_NO_NVML": "1",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOME": str(work / "ansible-home"),
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def close(self) -> None:
        self.http.close()

    # server state ------------------------------------------------------------------------

    def installed(self) -> list[str]:
        tags = self.http.get(self.server.url + "/api/tags").json()
        return [m["name"] for m in tags.get("models") or []]

    def set_installed(self, models: list[str]) -> None:
        """Pull what is missing and delete what is extra (straight to the API, not counted)."""
        have = set(self.installed())
        want = set(models)

        def pull(name: str) -> None:
            r = self.http.post(self.server.url + "/api/pull", json={"model": name, "stream": False})
            r.raise_for_status()

        def delete(name: str) -> None:
            r = self.http.request("DELETE", self.server.url + "/api/delete", json={"model": name})
            r.raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(pull, sorted(want - have)))
        for name in sorted(have - want):  # one at a time: models share small blobs
            delete(name)
        got = set(self.installed())
        if got != want:
            raise SystemExit(f"could not set up the server: {sorted(got ^ want)}")

    # the tools -----------------------------------------------------------------------------

    def config(self, name: str, models: list[str], **policy: Any) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "served_models": models,
                    "backends": {
                        "ollama": {
                            "url": self.server.url,
                            "registry": self.server.registry_url,
                            "models_dir": str(self.server.models_dir),
                        }
                    },
                    "budget": {"vram": "80GiB", "disk_reserve": "1GiB"},
                    "policy": policy,
                },
                sort_keys=False,
            )
        )
        return path

    def command(
        self,
        tool: str,
        models: list[str],
        *,
        plan: bool = False,
        config: Path | None = None,
        state: Path | None = None,
    ) -> list[str]:
        if tool == "ansible":
            extra = {"ollama_url": self.server.url, "models": models, "plan_only": plan}
            return [
                _which("ansible-playbook") or "ansible-playbook",
                "-i",
                "localhost,",
                str(PLAYBOOK),
                "-e",
                json.dumps(extra),
            ]
        if tool == OLLAMA_CLIENT:
            # The same interpreter and venv as infernet's entry point, a fresh process.
            code = f"import ollama; ollama.Client(host={self.server.url!r}).list()"
            return [sys.executable, "-c", code]
        if tool == "shell":
            listing = self.work / "models.txt"
            listing.write_text("".join(f"{m}\n" for m in models))
            return ["bash", str(SCRIPT), self.server.url, str(listing)] + (["--plan"] * plan)
        assert config is not None and state is not None
        verb = ["plan"] if plan else ["apply", "--yes"]
        return [INFERNET, *verb, "-c", str(config), "--state-dir", str(state)]

    def timed(self, cmd: list[str]) -> Run:
        self.server.reset_requests()
        start = time.perf_counter()
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            out = (done.stdout + done.stderr).strip()[-1500:]
            raise SystemExit(f"{' '.join(cmd[:3])} … failed ({done.returncode}):\n{out}")
        seen = [r for r in self.server.requests() if not r["path"].startswith("/_test")]
        own = [
            r
            for r in self.server.registry_requests()
            if not str(r.get("user_agent") or "").startswith("ollama/")
        ]
        paths = Counter(f"{r['method']} {_route(r['path'])}" for r in seen)
        return Run(elapsed, len(seen), len(own), dict(paths))


def _route(path: str) -> str:
    """The path with its query and any digest left out: ``HEAD /api/blobs/sha256:*``."""
    return re.sub(r"sha256[:-][0-9a-f]{64}", "sha256:*", path.split("?", maxsplit=1)[0])


@contextmanager
def bench_server(catalogue: dict[str, Any], *, bandwidth: int | None = None) -> Iterator[Bench]:
    sys.path.insert(0, str(ROOT))
    from tests.servers.harness import start_ollama_server

    with tempfile.TemporaryDirectory(prefix="infernet-compare-") as tmp:
        work = Path(tmp)
        with start_ollama_server(work / "ollama", catalogue, bandwidth=bandwidth) as server:
            bench = Bench(server, work)
            try:
                yield bench
            finally:
                bench.close()


def _summary(runs: list[Run]) -> dict[str, Any]:
    """Median seconds and requests of the measured runs, the first (cold) run kept apart."""
    cold, rest = runs[0], runs[1:] or runs[:1]
    return {
        "median_s": statistics.median(r.seconds for r in rest),
        "min_s": min(r.seconds for r in rest),
        "max_s": max(r.seconds for r in rest),
        "cold_s": cold.seconds,
        "api_requests": statistics.median(r.api_requests for r in rest),
        "registry_requests": statistics.median(r.registry_requests for r in rest),
        "requests_by_path": rest[-1].by_path,
        "runs_s": [r.seconds for r in runs],
    }


def _rounds(
    bench: Bench,
    reps: int,
    tools: Mapping[str, Callable[[], list[str]]],
    setup: Callable[[], None],
) -> dict[str, list[Run]]:
    """One cold run then ``reps`` runs of each tool, interleaved, ``setup`` before each."""
    runs: dict[str, list[Run]] = {name: [] for name in tools}
    for _ in range(reps + 1):
        for name, cmd in tools.items():
            setup()
            runs[name].append(bench.timed(cmd()))
    return runs


# 1 ------------------------------------------------------------------------------------------


def convergence(reps: int) -> dict[str, Any]:
    """No-op and 3-change convergence, each tool: wall time and requests."""
    from tests.servers.harness import DEFAULT_CATALOGUE

    result: dict[str, Any] = {}
    scenarios = {"noop": (NOOP, NOOP), "three_changes": (CHANGE_FROM, CHANGE_TO)}
    with bench_server(DEFAULT_CATALOGUE) as bench:
        for scenario, (start, goal) in scenarios.items():
            config = bench.config(scenario, goal, prune="all")
            state = bench.work / f"state-{scenario}"  # a fresh state directory per scenario
            tools = {t: partial(bench.command, t, goal, config=config, state=state) for t in TOOLS}
            runs = _rounds(bench, reps, tools, partial(bench.set_installed, start))
            if sorted(bench.installed()) != sorted(goal):
                raise SystemExit(f"{scenario}: the last tool did not converge")
            result[scenario] = {t: _summary(r) for t, r in runs.items()}
    return result


# 2 ------------------------------------------------------------------------------------------


def plan_scaling(sizes: list[int], reps: int, desired: int = 10) -> dict[str, Any]:
    """``infernet plan`` and the baselines' listing step against the inventory size."""
    result: dict[str, Any] = {}
    for n in sizes:
        catalogue = generated_catalogue("inv", n)
        names = list(catalogue["models"])
        with bench_server(catalogue) as bench:
            t0 = time.perf_counter()
            bench.set_installed(names)
            setup_s = time.perf_counter() - t0
            goal = names[:desired]
            config = bench.config("plan", goal)  # prune: managed: the rest are left alone
            state = bench.work / "state"
            tools = {
                t: partial(bench.command, t, goal, plan=True, config=config, state=state)
                for t in (*TOOLS, OLLAMA_CLIENT)
            }
            runs = _rounds(bench, reps, tools, lambda: None)
            result[str(n)] = {t: _summary(r) for t, r in runs.items()}
            result[str(n)]["setup_s"] = setup_s
            # Side by side in the same rounds: the ratio is what holds on a busy machine.
            result[str(n)]["infernet_vs_ollama_client"] = statistics.median(
                a.seconds / b.seconds
                for a, b in zip(runs["infernet"][1:], runs[OLLAMA_CLIENT][1:], strict=True)
            )
    return result


# 3 ------------------------------------------------------------------------------------------


def parallel_pulls(
    k: int, weights: int, bandwidth: int, reps: int, *, baselines: bool = True
) -> dict[str, Any]:
    """K missing models, each pull limited to ``bandwidth`` B/s: serial tools vs parallel
    (``baselines=False``: infernet alone, serial and parallel)."""
    catalogue = generated_catalogue("bw", k, weights_size=weights)
    goal = list(catalogue["models"])
    with bench_server(catalogue, bandwidth=bandwidth) as bench:
        configs = {p: bench.config(f"par{p}", goal, prune="all", parallel_pulls=p) for p in (1, k)}
        tools: dict[str, Callable[[], list[str]]] = {}
        if baselines:
            tools["ansible"] = partial(bench.command, "ansible", goal)
            tools["shell"] = partial(bench.command, "shell", goal)
        for p, config in configs.items():
            state = bench.work / f"state-par{p}"
            tools[f"infernet_p{p}"] = partial(
                bench.command, "infernet", goal, config=config, state=state
            )
        runs = _rounds(bench, reps, tools, lambda: bench.set_installed([]))
    result: dict[str, Any] = {t: _summary(r) for t, r in runs.items()}
    result["params"] = {
        "k": k,
        "weights_bytes": weights,
        "bandwidth_bytes_per_s": bandwidth,
        "one_pull_s": weights / bandwidth,
    }
    serial, parallel = runs["infernet_p1"][1:], runs[f"infernet_p{k}"][1:]
    result["speedup"] = statistics.median(
        a.seconds / b.seconds for a, b in zip(serial, parallel, strict=True)
    )
    return result


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--pull-seconds", type=float, default=10.0, help="item 3: one pull's time")
    parser.add_argument("--only", default="1,2,3", help="items to run, e.g. 2,3")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "compare.json"))
    args = parser.parse_args()
    _require_tools()
    only = {int(i) for i in args.only.split(",")}
    sizes = [int(s) for s in args.sizes.split(",")]
    data: dict[str, Any] = {}
    if 1 in only:
        data["convergence"] = convergence(args.reps)
    if 2 in only:
        data["plan_scaling"] = plan_scaling(sizes, args.reps)
    if 3 in only:
        weights = int(args.pull_seconds * PULL_BANDWIDTH)
        reps = max(1, args.reps // 2)
        data["parallel_pulls"] = parallel_pulls(args.k, weights, PULL_BANDWIDTH, reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
