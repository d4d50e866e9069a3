"""Every benchmark of issue 9 in one run: a table, raw JSON, plots and a RESULTS.md section.

1. No-op and 3-change convergence: infernet vs an Ansible playbook and a curl+jq script
   (``bench/compare.py``, ``bench/baselines/``): wall time and requests, median of ``--reps``.
2. ``infernet plan`` against 10, 100, 1000 installed models, the baselines' listing step, and
   the bare ``ollama`` Python client's listing (the floor: goal infernet ≤ 1.5× it at 100).
3. K missing models with a per-pull bandwidth limit (``--pull-seconds`` each, 10; quick 3):
   ``parallel_pulls`` 1 vs K (goal ≥ 3.2× for 4), and the baselines (serial).
4. Edit → heartbeat latency in watch mode (``bench/watch_bench.py``), p50/p99.
5. The idle daemon's CPU and RSS over ``--idle`` seconds (``bench/watch_bench.py``, after the
   edits of 4), and its RSS over ``--reconciles`` SIGHUP reconciles (``bench/daemon_soak.py``).
6. VRAM/memory estimate vs measured: the recorded runs in ``bench/results/`` re-scored
   (``bench/accuracy.py --rescore``); ``--rerun-accuracy`` also repeats the CPU run (~6 min).
7. Serving jobs (issue 15, ``bench/jobs_bench.py``): overhead against the backend called
   directly, pick-up latency and request rate, exactly once against the real daemon's loop;
   its own "Serving jobs" section (~10 min; quick: under a minute).

    .venv/bin/python -m bench.all            # the full run: ~27 min on 2 cores, 10 min idle
    .venv/bin/python -m bench.all --quick    # ~7 min: 60 s idle, fewer repetitions
    .venv/bin/python -m bench.all --only 2,3 --sizes 100   # issue 17's speed rows

Writes ``bench/out/all.json`` (raw numbers; ``bench/out/`` is not tracked), ``bench/
plan_scaling.png`` and ``bench/watch_latency.png``, and appends a dated section to
``bench/RESULTS.md`` (``--no-results`` leaves it alone).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
PLAN_PNG = ROOT / "bench" / "plan_scaling.png"
WATCH_PNG = ROOT / "bench" / "watch_latency.png"
ITEMS = (1, 2, 3, 4, 5, 6, 7)


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """``lscpu | head``, RAM, Python, kernel and date."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return {
        "load": [round(x, 2) for x in os.getloadavg()],
        "lscpu_head": "\n".join(lscpu.splitlines()[:10]),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# --------------------------------------------------------------------------- items 4-6


def watch(edits: int, idle: float) -> dict[str, Any]:
    """Items 4 and 5 (idle): ``bench.watch_bench.main`` as it is, its latencies captured.

    ``watch_bench`` keeps its latencies to itself and prints rows; the list is taken from the
    ``statistics.median`` call it makes on them, and the idle figures from the printed row.
    """
    from bench import watch_bench

    captured: dict[str, list[float]] = {}

    class _Recording:
        @staticmethod
        def median(values: list[float]) -> float:
            captured["latencies"] = list(values)
            return statistics.median(values)

    argv, real = sys.argv, getattr(watch_bench, "statistics")  # noqa: B009
    sys.argv = ["bench.watch_bench", "--edits", str(edits), "--idle", str(idle)]
    setattr(watch_bench, "statistics", _Recording)  # noqa: B010
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = watch_bench.main()
    finally:
        sys.argv = argv
        setattr(watch_bench, "statistics", real)  # noqa: B010
    text = printed.getvalue()
    lat = sorted(captured["latencies"])
    cpu = re.search(r"CPU ([\d.]+) % of a core", text)
    rss = re.search(r"RSS max ([\d.]+) MB", text)
    return {
        "latencies_s": lat,
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_s": lat[-1],
        "idle_s": idle,
        "idle_cpu_percent": float(cpu.group(1)) if cpu else None,
        "idle_rss_max_mb": float(rss.group(1)) if rss else None,
        "targets_met": code == 0,
        "rows": text.strip().splitlines(),
    }


def accuracy(rerun: bool, threads: int) -> dict[str, Any]:
    """Item 6: re-score the recorded runs (and, with ``rerun``, a fresh CPU run)."""
    runs = sorted((ROOT / "bench" / "results").glob("accuracy_*.json"))
    if rerun:
        fresh = OUT / f"accuracy-{time.strftime('%Y%m%d-%H%M')}.json"
        cmd = [
            sys.executable,
            "-m",
            "bench.accuracy",
            "--threads",
            str(threads),
            "--json-out",
            str(fresh),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True)
        runs.append(fresh)
    result: dict[str, Any] = {}
    for path in runs:
        cmd = [sys.executable, "-m", "bench.accuracy", "--rescore", str(path)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        summary = re.search(r"(\d+)/(\d+) rows within", done.stdout)
        result[path.name] = {
            "table": done.stdout.rstrip(),
            "passed": int(summary.group(1)) if summary else None,
            "rows": int(summary.group(2)) if summary else None,
            "exit": done.returncode,
        }
    return result


# --------------------------------------------------------------------------- plots


def plots(data: dict[str, Any]) -> list[Path]:
    if not (data.get("plan_scaling") or data.get("watch")):
        return []  # nothing to draw (``--only 7``): no need for matplotlib
    try:
        import matplotlib
    except ImportError:  # the numbers and tables do not need it
        print("matplotlib is not installed: no plots drawn", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scaling = data.get("plan_scaling")
    if scaling:
        sizes = sorted(int(n) for n in scaling)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        series = [
            ("infernet", "median_s", "infernet plan", "-o"),
            ("infernet", "cold_s", "infernet plan, first run (empty cache)", "--o"),
            ("ansible", "median_s", "Ansible playbook, listing step", "-s"),
            ("shell", "median_s", "curl + jq, listing step", "-^"),
            ("ollama_client", "median_s", "ollama Python client, listing", "-d"),
        ]
        for tool, stat, label, style in series:
            if any(tool not in scaling[str(n)] for n in sizes):
                continue  # a run from before the column existed
            ax.plot(sizes, [scaling[str(n)][tool][stat] * 1000 for n in sizes], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("installed models (10 of them in the file)")
        ax.set_ylabel("wall time, ms (fresh process)")
        ax.set_title("Time to know what to change, against inventory size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLAN_PNG, dpi=110)
        plt.close(fig)
        made.append(PLAN_PNG)
    w = data.get("watch")
    if w:
        lat = [x * 1000 for x in w["latencies_s"]]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.axvspan(0, 100, color="0.85", label="debounce (100 ms)")
        ax.hist(lat, bins=30, color="#4c72b0")
        ax.set_xlim(left=0)
        for value, label, color in ((w["p50_s"], "p50", "green"), (w["p99_s"], "p99", "red")):
            ax.axvline(
                value * 1000, color=color, linestyle="--", label=f"{label} {value * 1000:.0f} ms"
            )
        ax.set_xlabel("file saved → verified heartbeat with the new sha256, ms")
        ax.set_ylabel("edits")
        ax.set_title(f"infernet watch: edit → heartbeat latency ({len(lat)} edits, no download)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(WATCH_PNG, dpi=110)
        plt.close(fig)
        made.append(WATCH_PNG)
    return made


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _req(d: dict[str, Any]) -> str:
    api, reg = d["api_requests"], d["registry_requests"]
    return f"{api:g}" + (f" + {reg:g} registry" if reg else "")


def report(data: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown section: tables for every item that ran."""
    m = data["machine"]
    title = "Side by side with Ansible and curl; the daemon over time (issue 9)"
    if not {"convergence", "watch", "soak", "accuracy"} & data.keys():
        title = "Speed kept: `infernet plan` against the `ollama` client, parallel pulls (issue 17)"
    load = ""
    if m.get("load") and data.get("load_end"):
        load = (
            f" Load average (1, 5, 15 min) {', '.join(f'{x:g}' for x in m['load'])} at the "
            f"start, {', '.join(f'{x:g}' for x in data['load_end'])} at the end: on a shared "
            "machine the ratios, taken side by side in the same rounds, are what count."
        )
    out = [
        f"## {title}, {m['date'][:10]}",
        "",
        f"`{data['command']}` on {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, Python "
        f"{m['python']}, kernel {m['kernel']}, {m['date']}. Raw numbers: `bench/out/all.json` "
        f"(not tracked).{load}",
        "",
        "```",
        m["lscpu_head"],
        "```",
        "",
    ]
    conv = data.get("convergence")
    if conv:
        out += [
            "**1. Convergence**: the same Ollama-compatible test server, each tool a fresh "
            f"process; median of {args.reps} runs after a first (cold) one. Requests: what "
            "the Ollama API port saw (+ what the tool itself asked the registry).",
            "",
            "| scenario | tool | median | min–max | first run | requests |",
            "|---|---|---|---|---|---|",
        ]
        labels = {"noop": "nothing to change", "three_changes": "2 pulls + 1 removal"}
        for scenario, tools in conv.items():
            for tool, d in tools.items():
                out.append(
                    f"| {labels[scenario]} | {tool} | {_ms(d['median_s'])} | "
                    f"{_ms(d['min_s'])}–{_ms(d['max_s'])} | {_ms(d['cold_s'])} | "
                    f"{_req(d)} |"
                )
        out.append("")
    scaling = data.get("plan_scaling")
    if scaling:
        out += [
            "**2. Knowing what to change, against inventory size** (10 models in the file, "
            "the rest installed by hand; `prune: managed` leaves them alone): `infernet plan` "
            "vs the baselines' listing step (the playbook with `plan_only=true`, the script "
            f"with `--plan`); median of {args.reps} runs. Plot: `bench/plan_scaling.png`.",
        ]
        client = all("ollama_client" in s for s in scaling.values())
        if client:
            out[-1] += (
                ' The floor, "ollama client": a fresh `python -c "import ollama; '
                'ollama.Client(host=URL).list()"` (same venv, same server), run right after '
                "`infernet plan` in each round; the ratio is the median of the rounds' ratios "
                "(goal ≤ 1.5× at 100)."
            )
        cols = ["installed", "Ansible", "curl + jq"] + ["ollama client"] * client
        cols += ["infernet plan", "infernet plan, first run", "infernet requests"]
        cols += ["infernet / ollama client"] * client
        out += ["", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        for n in sorted(scaling, key=int):
            s = scaling[n]
            cells = [n, _ms(s["ansible"]["median_s"]), _ms(s["shell"]["median_s"])]
            cells += [_ms(s["ollama_client"]["median_s"])] * client
            cells += [_ms(s["infernet"]["median_s"]), _ms(s["infernet"]["cold_s"])]
            cells += [_req(s["infernet"])]
            cells += [f"{s['infernet_vs_ollama_client']:.2f}×"] * client
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    par = data.get("parallel_pulls")
    if par:
        p = par["params"]
        k = p["k"]
        base = par["infernet_p1"]["median_s"]
        out += [
            f"**3. {k} missing models, each pull limited to {p['bandwidth_bytes_per_s'] / 1e6:g}"
            f" MB/s** ({p['weights_bytes'] / 1e6:g} MB of weights each: {p['one_pull_s']:g} s "
            f"a pull); median of {par['reps']} runs after a first one.",
            "",
        ]
        if "speedup" in par:
            out[-2] += (
                f" Serial over parallel, the median of the rounds' ratios: "
                f"**{par['speedup']:.2f}×** (goal ≥ 3.2× for 4 pulls of ≥ 10 s)."
            )
        out += [
            "| tool | median | first run | vs infernet parallel_pulls 1 |",
            "|---|---|---|---|",
        ]
        for tool, d in par.items():
            if tool in ("params", "reps", "speedup"):
                continue
            out.append(
                f"| {tool.replace('_p', ', parallel_pulls ')} | {_ms(d['median_s'])} | "
                f"{_ms(d['cold_s'])} | {base / d['median_s']:.2f}× |"
            )
        out.append("")
    w = data.get("watch")
    if w:
        out += [
            f"**4. Edit → heartbeat latency** (`bench/watch_bench.py`, {len(w['latencies_s'])}"
            " edits needing no download): "
            f"p50 {w['p50_s'] * 1000:.0f} ms, p99 {w['p99_s'] * 1000:.0f} ms, max "
            f"{w['max_s'] * 1000:.0f} ms. Plot: `bench/watch_latency.png`.",
            "",
            f"**5. The daemon idle for {w['idle_s']:.0f} s** (heartbeat every 30 s): "
            f"{w['idle_cpu_percent']:.2f} % of a core, RSS max {w['idle_rss_max_mb']} MB "
            "(targets ≤ 1 %, ≤ 80 MB).",
        ]
        if w["idle_s"] < 600:
            out[-1] += f" A short window (`--idle {w['idle_s']:g}`); the full run idles 600 s."
        out.append("")
    soak = data.get("soak")
    if soak and soak.get("hung"):
        out += [
            f"**5. RSS over many reconciles: the daemon hung** (`bench/daemon_soak.py`, "
            f"SIGHUP after SIGHUP): {soak['hung']}, after {soak['reconciles']} reconciles; "
            "it did not stop on SIGTERM either (killed). RSS until then: "
            + ", ".join(f"{n}: {b / 1e6:.1f} MB" for n, b in soak["rss_samples"])
            + ".",
            "",
            "```",
            soak.get("stack") or "(no py-spy)",
            "```",
            "",
        ]
    elif soak:
        samples = soak["rss_samples"]
        out += [
            f"**5. RSS over {soak['sighups']} reconciles** (`bench/daemon_soak.py`: SIGHUP, "
            "wait for the reconcile to finish, repeat; each reconcile observes the server "
            f"and signs and sends a heartbeat; {soak['ms_per_reconcile']:.1f} ms each, "
            f"{soak['reconciles']} reconciles, {soak['heartbeats_received']} heartbeats "
            "received):",
            "",
            "| reconciles | " + " | ".join(str(n) for n, _ in samples) + " |",
            "|---|" + "---|" * len(samples),
            "| RSS MB | " + " | ".join(f"{b / 1e6:.1f}" for _, b in samples) + " |",
            "",
            f"Growth: {soak['growth_bytes'] / 1e6:+.2f} MB over the run, "
            f"{soak['growth_after_first_100_bytes'] / 1e6:+.2f} MB after the first "
            f"{samples[1][0] if len(samples) > 1 else 0}.",
            "",
        ]
    acc = data.get("accuracy")
    if acc:
        out += [
            "**6. Memory estimate vs measured** (`bench/accuracy.py --rescore` of the "
            "recorded runs in `bench/results/`, scored with today's estimate"
            + (", and a fresh CPU run" if args.rerun_accuracy else "")
            + "):",
            "",
        ]
        for name, a in acc.items():
            out += [
                f"`{name}`: {a['passed']}/{a['rows']} rows within +0..10 %",
                "",
                "```",
                a["table"],
                "```",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


def summary_table(data: dict[str, Any]) -> str:
    """The short table printed at the end of the run."""
    rows = [("item", "what", "result")]
    conv = data.get("convergence") or {}
    for scenario, tools in conv.items():
        cells = ", ".join(f"{t} {_ms(d['median_s'])} / {_req(d)} req" for t, d in tools.items())
        rows.append(("1", scenario, cells))
    for n, s in sorted((data.get("plan_scaling") or {}).items(), key=lambda kv: int(kv[0])):
        tools = [t for t in ("ansible", "shell", "ollama_client", "infernet") if t in s]
        cells = ", ".join(f"{t} {_ms(s[t]['median_s'])}" for t in tools)
        if "infernet_vs_ollama_client" in s:
            cells += f"; infernet/ollama client = {s['infernet_vs_ollama_client']:.2f}×"
        rows.append(("2", f"plan/list, {n} installed", cells))
    par = data.get("parallel_pulls")
    if par:
        tools = {t: d for t, d in par.items() if t not in ("params", "reps", "speedup")}
        cells = ", ".join(f"{t} {_ms(d['median_s'])}" for t, d in tools.items())
        k = par["params"]["k"]
        ratio = par["infernet_p1"]["median_s"] / par[f"infernet_p{k}"]["median_s"]
        rows.append(("3", f"{k} pulls, bandwidth-limited", f"{cells}; p1/p{k} = {ratio:.2f}×"))
    w = data.get("watch")
    if w:
        rows.append(
            (
                "4",
                "edit → heartbeat",
                f"p50 {w['p50_s'] * 1000:.0f} ms, "
                f"p99 {w['p99_s'] * 1000:.0f} ms, max {w['max_s'] * 1000:.0f} ms",
            )
        )
        rows.append(
            (
                "5",
                f"idle {w['idle_s']:.0f} s",
                f"CPU {w['idle_cpu_percent']:.2f} % of a core, RSS max {w['idle_rss_max_mb']} MB",
            )
        )
    soak = data.get("soak")
    if soak and soak.get("hung"):
        rows.append(("5", "reconciles (SIGHUP)", f"HUNG: {soak['hung']}"))
    elif soak:
        rss = " → ".join(f"{b / 1e6:.1f}" for _, b in soak["rss_samples"])
        rows.append(("5", f"RSS MB over {soak['sighups']} reconciles", rss))
    for name, a in (data.get("accuracy") or {}).items():
        rows.append(("6", name, f"{a['passed']}/{a['rows']} within +0..10 %"))
    for key, d in ((data.get("jobs") or {}).get("overhead") or {}).items():
        ratio = d["tokens_per_s_ratio"]
        rows.append(
            (
                "7",
                f"overhead {key}",
                f"+{d['added_ttft_p50_s'] * 1000:.1f} ms first token (p50), "
                + (f"{ratio:.3f}× tokens/s" if ratio is not None else "tokens/s n/a"),
            )
        )
    for run in ((data.get("jobs") or {}).get("pickup") or {}).get("runs", []):
        rows.append(
            (
                "7",
                f"pick-up, poll {run['poll_interval']}",
                f"p50 {run['p50_s']:.2f} s, p99 {run['p99_s']:.2f} s",
            )
        )
    once = (data.get("jobs") or {}).get("once")
    if once:
        cells = (
            f"infernet {once['infernet']['meta_events']}, replica {once['replica']['meta_events']}"
        )
        rows.append(("7", "runs of a job longer than a poll", cells))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="60 s idle, 2 repetitions, 20 edits (inventories still 10-1000)",
    )
    parser.add_argument("--idle", type=float, help="idle window of item 5, s (600; quick 60)")
    parser.add_argument("--reps", type=int, help="repetitions of items 1-2 (5; quick 2)")
    parser.add_argument("--edits", type=int, help="edits of item 4 (60; quick 20)")
    parser.add_argument("--sizes", default="10,100,1000", help="inventories of item 2")
    parser.add_argument("--k", type=int, default=4, help="missing models of item 3")
    parser.add_argument(
        "--pull-seconds", type=float, help="item 3: seconds one pull takes at its cap (10; quick 3)"
    )
    parser.add_argument("--reconciles", type=int, default=1000, help="reconciles of item 5")
    parser.add_argument("--only", default=",".join(map(str, ITEMS)), help="e.g. 1,2")
    parser.add_argument(
        "--rerun-accuracy",
        action="store_true",
        help="item 6: also repeat the CPU accuracy run (~6 min, builds llama.cpp)",
    )
    parser.add_argument("--no-results", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument(
        "--replot",
        metavar="JSON",
        help="measure nothing: redraw the plots and the tables from a raw file",
    )
    args = parser.parse_args()
    args.idle = args.idle if args.idle is not None else (60.0 if args.quick else 600.0)
    args.reps = args.reps or (2 if args.quick else 5)
    args.edits = args.edits or (20 if args.quick else 60)
    args.pull_seconds = args.pull_seconds or (3.0 if args.quick else 10.0)
    only = {int(i) for i in args.only.split(",")}
    data: dict[str, Any]
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plots(data)
        print(report(data, args))
        if data.get("jobs"):
            from bench import jobs_bench

            print(jobs_bench.report(data["jobs"], data["machine"], data["command"], args.replot))
        print(summary_table(data))
        return 0
    sys.path.insert(0, str(ROOT))
    from bench import compare, daemon_soak

    command = " ".join(["python -m bench.all", *sys.argv[1:]])
    data = {"machine": machine(), "command": command}

    def step(name: str, item: int) -> bool:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "all.json").write_text(json.dumps(data, indent=1))  # what is done so far
        if item in only:
            print(f"[{time.strftime('%H:%M:%S')}] {item}: {name}", file=sys.stderr, flush=True)
        return item in only

    started = time.monotonic()
    if only & {1, 2, 3}:
        compare._require_tools()
    if step("convergence, three tools", 1):
        data["convergence"] = compare.convergence(args.reps)
    if step("plan against inventory size", 2):
        sizes = [int(s) for s in args.sizes.split(",")]
        data["plan_scaling"] = compare.plan_scaling(sizes, args.reps)
    if step("bandwidth-limited pulls, serial vs parallel", 3):
        reps = max(1, args.reps // 2)
        rate = compare.PULL_BANDWIDTH
        weights = int(args.pull_seconds * rate)
        data["parallel_pulls"] = compare.parallel_pulls(args.k, weights, rate, reps)
        data["parallel_pulls"]["reps"] = reps
    if step(f"watch: {args.edits} edits, then {args.idle:.0f} s idle", 4 if 4 in only else 5):
        data["watch"] = watch(args.edits, args.idle)
    if step(f"daemon: RSS over {args.reconciles} reconciles", 5):
        data["soak"] = daemon_soak.soak(args.reconciles, max(1, args.reconciles // 10))
    if step("memory estimate vs measured (recorded runs)", 6):
        data["accuracy"] = accuracy(args.rerun_accuracy, min(4, os.cpu_count() or 1))
    if step("serving jobs (bench/jobs_bench.py)", 7):
        from bench import jobs_bench

        data["jobs"] = jobs_bench.run(args.quick)
    data["seconds"] = time.monotonic() - started
    data["load_end"] = [round(x, 2) for x in os.getloadavg()]

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "all.json").write_text(json.dumps(data, indent=1))
    made = plots(data)
    section = report(data, args) if only - {7} else ""
    if data.get("jobs"):
        from bench import jobs_bench

        raw = "bench/out/all.json"
        section += ("\n" if section else "") + jobs_bench.report(
            data["jobs"], data["machine"], command, raw
        )
    (OUT / "all.md").write_text(section)
    if not args.no_results:
        with RESULTS.open("a") as f:
            f.write("\n" + section)
    print(section)
    print(summary_table(data))
    print(
        f"\nraw: {OUT / 'all.json'}; plots: {', '.join(str(p) for p in made) or 'none'}; "
        f"{'RESULTS.md left alone' if args.no_results else 'appended to ' + str(RESULTS)}; "
        f"{data['seconds'] / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
