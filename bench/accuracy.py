"""Benchmark: the llama.cpp memory estimate against a real ``llama-server`` (not a test).

Writes random-weight llama-architecture GGUF files of several sizes with the ``gguf`` package,
starts a real ``llama-server`` in router mode for each (context, parallel) pair (``-c
context×parallel -np parallel``: each slot serves ``context`` tokens), loads every model through
``POST /models/load``, waits for ``GET /models`` to say ``loaded``, sends one multi-prompt
completion that fills every slot's whole context (so the compute buffer, the attention mask and
each slot are really used, as serving uses them), and measures the router's child for that
model (found by ``--alias <id>`` in its command line):

* on CPU, its peak resident set (``VmHWM``; RSS and USS go into the JSON too);
* with ``--gpu`` on an NVIDIA GPU (children run with ``-ngl 999``), NVML's per-process used
  GPU memory.

Then it compares with ``budget.estimate`` given only the ``ModelFacts`` read from the GGUF
metadata (``gguf.GGUFReader``): the figure the planner would budget. A row passes when the
estimate is within +0..10 % of the measurement (never below it). The buffer sizes llama.cpp
logs (model, KV cache, compute) are printed beside it to explain the terms; the estimate never
reads them.

    .venv/bin/python -m bench.accuracy [--gpu] [--json-out FILE] [--models tiny,m100,m500]
                                       [--contexts 256,2048,8192] [--parallel 1,2]

The binary is ``tests/servers/llamabuild.py``'s ``build()`` (``INFERNET_LLAMA_SERVER``
overrides). ``LLAMA_CACHE`` is set to an empty temporary folder, so the router lists only the
models written here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/accuracy.py
    sys.path.insert(0, str(ROOT))

from reconciler import budget  # noqa: E402
from reconciler.model import BackendKind, ModelFacts, ModelSpec  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TRAINED_CONTEXT = 16384


@dataclasses.dataclass(frozen=True)
class Shape:
    """A llama-architecture model to write: sizes and weight type."""

    hidden: int
    layers: int
    ff: int
    heads: int
    kv_heads: int
    vocab: int
    f16: bool


SHAPES: dict[str, Shape] = {
    # the reference's tiny model (64 wide, F32), with Llama 2's vocabulary size like the others
    "tiny": Shape(hidden=64, layers=2, ff=256, heads=4, kv_heads=2, vocab=32000, f16=False),
    # about 100M parameters, F16 (GPT-2-small-like widths, grouped-query attention)
    "m100": Shape(hidden=768, layers=12, ff=2048, heads=12, kv_heads=4, vocab=32000, f16=True),
    # about 500M parameters, F16
    "m500": Shape(hidden=1536, layers=18, ff=4096, heads=12, kv_heads=4, vocab=32000, f16=True),
}


# --------------------------------------------------------------------------- GGUF files


def _tokens(vocab: int) -> tuple[list[str], list[int]]:
    """``<unk> <s> </s>``, the 256 byte tokens, then plain filler tokens up to ``vocab``."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types += [1] * (vocab - len(types))  # NORMAL
    return tokens, types


def write_model(path: Path, name: str, shape: Shape, seed: int = 0) -> int:
    """Write a random-weight llama GGUF at ``path``; returns its parameter count."""
    import gguf

    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.f16 else np.float32
    partial = path.with_name(path.name + ".partial")  # the router must never list half a file
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(name)
    writer.add_context_length(TRAINED_CONTEXT)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    kind = gguf.LlamaFileType.MOSTLY_F16 if shape.f16 else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(int(kind))
    tokens, types = _tokens(shape.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * shape.vocab)
    params = 0

    def add(tensor_name: str, rows: int, cols: int | None = None) -> None:
        nonlocal params
        if cols is None:  # norms stay F32 with weight 1, as converted models have them
            data = np.ones(rows, dtype=np.float32)
        else:
            data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)
        params += data.size
        writer.add_tensor(tensor_name, data)

    kv = shape.hidden // shape.heads * shape.kv_heads
    add("token_embd.weight", shape.vocab, shape.hidden)  # no output.weight: tied head
    add("output_norm.weight", shape.hidden)
    for i in range(shape.layers):
        add(f"blk.{i}.attn_norm.weight", shape.hidden)
        add(f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden)
        add(f"blk.{i}.attn_k.weight", kv, shape.hidden)
        add(f"blk.{i}.attn_v.weight", kv, shape.hidden)
        add(f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden)
        add(f"blk.{i}.ffn_norm.weight", shape.hidden)
        add(f"blk.{i}.ffn_gate.weight", shape.ff, shape.hidden)
        add(f"blk.{i}.ffn_up.weight", shape.ff, shape.hidden)
        add(f"blk.{i}.ffn_down.weight", shape.hidden, shape.ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return params


def ensure_models(folder: Path, names: list[str]) -> dict[str, int]:
    """The models in ``folder`` (written once; a sidecar remembers the shape they were made
    with, so a changed shape rewrites the file)."""
    folder.mkdir(parents=True, exist_ok=True)
    params: dict[str, int] = {}
    for name in names:
        path, meta = folder / f"{name}.gguf", folder / f"{name}.json"
        want = dataclasses.asdict(SHAPES[name]) | {"trained": TRAINED_CONTEXT}
        if path.exists() and meta.exists():
            saved = json.loads(meta.read_text())
            if saved.get("shape") == want:
                params[name] = int(saved["params"])
                continue
        started = time.monotonic()
        params[name] = write_model(path, name, SHAPES[name])
        meta.write_text(json.dumps({"shape": want, "params": params[name]}))
        took = time.monotonic() - started
        print(f"wrote {path.name}: {params[name]:,} parameters, "
              f"{path.stat().st_size / MiB:.1f} MiB in {took:.1f} s", flush=True)  # fmt: skip
    return params


def facts_from_gguf(path: Path, *, context: int, parallel: int) -> ModelFacts:
    """What a backend would know from the file's metadata alone, plus how it runs it."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def scalar(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = scalar("general.architecture")
    size = path.stat().st_size
    return ModelFacts(
        size=size, weights_bytes=size, family=arch, format="gguf",
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        context_length=scalar(f"{arch}.context_length"),
        block_count=scalar(f"{arch}.block_count"),
        head_count=scalar(f"{arch}.attention.head_count"),
        head_count_kv=scalar(f"{arch}.attention.head_count_kv"),
        embedding_length=scalar(f"{arch}.embedding_length"),
        key_length=scalar(f"{arch}.attention.key_length"),
        value_length=scalar(f"{arch}.attention.value_length"),
        file_type=scalar("general.file_type"),
        run_context=context, parallel=parallel,
    )  # fmt: skip


def rescore(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Recorded measurements against today's estimate: the formula is a pure function of the
    model's metadata (rebuilt from its shape and recorded weight bytes), so a run on a lent GPU
    can be scored again after the estimate changes without the GPU."""
    out = []
    for row in rows:
        shape = SHAPES[row["model"]]
        weights = int(row["estimate_parts"]["weights"])
        facts = ModelFacts(
            size=weights, weights_bytes=weights, family="llama", format="gguf",
            parameter_count=row["params"], block_count=shape.layers, head_count=shape.heads,
            head_count_kv=shape.kv_heads, embedding_length=shape.hidden,
            run_context=row["context"], parallel=row["parallel"],
        )  # fmt: skip
        spec = ModelSpec(row["model"], BackendKind.LLAMACPP, row["model"], row["model"])
        on_gpu = row["device"] == "gpu"
        est = budget.estimate(spec, facts, None, None, accelerator=on_gpu).bytes or 0
        parts = (
            budget.llamacpp_parts(facts, row["context"], row["parallel"], accelerator=on_gpu) or {}
        )
        measured = row["measured_bytes"]
        ratio = est / measured if measured else float("nan")
        residual = measured - sum(v for k, v in parts.items() if k != "runtime")
        out.append({
            **row, "estimate_bytes": est, "estimate_parts": parts, "ratio": round(ratio, 4),
            "ok": measured > 0 and 1.0 <= ratio <= 1.10, "residual_bytes": residual,
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- llama-server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Router:
    """A running router, its HTTP client and its log file."""

    proc: subprocess.Popen[bytes]
    url: str
    http: httpx.Client
    log: Path

    def status(self, model: str) -> dict[str, Any]:
        for entry in self.http.get(f"{self.url}/models").json()["data"]:
            if entry["id"] == model:
                status: dict[str, Any] = entry["status"]
                return status
        raise RuntimeError(f"{model} is not listed by the router")

    def wait(self, model: str, want: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(model)
            if status.get("failed"):
                raise RuntimeError(f"{model} failed to load (exit {status.get('exit_code')}); "
                                   f"see {self.log}")  # fmt: skip
            if status["value"] == want:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"{model} not {want} after {timeout:.0f} s; see {self.log}")


@contextlib.contextmanager
def router(binary: Path, models: Path, log: Path, *, context: int, parallel: int, gpu: bool,
           threads: int) -> Iterator[Router]:  # fmt: skip
    """A router whose children run ``context`` tokens per sequence, ``parallel`` sequences.

    llama-server's ``-c`` is the total over its ``-np`` slots (each slot gets ``-c / -np``),
    so a backend serving ``context`` tokens to each of ``parallel`` requests runs
    ``-c context×parallel``; that is what the planner's ``run_context``/``parallel`` mean.
    """
    port = _free_port()
    args = [
        str(binary), "--host", "127.0.0.1", "--port", str(port), "--models-dir", str(models),
        "--models-max", "1", "-c", str(context * parallel), "-np", str(parallel),
        "-t", str(threads), "-tb", str(threads), "--no-warmup", "--cache-ram", "0",
        "--no-webui", "-lv", "4", "--fit", "off",
        *(["-ngl", "999"] if gpu else ["-ngl", "0"]),
    ]  # fmt: skip
    cache = tempfile.mkdtemp(prefix="llama-cache-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env["LLAMA_CACHE"] = cache
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    http = httpx.Client(timeout=httpx.Timeout(600.0, connect=5.0))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not ready after 30 s; see {log}")
            time.sleep(0.05)
        yield Router(proc, url, http, log)
    finally:
        http.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(cache, ignore_errors=True)


def find_child(router_pid: int, alias: str) -> psutil.Process:
    """The router's child serving ``alias`` (child PIDs are not in the API)."""
    for child in psutil.Process(router_pid).children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if any(a == "--alias" and b == alias for a, b in itertools.pairwise(cmd)):
                return child
    raise RuntimeError(f"no child of router {router_pid} has --alias {alias}")


_BUFFER = re.compile(
    r"(?P<dev>[A-Za-z0-9_]+)\s+(?P<what>model|KV|compute|output) buffer size\s*=\s*"
    r"(?P<mib>[0-9.]+) MiB"
)


def logged_buffers(log: Path, port: int) -> dict[str, float]:
    """The buffer sizes (MiB) the child on ``port`` logged: ``what/device`` → MiB."""
    found: dict[str, float] = {}
    prefix = f"[{port}]"
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith(prefix):
            continue
        match = _BUFFER.search(line)
        if match:
            key = f"{match['what']}/{match['dev']}"
            found[key] = found.get(key, 0.0) + float(match["mib"])
    return found


# --------------------------------------------------------------------------- measuring


class GpuMeter:
    """NVML's per-process used GPU memory (all GPUs, summed)."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
        ]
        self.total = sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).total) for h in self.handles)

    def used_by(self, pid: int) -> int | None:
        total, seen = 0, False
        for handle in self.handles:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
                    seen = True
        return total if seen else None


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def measure_cpu(child: psutil.Process) -> dict[str, int]:
    info = child.memory_full_info()
    return {"rss": int(info.rss), "uss": int(info.uss), "hwm": _status_kib(child.pid, "VmHWM")}


def _exercise(rt: Router, model: str, tokens: int, parallel: int) -> None:
    """One completion per slot over ``tokens`` byte tokens each, sent as one multi-prompt
    request so the server starts them together and their prompts share micro-batches: the
    compute buffer, every slot and its context are then really used."""
    prompts = [
        [1] + [3 + (i * 7 + seq * 13) % 256 for i in range(tokens - 1)]  # BOS, byte tokens
        for seq in range(parallel)
    ]
    body = {"model": model, "prompt": prompts, "n_predict": 1, "cache_prompt": False}
    rt.http.post(f"{rt.url}/completion", json=body).raise_for_status()


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a model under one router's context and parallel settings."""

    name: str
    params: int
    context: int
    parallel: int


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every row shares."""

    models_dir: Path
    meter: GpuMeter | None
    prompt_tokens: int


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from tests.servers import llamabuild

    binary = llamabuild.build()
    work = Path(args.workdir)
    setup = Setup(work / "models", GpuMeter() if args.gpu else None, args.prompt_tokens)
    names = args.models.split(",")
    params = ensure_models(setup.models_dir, names)
    rows: list[dict[str, Any]] = []
    for parallel in [int(p) for p in args.parallel.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            log = work / f"router-c{context}-np{parallel}.log"
            with router(binary, setup.models_dir, log, context=context, parallel=parallel,
                        gpu=args.gpu, threads=args.threads) as rt:  # fmt: skip
                for name in names:
                    rows.append(_row(rt, Case(name, params[name], context, parallel), setup))
    return rows


def _row(rt: Router, case: Case, setup: Setup) -> dict[str, Any]:
    name, context, parallel, meter = case.name, case.context, case.parallel, setup.meter
    rt.http.post(f"{rt.url}/models/load", json={"model": name}).raise_for_status()
    status = rt.wait(name, "loaded")
    child = find_child(rt.proc.pid, name)
    cmd = status.get("args", [])
    port = int(cmd[cmd.index("--port") + 1])
    at_load = measure_cpu(child)
    gpu_at_load = meter.used_by(child.pid) if meter else None
    cap = setup.prompt_tokens
    tokens = context - 8 if cap <= 0 else min(context - 8, cap)
    started = time.monotonic()
    _exercise(rt, name, tokens, parallel)
    took = time.monotonic() - started
    served = measure_cpu(child)
    gpu_served = meter.used_by(child.pid) if meter else None
    buffers = logged_buffers(rt.log, port)
    rt.http.post(f"{rt.url}/models/unload", json={"model": name}).raise_for_status()
    rt.wait(name, "unloaded")
    facts = facts_from_gguf(setup.models_dir / f"{name}.gguf", context=context, parallel=parallel)
    spec = ModelSpec(name, BackendKind.LLAMACPP, name, name)
    on_gpu = meter is not None
    est = budget.estimate(spec, facts, None, meter.total if meter else None, accelerator=on_gpu)
    parts = budget.llamacpp_parts(facts, context, parallel, accelerator=on_gpu) or {}
    if meter is not None:
        measured = max(gpu_at_load or 0, gpu_served or 0)
    else:
        measured = max(served["hwm"], served["rss"])
    estimate = est.bytes or 0
    ratio = estimate / measured if measured else float("nan")
    # what the runtime term would have to be for this row alone: measured less the buffers
    residual = measured - sum(v for k, v in parts.items() if k != "runtime")
    return {
        "model": name, "params": case.params, "context": context, "parallel": parallel,
        "device": "gpu" if meter else "cpu", "prompt_tokens": tokens,
        "request_s": round(took, 2), "estimate_bytes": estimate, "estimate_source": est.source,
        "estimate_parts": parts, "measured_bytes": measured, "ratio": round(ratio, 4),
        "ok": measured > 0 and 1.0 <= ratio <= 1.10, "residual_bytes": residual,
        "cpu_at_load": at_load, "cpu_served": served,
        "gpu_at_load": gpu_at_load, "gpu_served": gpu_served, "logged_mib": buffers,
    }  # fmt: skip


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["model", "params", "ctx", "par", "estimate MiB", "measured MiB", "ratio",
            "ok", "runtime est/left MiB", "logged model/KV/compute MiB"]  # fmt: skip
    lines = [head]
    for r in rows:
        logged = r["logged_mib"]
        model = sum(v for k, v in logged.items() if k.startswith("model/"))
        kv = sum(v for k, v in logged.items() if k.startswith("KV/"))
        compute = sum(v for k, v in logged.items() if k.startswith("compute/"))
        lines.append([
            r["model"], f"{r['params'] / 1e6:.1f}M", str(r["context"]), str(r["parallel"]),
            _mib(r["estimate_bytes"]), _mib(r["measured_bytes"]), f"{r['ratio']:.3f}",
            "yes" if r["ok"] else "no",
            f"{_mib(r['estimate_parts'].get('runtime'))}/{_mib(r['residual_bytes'])}",
            f"{model:.1f}/{kv:.1f}/{compute:.1f}",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="offload to the NVIDIA GPU, use NVML")
    parser.add_argument("--models", default="tiny,m100,m500")
    parser.add_argument("--contexts", default="256,2048,8192")
    parser.add_argument("--parallel", default="1,2")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="prompt length of the exercising request; 0 = fill the sequence's "
        "context (the attention mask is then resident on CPU too)",
    )
    parser.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "accuracy"))
    parser.add_argument("--json-out", help="write the rows and the machine as JSON here")
    parser.add_argument(
        "--rescore", metavar="JSON",
        help="score the measurements of an earlier --json-out run against the current "
        "estimate (no llama-server, no GPU needed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.rescore:
        recorded = json.loads(Path(args.rescore).read_text())
        rows = rescore(recorded["rows"])
        print(f"recorded on {recorded.get('device') or recorded.get('machine')}")
        print_table(rows)
        good = sum(1 for r in rows if r["ok"])
        print(f"{good}/{len(rows)} rows within +0..10 % of the measurement")
        return 0 if good == len(rows) else 1
    if args.gpu:
        try:
            GpuMeter()
        except Exception as exc:  # no driver, no pynvml: nothing to measure against
            print(f"accuracy --gpu: NVML unavailable ({type(exc).__name__}: {exc}); skipped")
            return 0
    rows = run(args)
    print_table(rows)
    passed = sum(r["ok"] for r in rows)
    print(f"{passed}/{len(rows)} rows within +0..10 % of the measurement")
    measured = [r for r in rows if r["measured_bytes"]]
    if measured:  # for recalibrating: what the runtime term had to cover, row by row
        left = [r["residual_bytes"] / MiB for r in measured]
        now = sorted({r["estimate_parts"].get("runtime", 0) / MiB for r in measured})
        print(f"measured less weights, KV and compute: {min(left):.1f}..{max(left):.1f} MiB "
              f"(runtime term now {', '.join(f'{n:.1f}' for n in now)} MiB)")  # fmt: skip
    if args.json_out:
        doc = {
            "machine": {"node": platform.node(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S %z")},
            "device": "gpu" if args.gpu else "cpu", "rows": rows,
        }  # fmt: skip
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
