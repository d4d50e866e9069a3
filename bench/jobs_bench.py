"""Serving jobs (issue 15): ``infernet watch`` against the backend called directly, pick-up
latency and request rate, and "exactly once" against a replica of the real daemon's loop.

One run starts the Ollama-compatible test server (``OLLAMA_NUM_PARALLEL=8``), the real
llama-server router (``-c 4096 -np 8``, a tiny GGUF), the control-plane test server and one
``infernet watch`` serving a model on each backend (``jobs.concurrency: 8``); the phases change
``jobs.poll_interval`` by rewriting the file, as an operator would.

1. **Overhead** against the backend called directly, in the same run, 1 and 8 jobs at once,
   direct and via infernet alternating round by round. Direct: this process streams the
   backend's own chat endpoint (Ollama ``/api/chat``, llama-server ``/v1/chat/completions``)
   with the body infernet sends, on a fresh connection; time to first token = request sent →
   first non-empty delta; tokens/s = (deltas − 1) / (first delta → end of stream). Via
   infernet: jobs created at the control-plane test server (8 inserted at once); time to first
   token = the poll answer that carried the job (the server's request log) → the first
   ``token`` event stored (the server's ``created_at``); tokens/s = (token events − 1) / (first
   token stored → ``done`` stored), so the event batching (first batch at once, then 16 events
   or 250 ms) is inside the figure. Added time = via − direct, per percentile.
2. **Pick-up**: job assigned → ``meta`` stored, jobs created at uniformly random moments, at
   ``poll_interval`` 1 s, 2 s (the default) and 15 s (the real daemon's; full run only), and
   the control-plane requests a minute of an idle node (job polls, heartbeats, command polls).
3. **Exactly once**: a job longer than the poll interval, on infernet and on a replica of the
   real daemon's loop (``infernet-jobs.md`` §4, §9.1: ``setInterval(pollJobs, interval)`` with
   no in-flight guard, each tick polling ``{limit: 5}`` and running what comes back one after
   another, events flushed at 16 or 250 ms and awaited), both against the same servers.

    .venv/bin/python -m bench.jobs_bench            # ~10 min on 2 cores
    .venv/bin/python -m bench.jobs_bench --quick    # well under a minute, small counts

Prints the markdown section (``bench.all`` appends it to ``bench/RESULTS.md``) and writes the
raw numbers to ``bench/out/jobs.json`` (not tracked).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
INFERNET = str(Path(sys.executable).with_name("infernet"))

SMALL = "smollm2:135m"  # on the Ollama test server
TINY = "tiny-chat.gguf"  # on the llama-server router: the default tiny GGUF, ~2,500 tokens/s
MID = "mid-chat.gguf"  # hidden 512, 8 layers (76 MB): ~200 tokens/s, a real model's pace
POLL = "/api/v1/node/jobs/poll"
HEARTBEAT = "/api/v1/node/heartbeat"
COMMANDS = "/api/v1/node/commands/poll"
PARALLEL = 8  # OLLAMA_NUM_PARALLEL, llama-server -np, jobs.concurrency
OVERHEAD_POLL = "0.25s"  # the pick-up wait is not part of the overhead: poll often to save time
REAL_POLL_S, REAL_HEARTBEAT_S = 15.0, 30.0  # the real daemon's defaults (start.js:63-64)


@dataclass(frozen=True)
class Params:
    """How much to measure; ``quick`` is for a smoke run, not for the record."""

    jobs: int  # per configuration of item 1 (8 at once: jobs // 8 rounds)
    token_delay: float  # Ollama test server, s before each token
    reply_tokens: int  # Ollama test server, tokens per answer
    llama_tokens: int  # max_tokens on llama-server, tiny model
    mid_tokens: int  # max_tokens on llama-server, the mid model (0: not measured)
    pickup: tuple[tuple[str, int, float], ...]  # (poll_interval, jobs, window s)
    idle_s: float  # the idle window counted for requests a minute
    once_job_s: float  # length of the long job of item 3
    once_poll_s: float


FULL = Params(
    jobs=40,
    token_delay=0.01,
    reply_tokens=200,
    llama_tokens=400,
    mid_tokens=200,
    pickup=(("1s", 30, 30.0), ("2s", 40, 60.0), ("15s", 12, 90.0)),
    idle_s=60.0,
    once_job_s=5.0,
    once_poll_s=1.0,
)
QUICK = Params(
    jobs=8,
    token_delay=0.005,
    reply_tokens=40,
    llama_tokens=64,
    mid_tokens=0,
    pickup=(("2s", 5, 6.0),),
    idle_s=6.0,
    once_job_s=2.0,
    once_poll_s=1.0,
)


# --------------------------------------------------------------------------- small helpers


def pct(values: list[float], q: float) -> float:
    """The q-quantile as ``bench.all`` takes it (p99 of 40 values is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def stamp(text: str) -> float:
    """Epoch seconds of a ``timestamptz`` as the control-plane test server prints it."""
    return datetime.fromisoformat(text).timestamp()


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise SystemExit(f"jobs_bench: timed out waiting for {what}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    tokens_per_s: float | None
    read_s: float | None = None  # the stream read: direct, request → end; via, infernet's own
    # meta.started_at → done.finished_at
    meta_apart: bool = False  # via infernet: meta stored in a batch before the first token's
    to_backend_s: float | None = None  # via infernet: poll answer → chat request at the backend
    tail_s: float | None = None  # via infernet: done.finished_at → done stored


def rate(tokens: int, first: float, last: float) -> float | None:
    """Tokens a second from the first token to the end (None when too short to say)."""
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else None


# --------------------------------------------------------------------------- the backends, direct


def direct_ollama(url: str, body: dict[str, Any]) -> Sample:
    """Stream ``/api/chat`` as infernet does (a fresh connection), timing the deltas."""
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        sent = time.perf_counter()
        first = end = 0.0
        tokens = 0
        with client.stream("POST", f"{url}/api/chat", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                part = json.loads(line)
                if (part.get("message") or {}).get("content"):
                    tokens += 1
                    if tokens == 1:
                        first = time.perf_counter()
                if part.get("done"):
                    end = time.perf_counter()
    return Sample(first - sent, tokens, rate(tokens, first, end), read_s=end - sent)


def direct_llama(url: str, body: dict[str, Any]) -> Sample:
    """Stream ``/v1/chat/completions`` (SSE) as infernet does, timing the deltas."""
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        sent = time.perf_counter()
        first = end = 0.0
        tokens = 0
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    end = time.perf_counter()
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    tokens += 1
                    if tokens == 1:
                        first = time.perf_counter()
                if choices and choices[0].get("finish_reason") and not end:
                    end = time.perf_counter()
    return Sample(first - sent, tokens, rate(tokens, first, end), read_s=end - sent)


def in_parallel(calls: Sequence[Callable[[], Sample]]) -> list[Sample]:
    """The calls started together, each on its own thread."""
    n = len(calls)
    results: list[Sample | BaseException] = [RuntimeError("not run")] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            start.wait()
            results[i] = calls[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [r for r in results if isinstance(r, Sample)]


# --------------------------------------------------------------------------- the rig


class Rig:
    """The servers and one ``infernet watch``; ``configure`` rewrites its file."""

    def __init__(self, work: Path, *, llama: bool, mid: bool = False) -> None:
        self.work = work
        self.stack = contextlib.ExitStack()
        self.llama = llama
        self.mid = llama and mid
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Rig:
        from reconciler.controlplane.identity import generate_key
        from tests.servers.controlplane_harness import start_control_plane
        from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

        work = self.work
        env = {"OLLAMA_NUM_PARALLEL": str(PARALLEL)}
        self.ollama = self.stack.enter_context(
            start_ollama_server(work / "ollama", DEFAULT_CATALOGUE, env=env)
        )
        self.cp = self.stack.enter_context(start_control_plane(work / "cp"))
        self.gguf = work / "gguf"
        self.gguf.mkdir()
        if self.llama:
            from tests.servers.llamacpp_harness import start_router
            from tests.servers.tinygguf import write_tiny_gguf

            write_tiny_gguf(work / TINY, name="tiny-chat")
            if self.mid:
                write_tiny_gguf(work / MID, name="mid-chat", hidden=512, layers=8, context=2048)
            # 512 tokens a slot; random weights may sample their end token at any time:
            # --ignore-eos makes every answer max_tokens long, direct and via alike.
            extra = ("-c", "4096", "-np", str(PARALLEL), "--ignore-eos")
            self.router = self.stack.enter_context(
                start_router(work / "router", self.gguf, extra_args=extra)
            )
        self.pubkey = generate_key(work / "node.key")
        self.config = work / "infernet.yaml"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "INFERNET_"))}
        self.env = env | {"INFERNET_NO_NVML": "1", "HOME": str(work / "home")}
        (work / "home").mkdir()
        self.log = (work / "watch.log").open("a")
        self.restart(OVERHEAD_POLL, 0.25)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop_watch()
            self.log.close()
        finally:
            self.stack.close()

    def _stop_watch(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, poll_interval: str | None, seconds: float) -> None:
        """(Re)start ``infernet watch`` with this ``jobs.poll_interval`` (None: the default);
        wait for it to advertise both models and to poll at that pace.

        A restart, not a file edit: an edit of ``jobs:`` reaches the job runner only at the
        daemon's next tick (up to ``heartbeat_interval``, 30 s; see bench/RESULTS.md).
        """
        self._stop_watch()
        self.configure(poll_interval)
        since = time.time()
        self.proc = subprocess.Popen(
            [INFERNET, "watch", "-c", str(self.config), "--state-dir", str(self.work / "state")],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        wanted = {SMALL, *((TINY, MID) if self.mid else (TINY,) if self.llama else ())}

        def advertising() -> bool:
            beats = [b for b in self.beats() if b["time"] >= since]
            served = beats[-1]["body"].get("specs", {}).get("served_models", []) if beats else []
            return wanted <= set(served)

        wait_for("the models advertised", advertising, 120)

        def spaced() -> bool:
            polls = [r["time"] for r in self.cp.received() if r["path"] == POLL]
            polls = [t for t in polls if t > since]
            return len(polls) >= 2 and abs((polls[-1] - polls[-2]) - seconds) < 0.5 * seconds

        wait_for(f"polls every {seconds:g}s", spaced, 3 * seconds + 30)

    def configure(self, poll_interval: str | None) -> None:
        """Write the file (``None``: the default poll interval)."""
        served: list[Any] = [SMALL]
        backends: dict[str, Any] = {
            "ollama": {
                "url": self.ollama.url,
                "registry": self.ollama.registry_url,
                "models_dir": str(self.ollama.models_dir),
            }
        }
        if self.llama:
            for name in (TINY, MID) if self.mid else (TINY,):
                source = f"file://{self.work / name}"
                served.append({"name": name, "backend": "llamacpp", "source": source})
            backends["llamacpp"] = {"models_dir": str(self.gguf), "url": self.router.url}
        jobs: dict[str, Any] = {"concurrency": PARALLEL}
        if poll_interval is not None:
            jobs["poll_interval"] = poll_interval
        doc = {
            "served_models": served,
            "backends": backends,
            "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
            "control_plane": {"url": self.cp.url, "key_file": str(self.work / "node.key")},
            "jobs": jobs,
        }
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config)

    def beats(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.cp.received()
            if r["path"] == HEARTBEAT and r["pubkey"] and r["status"] == 200
        ]

    def wait_jobs(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows = []
        for job in ids:
            left = max(0.1, deadline - time.monotonic())
            rows.append(self.cp.wait_job(job, timeout=left))
        return rows

    def carried(self) -> dict[str, float]:
        """Job id → when the first poll answer that carried it was ready (server time)."""
        first: dict[str, float] = {}
        for r in self.cp.received():
            if r["path"] == POLL and r["status"] == 200 and r["pubkey"] == self.pubkey:
                for job in r.get("jobs") or ():
                    first.setdefault(job, float(r["time"]))
        return first


def via_samples(
    rig: Rig, ids: list[str], backend_log: list[dict[str, Any]] | None = None
) -> list[Sample]:
    """Time to first token and tokens/s of jobs served by infernet, from what the control
    plane stored: the poll that carried the job → its first token event → its done event.

    With ``backend_log`` (the Ollama test server's requests; every job's messages unique) also
    when the job's chat reached the backend."""
    carried = rig.carried()
    samples = []
    for job in ids:
        events = rig.cp.job_events(job)
        kinds = [e["event_type"] for e in events]
        if kinds[0] != "meta" or kinds.count("meta") != 1 or kinds[-1] != "done":
            raise SystemExit(f"jobs_bench: job {job} was not served once: {kinds[:5]}…")
        tokens = [e for e in events if e["event_type"] == "token"]
        first, done = stamp(tokens[0]["created_at"]), stamp(events[-1]["created_at"])
        sample = Sample(first - carried[job], len(tokens), rate(len(tokens), first, done))
        sample.meta_apart = events[0]["created_at"] != tokens[0]["created_at"]
        finished = stamp(events[-1]["data"]["finished_at"])
        sample.read_s = finished - stamp(events[0]["data"]["started_at"])
        sample.tail_s = done - finished
        if backend_log is not None:
            messages = rig.cp.job(job)["input_spec"]["messages"]
            arrived = [
                r["time"]
                for r in backend_log
                if r["path"] == "/api/chat"
                and (r["body"] or {}).get("messages") == messages
                and r["time"] >= carried[job]
            ]
            sample.to_backend_s = min(arrived) - carried[job] if arrived else None
        samples.append(sample)
    return samples


# --------------------------------------------------------------------------- 1. overhead


def cpu_seconds(rig: Rig, backend: str) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of the run."""
    import psutil

    pids: dict[str, list[int | None]] = {
        "infernet": [rig.proc.pid if rig.proc else None],
        "control_plane": [rig.cp.pid],
        "bench": [os.getpid()],
    }
    if backend == "ollama":
        pids["backend"] = [rig.ollama.pid]
    else:
        pids["backend"] = [rig.router.pid, *(c.pid for c in rig.router.children())]
    used: dict[str, float] = {}
    for who, group in pids.items():
        used[who] = 0.0
        for pid in group:
            with contextlib.suppress(psutil.Error, TypeError):
                times = psutil.Process(pid).cpu_times()
                used[who] += times.user + times.system
    return used


@contextlib.contextmanager
def cpu_spent(rig: Rig, backend: str, into: dict[str, float]) -> Iterator[None]:
    """Add the CPU seconds each process used inside the block to ``into``."""
    before = cpu_seconds(rig, backend)
    yield
    after = cpu_seconds(rig, backend)
    for who, seconds in after.items():
        into[who] = into.get(who, 0.0) + seconds - before.get(who, 0.0)


def summarise(direct: list[Sample], via: list[Sample]) -> dict[str, Any]:
    d_ttft = [s.ttft_s for s in direct]
    v_ttft = [s.ttft_s for s in via]
    d_tps = [s.tokens_per_s for s in direct if s.tokens_per_s]
    v_tps = [s.tokens_per_s for s in via if s.tokens_per_s]
    out: dict[str, Any] = {
        "jobs": len(via),
        "direct_ttft_p50_s": statistics.median(d_ttft),
        "direct_ttft_p99_s": pct(d_ttft, 0.99),
        "via_ttft_p50_s": statistics.median(v_ttft),
        "via_ttft_p99_s": pct(v_ttft, 0.99),
        "direct_tokens_per_s": statistics.median(d_tps) if d_tps else None,
        "via_tokens_per_s": statistics.median(v_tps) if v_tps else None,
        "direct_tokens_mean": statistics.mean(s.tokens for s in direct),
        "via_tokens_mean": statistics.mean(s.tokens for s in via),
        "direct": [asdict(s) for s in direct],
        "via": [asdict(s) for s in via],
    }
    out["added_ttft_p50_s"] = out["via_ttft_p50_s"] - out["direct_ttft_p50_s"]
    out["added_ttft_p99_s"] = out["via_ttft_p99_s"] - out["direct_ttft_p99_s"]
    if d_tps and v_tps:
        out["tokens_per_s_ratio"] = out["via_tokens_per_s"] / out["direct_tokens_per_s"]
    else:
        out["tokens_per_s_ratio"] = None
    out["meta_apart"] = sum(s.meta_apart for s in via)
    for who, samples in (("direct", direct), ("via", via)):
        read = [s.read_s for s in samples if s.read_s is not None]
        out[f"{who}_read_p50_s"] = statistics.median(read) if read else None
    tails = [s.tail_s for s in via if s.tail_s is not None]
    out["tail_p50_s"] = statistics.median(tails) if tails else None
    out["tail_p99_s"] = pct(tails, 0.99) if tails else None
    to_backend = [s.to_backend_s for s in via if s.to_backend_s is not None]
    out["to_backend_p50_s"] = statistics.median(to_backend) if to_backend else None
    out["to_backend_p99_s"] = pct(to_backend, 0.99) if to_backend else None
    out["goal_met"] = out["added_ttft_p50_s"] <= 0.010 and (out["tokens_per_s_ratio"] or 0) >= 0.97
    return out


def via_round(rig: Rig, model: str, asks: list[list[dict[str, Any]]], max_tokens: int) -> list[str]:
    """One job per conversation in ``asks``, inserted in one go, waited for; their ids."""
    ids = rig.cp.create_jobs(
        len(asks),
        rig.pubkey,
        model_name=model,
        max_tokens=max_tokens,
        each=[{"messages": ask} for ask in asks],
    )
    rig.wait_jobs(ids, 120)
    return ids


def overhead(rig: Rig, p: Params) -> dict[str, Any]:
    """Item 1 on each backend, 1 and 8 at once, direct and via alternating round by round."""
    result: dict[str, Any] = {}
    rig.ollama.set_chat(token_delay=p.token_delay, reply_tokens=p.reply_tokens)
    backends: list[tuple[str, str, int]] = [("ollama", SMALL, p.reply_tokens)]
    if rig.llama:
        backends.append(("llamacpp", TINY, p.llama_tokens))
        if p.mid_tokens:
            backends.append(("llamacpp", MID, p.mid_tokens))
    for backend, model, max_tokens in backends:
        question = f"Tell me about {model}, at length."
        messages = [{"role": "user", "content": question}]
        # A first job (not counted) loads the model and shows the exact body infernet sends.
        via_round(rig, model, [messages], max_tokens)
        if backend == "ollama":
            sent = [
                r["body"]
                for r in rig.ollama.requests()
                if r["path"] == "/api/chat" and (r["body"] or {}).get("messages") == messages
            ][-1]
            base, url, stream = dict(sent), rig.ollama.url, direct_ollama
        else:
            stem = model.removesuffix(".gguf")
            model_id = next(m["id"] for m in rig.router.models() if stem in m["id"])
            base = {  # what reconciler.backends.chat.openai_body makes of the job
                "model": model_id,
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": max_tokens,
                "temperature": 0.7,
            }
            url, stream = rig.router.url, direct_llama
        stream(url, base | {"messages": messages})  # the direct path warmed up too
        for at_once in (1, PARALLEL):
            rounds = max(1, p.jobs // at_once)
            direct: list[Sample] = []
            ids: list[str] = []
            spent: dict[str, dict[str, float]] = {"direct": {}, "via": {}}
            for r in range(rounds):
                # Every chat a question of its own: each job's request is found at the backend.
                asks = [
                    [{"role": "user", "content": f"{question} ({at_once}.{r}.{i})"}]
                    for i in range(at_once)
                ]
                calls = [functools.partial(stream, url, base | {"messages": a}) for a in asks]

                # Alternate which goes first, so neither always runs right after the other.
                for way in ("via", "direct") if r % 2 else ("direct", "via"):
                    with cpu_spent(rig, backend, spent[way]):
                        if way == "via":
                            ids += via_round(rig, model, asks, max_tokens)
                        else:
                            direct += in_parallel(calls)
            log = rig.ollama.requests() if backend == "ollama" else None
            via = via_samples(rig, ids, log)
            key = f"{model.split(':')[0].removesuffix('.gguf')}_{at_once}"
            result[key] = summarise(direct, via) | {
                "backend": backend,
                "model": model,
                "at_once": at_once,
                "body": base,
                "cpu_ms_per_1k_tokens": {
                    way: {
                        who: seconds * 1e6 / max(1, sum(x.tokens for x in samples))
                        for who, seconds in spent[way].items()
                    }
                    for way, samples in (("direct", direct), ("via", via))
                },
            }
            print(f"  {key}: {_overhead_line(result[key])}", file=sys.stderr, flush=True)
    return result


def _overhead_line(d: dict[str, Any]) -> str:
    ratio = d["tokens_per_s_ratio"]
    return (
        f"TTFT direct {d['direct_ttft_p50_s'] * 1000:.1f}/{d['direct_ttft_p99_s'] * 1000:.1f} ms,"
        f" via {d['via_ttft_p50_s'] * 1000:.1f}/{d['via_ttft_p99_s'] * 1000:.1f} ms; tok/s ratio "
        + (f"{ratio:.3f}" if ratio is not None else "n/a")
    )


# --------------------------------------------------------------------------- 2. pick-up


def request_rate(rig: Rig, seconds: float) -> dict[str, Any]:
    """Control-plane requests of an idle node over ``seconds``, by route, a minute."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    seen = [r for r in rig.cp.received() if start <= r["time"] < end and r["pubkey"] == rig.pubkey]
    counts = {
        "job_polls": sum(r["path"] == POLL for r in seen),
        "heartbeats": sum(r["path"] == HEARTBEAT for r in seen),
        "command_polls": sum(r["path"] == COMMANDS for r in seen),
        "other": sum(r["path"] not in (POLL, HEARTBEAT, COMMANDS) for r in seen),
    }
    per_minute = {k: v * 60.0 / (end - start) for k, v in counts.items()}
    return {"seconds": end - start, "counts": counts, "per_minute": per_minute}


def pickup(rig: Rig, poll: str, n: int, window: float, seed: int) -> dict[str, Any]:
    """Jobs created at uniformly random moments of ``window``: assigned → meta stored."""
    rig.ollama.set_chat(token_delay=0.0, reply_tokens=8)
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0, window) for _ in range(n))
    started = time.monotonic()
    first_poll = time.time()
    ids = []
    for moment in moments:
        time.sleep(max(0.0, started + moment - time.monotonic()))
        ids.append(rig.cp.create_job(rig.pubkey, model_name=SMALL, max_tokens=8))
    rows = rig.wait_jobs(ids, float(poll.rstrip("s")) * 2 + 60)
    last_poll = time.time()
    carried = rig.carried()
    total, waited, worked = [], [], []
    for job, row in zip(ids, rows, strict=True):
        meta = next(e for e in rig.cp.job_events(job) if e["event_type"] == "meta")
        assigned = stamp(row["assigned_at"])
        total.append(stamp(meta["created_at"]) - assigned)
        waited.append(carried[job] - assigned)
        worked.append(stamp(meta["created_at"]) - carried[job])
    polls = [r for r in rig.cp.received() if r["path"] == POLL and r["pubkey"] == rig.pubkey]
    polls = [r for r in polls if first_poll <= r["time"] < last_poll]
    return {
        "poll_interval": poll,
        "jobs": n,
        "window_s": window,
        "p50_s": statistics.median(total),
        "p99_s": pct(total, 0.99),
        "max_s": max(total),
        "mean_s": statistics.mean(total),
        "wait_p50_s": statistics.median(waited),
        "work_p50_s": statistics.median(worked),
        "work_p99_s": pct(worked, 0.99),
        "job_polls_per_minute": len(polls) * 60.0 / (last_poll - first_poll),
        "samples_s": total,
    }


def pickups(rig: Rig, p: Params) -> dict[str, Any]:
    result: dict[str, Any] = {"runs": []}
    for i, (poll, n, window) in enumerate(p.pickup):
        seconds = float(poll.rstrip("s"))
        rig.restart(None if poll == "2s" else poll, seconds)
        if poll == "2s":
            print(f"  idle {p.idle_s:g}s at the default poll…", file=sys.stderr, flush=True)
            result["idle"] = request_rate(rig, p.idle_s)
        run = pickup(rig, poll, n, window, seed=15 + i)
        result["runs"].append(run)
        print(
            f"  pick-up at {poll}: p50 {run['p50_s']:.2f} s, p99 {run['p99_s']:.2f} s",
            file=sys.stderr,
            flush=True,
        )
    return result


# --------------------------------------------------------------------------- 3. exactly once


class RealDaemonLoop:
    """The real node daemon's job loop, as ``infernet-jobs.md`` §4 and §9 describe it.

    ``setInterval(pollJobs, interval)`` after one poll at start; ticks overlap freely (an async
    tick yields while it awaits, so a slow one never holds up the next: here each tick is a
    thread). ``pollJobs`` polls ``{limit: 5}`` and runs the returned jobs one after another;
    ``processJob`` never checks whether the job is already running. A chat streams Ollama's
    ``/api/chat`` (``num_thread`` always sent); events go through the ``EventBuffer``: a push
    that makes 16, or comes 250 ms or more after the last flush, flushes, and the stream waits
    for that POST; one more flush at the end; a failed flush is dropped. Then ``/complete``.
    """

    def __init__(self, node: Any, ollama_url: str, interval: float) -> None:
        self.node = node
        self.url = ollama_url
        self.interval = interval
        self.active: set[str] = set()
        self.runs = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn()  # start.js:737-739: a first poll at once
        threading.Thread(target=self._timer, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        for t in list(self.threads):
            t.join(60)

    def _timer(self) -> None:
        begun = time.monotonic()
        k = 1
        while not self.stopping.wait(max(0.0, begun + k * self.interval - time.monotonic())):
            self._spawn()
            k += 1

    def _spawn(self) -> None:
        t = threading.Thread(target=self._poll_jobs, daemon=True)
        self.threads.append(t)
        t.start()

    def _poll_jobs(self) -> None:
        resp = self.node.poll_jobs(5)
        if resp.status_code != 200:
            return
        for job in resp.json()["data"]["jobs"]:
            self._process(job)

    def _process(self, job: dict[str, Any]) -> None:
        with self.lock:
            self.active.add(job["id"])
            self.runs += 1
        started = time.monotonic()
        buffer: list[dict[str, Any]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            if buffer:
                self.node.post_events(job["id"], list(buffer))  # errors: dropped
                buffer.clear()
            last_flush = time.monotonic()

        def push(kind: str, data: dict[str, Any]) -> None:
            buffer.append({"event_type": kind, "data": data})
            if len(buffer) >= 16 or time.monotonic() - last_flush >= 0.25:
                flush()

        spec = job["input_spec"]
        options: dict[str, Any] = {"num_thread": max(1, (os.cpu_count() or 2) // 2)}
        if isinstance(spec.get("temperature"), (int, float)):
            options["temperature"] = spec["temperature"]
        if isinstance(spec.get("max_tokens"), (int, float)):
            options["num_predict"] = spec["max_tokens"]
        body = {
            "model": job["model_name"],
            "messages": spec["messages"],
            "stream": True,
            "options": options,
        }
        text = ""
        tokens = 0
        try:
            with (
                httpx.Client(timeout=60.0, trust_env=False) as client,
                client.stream("POST", f"{self.url}/api/chat", json=body) as resp,
            ):
                first = True
                for line in resp.iter_lines():
                    try:
                        part = json.loads(line)
                    except ValueError:
                        continue
                    if first:
                        push("meta", {"model": part.get("model"), "started_at": "now"})
                        first = False
                    content = (part.get("message") or {}).get("content")
                    if content:
                        text += content
                        tokens += 1
                        push("token", {"text": content})
                    if part.get("done"):
                        push("done", {"text": text, "reason": part.get("done_reason") or "stop"})
            flush()
            result = {
                "type": "chat",
                "text": text,
                "token_count": tokens,
                "duration_ms": round((time.monotonic() - started) * 1000),
                "completed_by": "real-daemon-replica",
            }
            self.node.complete(job["id"], {"status": "completed", "result": result})
        finally:
            with self.lock:
                self.active.discard(job["id"])


def exactly_once(rig: Rig, p: Params) -> dict[str, Any]:
    """Item 3: one long job on infernet, one on the replica, same poll interval and backend."""
    from tests.servers.controlplane_client import SignedNode

    poll = f"{p.once_poll_s:g}s"
    rig.restart(poll, p.once_poll_s)
    delay = 0.1
    tokens = round(p.once_job_s / delay)
    rig.ollama.set_chat(token_delay=delay, reply_tokens=tokens)
    result: dict[str, Any] = {"poll_interval_s": p.once_poll_s, "job_s": p.once_job_s}

    def count(job: str, marker: str) -> dict[str, Any]:
        events = rig.cp.job_events(job)
        chats = [
            r
            for r in rig.ollama.requests()
            if r["path"] == "/api/chat"
            and marker in json.dumps((r["body"] or {}).get("messages") or [])
        ]
        polls = [r for r in rig.cp.received() if r["path"] == POLL and job in (r.get("jobs") or ())]
        row = rig.cp.job(job)
        return {
            "polls_that_returned_it": len(polls),
            "meta_events": sum(e["event_type"] == "meta" for e in events),
            "done_events": sum(e["event_type"] == "done" for e in events),
            "token_events": sum(e["event_type"] == "token" for e in events),
            "backend_chats": len(chats),
            "complete_calls": row["complete_calls"],
            "answer_tokens": tokens,
            "status": row["status"],
        }

    marker = f"once-infernet-{time.time_ns()}"
    job = rig.cp.create_job(
        rig.pubkey,
        model_name=SMALL,
        messages=[{"role": "user", "content": marker}],
        max_tokens=tokens,
    )
    rig.wait_jobs([job], p.once_job_s * 4 + 30)
    time.sleep(2 * p.once_poll_s)  # more polls return nothing new: still one run
    result["infernet"] = count(job, marker)

    with SignedNode(rig.cp.url) as node:
        node.register("real-daemon-replica").raise_for_status()
        node.heartbeat({"served_models": [SMALL]}).raise_for_status()
        loop = RealDaemonLoop(node, rig.ollama.url, p.once_poll_s)
        marker = f"once-replica-{time.time_ns()}"
        job = rig.cp.create_job(
            node.pubkey,
            model_name=SMALL,
            messages=[{"role": "user", "content": marker}],
            max_tokens=tokens,
        )
        loop.start()
        try:
            rig.wait_jobs([job], p.once_job_s * 4 + 30)
            wait_for("the replica's runs to end", lambda: not loop.active, p.once_job_s * 10 + 30)
        finally:
            loop.stop()
        result["replica"] = count(job, marker) | {"runs": loop.runs}
    rig.ollama.reset_chat()
    print(
        f"  exactly once: infernet {result['infernet']['meta_events']} run(s), replica "
        f"{result['replica']['meta_events']}",
        file=sys.stderr,
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- the run


def llama_available() -> bool:
    from tests.servers import llamabuild

    return bool(os.environ.get("INFERNET_LLAMA_SERVER")) or llamabuild.binary_path().exists()


def run(quick: bool = False, *, llama: bool = True) -> dict[str, Any]:
    """Every item; the raw numbers (``report`` turns them into markdown)."""
    sys.path.insert(0, str(ROOT))
    p = QUICK if quick else FULL
    llama = llama and llama_available()
    data: dict[str, Any] = {
        "quick": quick,
        "params": asdict(p),
        "llama": llama,
        "load_average_start": load_average(),
    }
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="infernet-jobs-bench-") as tmp,
        Rig(Path(tmp), llama=llama, mid=p.mid_tokens > 0) as rig,
    ):
        data["startup_s"] = time.monotonic() - began
        print("jobs: 1. overhead…", file=sys.stderr, flush=True)
        mark = time.monotonic()
        data["overhead"] = overhead(rig, p)
        data["load_average_overhead"] = load_average()
        print("jobs: 3. exactly once…", file=sys.stderr, flush=True)
        data["overhead_s"], mark = time.monotonic() - mark, time.monotonic()
        data["once"] = exactly_once(rig, p)
        print("jobs: 2. pick-up…", file=sys.stderr, flush=True)
        data["once_s"], mark = time.monotonic() - mark, time.monotonic()
        data["pickup"] = pickups(rig, p)
        data["pickup_s"] = time.monotonic() - mark
        data["load_average_end"] = load_average()
        if rig.proc is not None and rig.proc.poll() is not None:
            raise SystemExit(f"jobs_bench: infernet watch exited ({rig.proc.returncode})")
        data["watch_tracebacks"] = (Path(tmp) / "watch.log").read_text().count("Traceback")
    data["seconds"] = time.monotonic() - began
    return data


# --------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:+.1f}" if seconds < 0 else f"{seconds * 1000:.1f}"


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(
    data: dict[str, Any], machine: dict[str, Any], command: str, raw: str = "bench/out/jobs.json"
) -> str:
    """The "Serving jobs" section of ``bench/RESULTS.md``: items 1, 2, 3 in the issue's order."""
    out = [
        f"## Serving jobs (issue 15), {machine['date'][:10]}",
        "",
        f"`{command}` on {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, "
        f"Python {machine['python']}, kernel {machine['kernel']}, {machine['date']}; load "
        f"average {data['load_average_start']} at the start, {data['load_average_end']} at the "
        f"end (the 2 cores are shared with other work); {data['seconds'] / 60:.1f} min. Raw "
        f"numbers: `{raw}` (not tracked)."
        + (
            " **A quick run (small counts): a smoke test, not a measurement.**"
            if data["quick"]
            else ""
        ),
        "",
        f"One `infernet watch` (`jobs.concurrency: {PARALLEL}`) serves `{SMALL}` on the "
        f"Ollama-compatible test server (`OLLAMA_NUM_PARALLEL={PARALLEL}`)"
        + (
            f" and `{TINY}` (the default tiny random GGUF, 0.37 MB)"
            + (
                f" and `{MID}` (hidden 512, 8 layers, 76 MB)"
                if data["params"]["mid_tokens"]
                else ""
            )
            + f" on the real llama-server router (`-c 4096 -np {PARALLEL} -t 1 --ignore-eos`, "
            "so every answer is `max_tokens` long)"
            if data["llama"]
            else " (llama-server was not built: no llama.cpp rows)"
        )
        + "; jobs come from the control-plane test server, all on this machine.",
        "",
    ]
    out += _report_overhead(data)
    out += _report_pickup(data)
    out += _report_once(data)
    return "\n".join(out).rstrip() + "\n"


def _report_overhead(data: dict[str, Any]) -> list[str]:
    ov = data.get("overhead") or {}
    if not ov:
        return []
    p = data["params"]
    paces = [
        f"Ollama test server {p['token_delay'] * 1000:g} ms a token, {p['reply_tokens']} tokens"
    ]
    if data["llama"]:
        paces.append(f"`{TINY}` `max_tokens` {p['llama_tokens']}")
        if p["mid_tokens"]:
            paces.append(f"`{MID}` `max_tokens` {p['mid_tokens']}")
    out = [
        "**1. Overhead against the backend called directly** (same run; direct and via "
        'infernet alternate round by round; "8" = 8 direct streams started together vs 8 '
        "jobs inserted in one go, answered in one poll). Direct: this process streams the "
        "backend's own endpoint with the body infernet sends (a fresh connection each); first "
        "token = request sent → first non-empty delta. Via infernet: the poll answer that "
        "carried the job (the control plane's request log) → the first `token` event stored "
        "(its `created_at`). Tokens/s = (tokens − 1) / (first token → end of the answer); via "
        "infernet from the stored events' `created_at`, so the event batching (first batch at "
        "once, then 16 events or 250 ms, one POST at a time) is inside it. "
        + "; ".join(paces)
        + f"; temperature 0.7. {p['jobs']} jobs a row: p99 is the largest. Goal: ≤ 10 ms "
        "added p50, ≥ 0.97× tokens/s.",
        "",
        "| backend, model | at once | first token direct p50 / p99 | via infernet p50 / p99 "
        "| added p50 / p99 | tokens/s direct | via infernet | ratio | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in ov.values():
        ratio = d["tokens_per_s_ratio"]
        out.append(
            f"| {d['backend']}, `{d['model']}` | {d['at_once']} | "
            f"{_ms(d['direct_ttft_p50_s'])} / {_ms(d['direct_ttft_p99_s'])} ms | "
            f"{_ms(d['via_ttft_p50_s'])} / {_ms(d['via_ttft_p99_s'])} ms | "
            f"**{_ms(d['added_ttft_p50_s'])}** / {_ms(d['added_ttft_p99_s'])} ms | "
            f"{d['direct_tokens_per_s'] or 0:,.0f} | {d['via_tokens_per_s'] or 0:,.0f} | "
            + (f"**{ratio:.3f}×**" if ratio is not None else "n/a")
            + f" | {'met' if d['goal_met'] else '**missed**'} |"
        )
    out += [
        "",
        "Where the time goes (p50): the answer read end to end (direct: request → end; via: "
        "infernet's own `meta.started_at` → `done.finished_at`), the `done` event's wait to be "
        "stored after infernet read the end (`finished_at` → stored), and, on Ollama, the poll "
        "answer → the job's chat request at the backend (parse, job book, thread, "
        "connection). Jobs whose `meta` was stored in a batch ahead of the first token's: "
        "none should be.",
        "",
        "| backend, model | at once | read direct | read via infernet | `done` stored after "
        "p50 / p99 | poll answer → backend p50 / p99 | `meta` apart |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in ov.values():
        to_backend = (
            f"{_ms(d['to_backend_p50_s'])} / {_ms(d['to_backend_p99_s'])} ms"
            if d.get("to_backend_p50_s") is not None
            else "–"
        )
        out.append(
            f"| {d['backend']}, `{d['model']}` | {d['at_once']} | "
            f"{_s(d['direct_read_p50_s'])} | {_s(d['via_read_p50_s'])} | "
            f"{_ms(d['tail_p50_s'])} / {_ms(d['tail_p99_s'])} ms | {to_backend} | "
            f"{d['meta_apart']}/{d['jobs']} |"
        )
    out += [
        "",
        "CPU per 1,000 tokens, ms (user + system, from `/proc`; every process shares the same 2 "
        "cores, so what infernet and the control-plane stand-in use is taken from a CPU-bound "
        "backend): infernet and the control-plane test server during the via rounds; the "
        "backend during the direct and the via rounds; this process's reader threads during the "
        "direct rounds.",
        "",
        "| backend, model | at once | infernet | control-plane stand-in | backend direct / via "
        "| direct readers |",
        "|---|---|---|---|---|---|",
    ]
    for d in ov.values():
        cpu = d.get("cpu_ms_per_1k_tokens")
        if not cpu:
            continue
        via, direct = cpu["via"], cpu["direct"]
        out.append(
            f"| {d['backend']}, `{d['model']}` | {d['at_once']} | {via.get('infernet', 0):.0f} | "
            f"{via.get('control_plane', 0):.0f} | {direct.get('backend', 0):.0f} / "
            f"{via.get('backend', 0):.0f} | {direct.get('bench', 0):.0f} |"
        )
    out.append("")
    return out


def _report_pickup(data: dict[str, Any]) -> list[str]:
    pk = data.get("pickup")
    if not pk:
        return []
    out = [
        "**2. Pick-up: job assigned → `meta` stored** (jobs created at uniformly random "
        "moments; 8-token answers, no token delay; `meta` goes with the first token). "
        '"Waiting": assigned → the poll answer that carried the job; "work": that answer → '
        "`meta` stored. With 12–40 jobs, p99 is the largest. The real daemon's row is the "
        "expectation for a 15 s poll (a uniform wait: 7.5 s on average), not a measurement; "
        "infernet at `poll_interval: 15s` is measured.",
        "",
        "| runner | poll interval | jobs | p50 | p99 | waiting p50 | work p50 / p99 "
        "| job polls a minute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in pk["runs"]:
        label = "infernet watch" + (" (default)" if r["poll_interval"] == "2s" else "")
        out.append(
            f"| {label} | {r['poll_interval']} | {r['jobs']} | **{_s(r['p50_s'])}** | "
            f"{_s(r['p99_s'])} | {_s(r['wait_p50_s'])} | "
            f"{_s(r['work_p50_s'])} / {_s(r['work_p99_s'])} | "
            f"{r['job_polls_per_minute']:.1f} |"
        )
    out += [
        f"| real daemon, **expected** | {REAL_POLL_S:g}s | – | {REAL_POLL_S / 2:g} s + work | "
        f"{REAL_POLL_S * 0.99:.2f} s + work | {REAL_POLL_S / 2:g} s | – | "
        f"{60 / REAL_POLL_S:g} |",
        "",
    ]
    idle = pk.get("idle")
    if idle:
        c, m = idle["counts"], idle["per_minute"]
        real = 60 / REAL_POLL_S + 60 / REAL_HEARTBEAT_S + 60 / max(2 * REAL_POLL_S, 30.0)
        ours = c["job_polls"] + c["heartbeats"] + c["command_polls"]
        out += [
            f"Control-plane requests of an idle node, counted over {idle['seconds']:.0f} s at "
            "the defaults (`jobs.poll_interval` 2 s, `heartbeat_interval` 30 s; a tick sends a "
            "heartbeat and a command poll):",
            "",
            "| runner | job polls | heartbeats | command polls | all, a minute |",
            "|---|---|---|---|---|",
            f"| infernet watch (measured: {c['job_polls']} + {c['heartbeats']} + "
            f"{c['command_polls']} in {idle['seconds']:.0f} s) | "
            f"{m['job_polls']:.1f}/min | {m['heartbeats']:.1f}/min | "
            f"{m['command_polls']:.1f}/min | **{ours * 60 / idle['seconds']:.1f}** |",
            "| real daemon (its defaults, `infernet-jobs.md` §9.1; not measured) | "
            f"{60 / REAL_POLL_S:g}/min (15 s) | {60 / REAL_HEARTBEAT_S:g}/min (30 s) | "
            f"{60 / max(2 * REAL_POLL_S, 30.0):g}/min (max(2×poll, 30 s)) | **{real:g}** |",
            "",
        ]
        if idle["seconds"] < 60:
            out += [
                f"A short window ({idle['seconds']:.0f} s): heartbeats and command polls come "
                "once a tick (30 s), so they may not show in it.",
                "",
            ]
    return out


def _report_once(data: dict[str, Any]) -> list[str]:
    once = data.get("once")
    if not once:
        return []
    tokens = once["infernet"]["answer_tokens"]
    out = [
        f"**3. A job longer than a poll interval** ({once['job_s']:g} s: {tokens} tokens at "
        f"100 ms; both poll every {once['poll_interval_s']:g} s), infernet and a replica of the "
        "real daemon's loop (`RealDaemonLoop` in `bench/jobs_bench.py`, from "
        "`infernet-jobs.md` §4 and §9.1: `setInterval(pollJobs, interval)` after a first poll, "
        "no in-flight guard, `{limit: 5}`, a poll's jobs one after another, events flushed at "
        "16 or 250 ms) against the same control-plane and Ollama test servers:",
        "",
        "| runner | polls that returned the job | runs (`meta` events) | backend chats | "
        f"`done` events | token events (the answer: {tokens}) | `complete` calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for who, label in (("infernet", "infernet watch"), ("replica", "real daemon's loop")):
        c = once[who]
        out.append(
            f"| {label} | {c['polls_that_returned_it']} | **{c['meta_events']}** | "
            f"{c['backend_chats']} | {c['done_events']} | {c['token_events']} | "
            f"{c['complete_calls']} |"
        )
    out.append("")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, well under a minute")
    parser.add_argument("--no-llama", action="store_true", help="skip llama-server")
    parser.add_argument("--json-out", type=Path, default=OUT / "jobs.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.all import machine

    info = machine()
    data = run(args.quick, llama=not args.no_llama)
    data["machine"] = info
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(data, indent=1))
    command = " ".join(["python -m bench.jobs_bench", *sys.argv[1:]])
    shown = args.json_out.resolve()
    raw = str(shown.relative_to(ROOT)) if shown.is_relative_to(ROOT) else str(shown)
    print(report(data, info, command, raw))
    print(f"raw: {args.json_out}; {data['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
