"""Fleet scale (issue 17, item 5): the ``infernet.node.models`` task on many hosts, next to a
ping on the same inventory and forks, and a rolling change in ``serial`` batches.

Every host is ``ansible_connection: local`` with its own ``infernet.yaml`` and state directory
under one temporary folder; the hosts share a few Ollama-compatible test servers (host ``i``
uses server ``i % servers``). One run does, in order:

1. converge: the models task on every host, once (the first run pulls);
2. ``--runs`` rounds of, side by side: a ping playbook, the models task with nothing to do
   (in-process: the module imports infernet, since the hosts' interpreter can), and the same
   no-op through the ``infernet`` subprocess (``executable`` is a shell wrapper, which the module
   cannot import); medians, wall time and CPU (this process's children: ansible, its forks, the
   modules, infernet);
3. a rolling change that adds a model, in ``--serial`` batches with ``max_fail_percentage: 0``;
4. a failing canary: another model whose pull breaks on every server (the test server's fault
   route); the first batch fails and the later batches must be untouched (asserted).

    .venv/bin/python -m bench.fleet_bench [--hosts 100] [--forks 10] [--servers 4] [--runs 3]
        [--serial 1,10,25%] [--json OUT]

The ratio that counts is no-op/ping of the same run (other work on the machine moves both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INFERNET = str(BIN / "infernet")
BASE_MODEL = "smollm2:135m"
ADDED_MODEL = "all-minilm:latest"
BROKEN_MODEL = "qwen2.5:0.5b"
BUDGET = {"vram": "24GiB", "disk_reserve": "1GiB"}

_RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=\d+"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)

PING = """\
- name: Ping every host
  hosts: nodes
  gather_facts: false
  tasks:
    - name: Ping
      ansible.builtin.ping:
"""

MODELS = """\
- name: The node's models
  hosts: nodes
  gather_facts: false
  serial: "{{ bench_serial | default('100%') }}"
  max_fail_percentage: "{{ bench_max_fail_percentage | default(100) }}"
  tasks:
    - name: Models
      infernet.node.models:
        served_models: "{{ bench_models }}"
        backends: "{{ infernet_backends }}"
        budget: "{{ infernet_budget }}"
        config: "{{ infernet_config }}"
        state_dir: "{{ infernet_state_dir }}"
        executable: "{{ bench_executable | default(infernet_bin) }}"
"""

CONFIG = """\
[defaults]
retry_files_enabled = false
host_key_checking = false
[connection]
pipelining = true
"""


@dataclass
class Timed:
    """One ansible run: wall seconds, CPU seconds of everything it started, its recap."""

    wall: float
    cpu: float
    rc: int
    recap: dict[str, dict[str, int]]
    out: str


class Bench:
    def __init__(self, tmp: Path, hosts: int, forks: int, servers: list[Any]) -> None:
        self.tmp = tmp
        self.hosts = [f"node{i:03d}" for i in range(hosts)]
        self.forks = forks
        self.servers = servers
        self.inventory = tmp / "hosts.yml"
        self.env = self._env()
        wrapper = tmp / "infernet-subprocess"
        # Not a Python script: the module can't import it, so it runs it as a subprocess.
        wrapper.write_text(f'#!/bin/sh\nexec "{INFERNET}" "$@"\n')
        wrapper.chmod(0o755)
        self.wrapper = str(wrapper)
        (tmp / "ping.yml").write_text(PING)
        (tmp / "models.yml").write_text(MODELS)
        (tmp / "ansible.cfg").write_text(CONFIG)
        self._write_inventory()

    def root(self, host: str) -> Path:
        return self.tmp / "nodes" / host

    def config(self, host: str) -> Path:
        return self.root(host) / "infernet.yaml"

    def _write_inventory(self) -> None:
        hosts: dict[str, Any] = {}
        for i, host in enumerate(self.hosts):
            server = self.servers[i % len(self.servers)]
            self.root(host).mkdir(parents=True)
            hosts[host] = {
                "infernet_config": str(self.config(host)),
                "infernet_state_dir": str(self.root(host) / "state"),
                "infernet_backends": {
                    "ollama": {
                        "url": server.url,
                        "registry": server.registry_url,
                        "models_dir": str(server.models_dir),
                    }
                },
            }
        doc = {
            "nodes": {
                "hosts": hosts,
                "vars": {
                    "ansible_connection": "local",
                    "ansible_python_interpreter": sys.executable,
                    "infernet_bin": INFERNET,
                    "infernet_budget": BUDGET,
                },
            }
        }
        self.inventory.write_text(yaml.safe_dump(doc, sort_keys=False))

    def _env(self) -> dict[str, str]:
        ours = ("ANSIBLE_", "OLLAMA_", "INFERNET_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        (self.tmp / "home").mkdir()
        env.update(
            HOME=str(self.tmp / "home"),
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            ANSIBLE_CONFIG=str(self.tmp / "ansible.cfg"),
            ANSIBLE_COLLECTIONS_PATH=str(ROOT),
            ANSIBLE_HOME=str(self.tmp / "ansible-home"),
            ANSIBLE_LOCAL_TEMP=str(self.tmp / "ansible-local"),
            ANSIBLE_REMOTE_TEMP=str(self.tmp / "ansible-remote"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_LOCALHOST_WARNING="0",
            ANSIBLE_DEPRECATION_WARNINGS="0",
            INFERNET_NO_NVML="1",
            INFERNET_RETRY_BACKOFF="0.05",
            PYTHONWARNINGS="ignore",
        )
        return env

    def playbook(self, name: str, **extra: Any) -> Timed:
        argv = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), "-f", str(self.forks)]
        if extra:
            argv += ["-e", json.dumps(extra)]
        argv.append(str(self.tmp / name))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.tmp,
            stdin=subprocess.DEVNULL,
            timeout=1800,
            check=False,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        recap = {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "failed")}
            for m in _RECAP.finditer(proc.stdout)
        }
        return Timed(wall, cpu, proc.returncode, recap, proc.stdout + proc.stderr)

    def models(self, models: list[str], **extra: Any) -> Timed:
        return self.playbook("models.yml", bench_models=models, **extra)

    def installed(self, server: Any) -> set[str]:
        import httpx

        tags = httpx.get(f"{server.url}/api/tags", timeout=10).json()
        return {m["name"] for m in tags["models"]}


def _check(ok: bool, what: str, run: Timed | None = None) -> None:
    if not ok:
        tail = run.out[-3000:] if run else ""
        raise SystemExit(f"fleet_bench: {what}\n{tail}")


def _all(run: Timed, hosts: list[str], key: str, value: int | None) -> bool:
    """Every host in the recap, and ``key`` is ``value`` for each (None: > 0)."""
    if set(run.recap) != set(hosts):
        return False
    return all(
        run.recap[h][key] > 0 if value is None else run.recap[h][key] == value for h in hosts
    )


def batches(serial: list[int | str], total: int) -> list[int]:
    """Ansible's batch sizes for ``serial`` (the last entry repeats)."""
    sizes: list[int] = []
    left, i = total, 0
    while left > 0:
        spec = serial[min(i, len(serial) - 1)]
        if isinstance(spec, str) and spec.endswith("%"):
            size = max(1, int(total * float(spec[:-1]) / 100))
        else:
            size = int(spec)
        sizes.append(min(size, left))
        left -= sizes[-1]
        i += 1
    return sizes


def infernet_plan_cpu(bench: Bench, runs: int = 5) -> float:
    """CPU seconds of one ``infernet plan --json`` on a converged host, alone (median)."""
    host = bench.hosts[0]
    env = {**os.environ, "INFERNET_NO_NVML": "1"}
    argv = [INFERNET, "plan", "--json", "-c", str(bench.config(host))]
    argv += ["--state-dir", str(bench.root(host) / "state")]
    cpus = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, capture_output=True, env=env, check=True, timeout=120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    return statistics.median(cpus)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

    serial: list[int | str] = [int(s) if s.isdigit() else s for s in args.serial.split(",")]
    with (
        tempfile.TemporaryDirectory(prefix="fleet-bench-") as name,
        _servers(Path(name), args.servers, DEFAULT_CATALOGUE, start_ollama_server) as servers,
    ):
        bench = Bench(Path(name), args.hosts, args.forks, servers)
        hosts = bench.hosts
        result: dict[str, Any] = {"hosts": args.hosts, "forks": args.forks}
        result["servers"] = args.servers

        print(f"converge: {BASE_MODEL} on {len(hosts)} hosts ...", flush=True)
        first = bench.models([BASE_MODEL])
        _check(first.rc == 0 and _all(first, hosts, "changed", None), "converge failed", first)
        result["converge_s"] = round(first.wall, 1)

        rounds: dict[str, list[Timed]] = {"ping": [], "noop": [], "noop_subprocess": []}
        for i in range(args.runs):
            print(f"round {i + 1}/{args.runs}: ping, no-op, no-op (subprocess) ...", flush=True)
            ping = bench.playbook("ping.yml")
            _check(ping.rc == 0 and _all(ping, hosts, "failed", 0), "ping failed", ping)
            noop = bench.models([BASE_MODEL])
            _check(noop.rc == 0 and _all(noop, hosts, "changed", 0), "no-op changed", noop)
            sub = bench.models([BASE_MODEL], bench_executable=bench.wrapper)
            _check(sub.rc == 0 and _all(sub, hosts, "changed", 0), "no-op changed", sub)
            for key, timed in (("ping", ping), ("noop", noop), ("noop_subprocess", sub)):
                rounds[key].append(timed)
        for key, runs in rounds.items():
            result[f"{key}_s"] = round(statistics.median(r.wall for r in runs), 1)
            cpu = statistics.median(r.cpu for r in runs) / len(hosts)
            result[f"{key}_cpu_per_host_s"] = round(cpu, 3)
        result["ratio"] = round(result["noop_s"] / result["ping_s"], 2)
        result["ratio_subprocess"] = round(result["noop_subprocess_s"] / result["ping_s"], 2)
        result["infernet_plan_cpu_s"] = round(infernet_plan_cpu(bench), 3)

        sizes = batches(serial, len(hosts))
        result["serial"] = serial
        result["batches"] = sizes
        print(f"rolling change: + {ADDED_MODEL} in batches {sizes} ...", flush=True)
        rolling = bench.models(
            [BASE_MODEL, ADDED_MODEL], bench_serial=serial, bench_max_fail_percentage=0
        )
        _check(rolling.rc == 0 and _all(rolling, hosts, "changed", None), "rolling", rolling)
        _check(all(ADDED_MODEL in bench.config(h).read_text() for h in hosts), "file not written")
        _check(all(ADDED_MODEL in bench.installed(s) for s in servers), "model not pulled")
        result["rolling_s"] = round(rolling.wall, 1)

        print(f"canary: + {BROKEN_MODEL}, whose pull breaks ...", flush=True)
        for server in servers:
            server.fault(BROKEN_MODEL, "error_mid", after_bytes=1000)
        before = {h: bench.config(h).read_bytes() for h in hosts}
        canary = bench.models(
            [BASE_MODEL, ADDED_MODEL, BROKEN_MODEL],
            bench_serial=serial,
            bench_max_fail_percentage=0,
        )
        first_batch, later = hosts[: sizes[0]], hosts[sizes[0] :]
        _check(canary.rc != 0, "the canary run succeeded", canary)
        _check(set(canary.recap) == set(first_batch), "hosts after the canary ran", canary)
        _check(all(canary.recap[h]["failed"] == 1 for h in first_batch), "canary ok", canary)
        _check(all(bench.config(h).read_bytes() == before[h] for h in later), "later touched")
        _check(not any(BROKEN_MODEL in bench.installed(s) for s in servers), "broken installed")
        result["canary_stop_s"] = round(canary.wall, 1)
        result["canary_failed_hosts"] = len(first_batch)
        result["untouched_hosts"] = len(later)
        return result


@contextmanager
def _servers(tmp: Path, count: int, catalogue: Any, start: Any) -> Iterator[list[Any]]:
    servers: list[Any] = []
    try:
        for i in range(count):
            servers.append(start(tmp / f"ollama-{i}", catalogue))
        yield servers
    finally:
        for server in servers:
            server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--forks", type=int, default=10)
    parser.add_argument("--servers", type=int, default=4, help="Ollama test servers, shared")
    parser.add_argument("--runs", type=int, default=3, help="rounds of ping and no-op (median)")
    parser.add_argument("--serial", default="1,10,25%", help="batch sizes, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    load = os.getloadavg()
    result = run(args)
    result["load_before"] = [round(x, 2) for x in load]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["machine"] = platform.processor() or platform.machine()
    print(json.dumps(result, indent=2))
    print(
        f"\n| ping | no-op (in-process) | ratio | no-op (subprocess) | ratio | rolling "
        f"{result['batches']} | canary stop |\n|---|---|---|---|---|---|---|\n"
        f"| {result['ping_s']} s | {result['noop_s']} s | {result['ratio']}x | "
        f"{result['noop_subprocess_s']} s | {result['ratio_subprocess']}x | "
        f"{result['rolling_s']} s | {result['canary_stop_s']} s: {result['canary_failed_hosts']} "
        f"failed, {result['untouched_hosts']} untouched |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
