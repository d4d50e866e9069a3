"""Device check: gpu.py against nvidia-smi, and a plan refused because another process holds VRAM.

Run on a machine with an NVIDIA GPU (not a test; CI has no GPU). Without NVML it prints one line
saying so and exits 0.

    python bench/gpu_check.py --out gpu_check.json

(a) gpu.py's total/used/free per GPU beside ``nvidia-smi --query-gpu=...`` (MiB), and the
    difference;
(b) the Ollama-compatible test server (``tests/servers``) and an ``infernet.yaml`` with
    ``budget.vram`` unset (NVML gives the total) whose one model has a ``vram:`` estimate that
    fits now but not once another process holds X GiB: ``infernet plan --json`` says fits;
(c) a separate Python process allocates X GiB with torch (and writes it); once NVML lists it,
    the plan again: the other-process figure rose by about X GiB (plus its CUDA context) and
    the plan is refused, naming the model and the numbers;
(d) the process stops; a compact report is printed and written as JSON to ``--out``.

X is half the GPU's memory (whole GiB), the model's ``vram:`` is sized between "fits beside
X GiB of something else" and "fits alone", so it works on an 80 GiB H100 and a 141 GiB H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/gpu_check.py
    sys.path.insert(0, str(ROOT))

GiB = 1 << 30
MiB = 1 << 20
RESERVE_GIB = 1
CONTEXT_SLACK = 1 * GiB
"""What the allocating process may hold beyond its X GiB (its CUDA context), at most."""
MODEL = "qwen2.5:0.5b"  # in the test server's default catalogue

ALLOCATE = """
import sys, time, torch
x = torch.empty({nbytes}, dtype=torch.uint8, device="cuda")
x.fill_(1)  # touch every page, so the memory is really resident
torch.cuda.synchronize()
print("READY", flush=True)
sys.stdin.read()  # hold it until the parent closes our stdin
"""


def smi() -> list[dict[str, Any]]:
    """``nvidia-smi``'s view per GPU, in MiB."""
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.total,memory.used,memory.free",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return parse_smi(out)


def parse_smi(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.strip().splitlines():
        index, name, total, used, free = (part.strip() for part in line.split(","))
        rows.append(
            {
                "index": int(index),
                "name": name,
                "total_mib": int(total),
                "used_mib": int(used),
                "free_mib": int(free),
            }
        )
    return rows


def _nvml_detail(index: int) -> dict[str, float]:
    """NVML's v1 used and v2 reserved memory (MiB), to explain a used/free difference."""
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    out = {"v1_used_mib": round(pynvml.nvmlDeviceGetMemoryInfo(handle).used / MiB, 1)}
    try:
        v2 = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        out["v2_reserved_mib"] = round(getattr(v2, "reserved", 0) / MiB, 1)
    except Exception:  # an old driver without v2: gpu.py used v1 too
        out["v2_reserved_mib"] = 0.0
    return out


def compare_with_smi(state: Any) -> list[dict[str, Any]]:
    """Per GPU: gpu.py's figures in MiB, nvidia-smi's, and the differences (gpu.py − smi)."""
    rows = []
    ours = {g.index: g for g in state.gpus}
    for row in smi():
        g = ours.get(row["index"])
        if g is None:
            rows.append({**row, "missing_in_gpu_py": True})
            continue
        mine = {
            "total_mib": g.total_bytes / MiB,
            "used_mib": g.used_bytes / MiB,
            "free_mib": g.free_bytes / MiB,
        }
        diff = {k: round(mine[k] - row[k], 1) for k in mine}
        rows.append(
            {
                "index": row["index"],
                "name": row["name"],
                "smi": row,
                "gpu_py": {k: round(v, 1) for k, v in mine.items()},
                "diff_mib": diff,
                "nvml": _nvml_detail(row["index"]),
                # nvidia-smi rounds down to whole MiB
                "agree": all(abs(d) < 2 for d in diff.values()),
                "totals_agree": abs(diff["total_mib"]) < 2,
            }
        )
    return rows


def plan_once(config: Path, state_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    """``infernet plan --json`` and the human text; exit codes and the budget figures."""
    base = [
        sys.executable,
        "-m",
        "reconciler.cli",
        "plan",
        "-c",
        str(config),
        "--state-dir",
        str(state_dir),
    ]
    js = subprocess.run(
        [*base, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    text = subprocess.run(
        base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False
    )
    try:
        doc = json.loads(js.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(
            f"plan --json printed no JSON (exit {js.returncode}): {js.stderr.strip()[-500:]}"
        ) from exc
    b = doc["budget"]
    lines = text.stdout.splitlines()
    return {
        "exit_code": js.returncode,
        "text_exit_code": text.returncode,
        "fits": b["fits"],
        "vram_total_gib": round(b["vram_total_bytes"] / GiB, 2),
        "vram_available_gib": round(b["vram_available_bytes"] / GiB, 2),
        "foreign_gib": round(b["foreign_bytes"] / GiB, 2),
        "unattributed_gib": round(b["unattributed_bytes"] / GiB, 2),
        "foreign_processes": b["foreign_processes"],
        "errors": doc["errors"],
        "vram_lines": [line for line in lines if line.startswith(("VRAM", "Error"))],
    }


def _nvml_pids() -> set[int]:
    import pynvml

    pids: set[int] = set()
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        pids.update(p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    return pids


def _hold(nbytes: int) -> subprocess.Popen[str]:
    """A separate process holding ``nbytes`` of GPU memory, once NVML lists it."""
    template = os.environ.get("INFERNET_GPU_CHECK_ALLOCATE", ALLOCATE)
    code = template.replace("{nbytes}", str(nbytes))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        proc.kill()
        raise RuntimeError(f"the allocating process said {line!r} (exit {proc.wait()})")
    deadline = time.monotonic() + 30
    while proc.pid not in _nvml_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"NVML never listed the allocating process {proc.pid}")
        time.sleep(0.2)
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while proc.pid in _nvml_pids() and time.monotonic() < deadline:
        time.sleep(0.2)


def run_check(out: Path | None) -> dict[str, Any]:
    import yaml

    from reconciler import gpu
    from tests.servers.harness import DEFAULT_CATALOGUE, start_ollama_server

    state = gpu.read_gpus(None)
    report: dict[str, Any] = {"gpus": [g.name for g in state.gpus]}
    report["smi_compare"] = compare_with_smi(state)
    total = state.total_bytes or 0
    hold_gib = max(1, total // GiB // 2)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "INFERNET_"))}
        env.update({"HOME": str(tmp / "home"), "PYTHONUNBUFFERED": "1"})
        (tmp / "home").mkdir()
        with start_ollama_server(tmp / "ollama", DEFAULT_CATALOGUE) as server:
            config = tmp / "infernet.yaml"

            def write(vram_gib: int) -> None:
                doc = {
                    "served_models": [{"name": MODEL, "vram": f"{vram_gib}GiB"}],
                    "backends": {
                        "ollama": {
                            "url": server.url,
                            "registry": server.registry_url,
                            "models_dir": str(server.models_dir),
                        }
                    },
                    "budget": {"reserve": f"{RESERVE_GIB}GiB", "disk_reserve": "1GiB"},
                }
                config.write_text(yaml.safe_dump(doc, sort_keys=False))

            write(1)
            probe = plan_once(config, tmp / "state", env)
            available = probe["vram_available_gib"]
            # fits beside what is there now, not beside X GiB more of something else
            vram_gib = int(available - RESERVE_GIB - hold_gib / 2)
            write(vram_gib)
            before = plan_once(config, tmp / "state", env)
            holder = _hold(hold_gib * GiB)
            try:
                during = plan_once(config, tmp / "state", env)
            finally:
                _release(holder)
            after = plan_once(config, tmp / "state", env)
    rose = during["foreign_gib"] - before["foreign_gib"]
    report.update(
        {
            "hold_gib": hold_gib,
            "model": MODEL,
            "model_vram_gib": vram_gib,
            "before": before,
            "during": during,
            "after": after,
            "foreign_rise_gib": round(rose, 2),
        }
    )
    checks = {
        # used/free may differ by driver-reserved memory (NVML v2 keeps it apart); printed
        "smi_totals_agree": all(r.get("totals_agree") for r in report["smi_compare"]),
        "fits_before": before["fits"] and before["exit_code"] == 0,
        "foreign_rose_by_hold": 0 <= rose - hold_gib <= CONTEXT_SLACK / GiB,
        "refused_during": not during["fits"]
        and during["exit_code"] == 1
        and any(MODEL in e and "other processes" in e for e in during["errors"]),
        "fits_after": after["fits"] and after["exit_code"] == 0,
    }
    report["checks"] = checks
    report["ok"] = all(checks.values())
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"GPUs: {', '.join(report['gpus'])}")
    for row in report["smi_compare"]:
        if "smi" not in row:
            print(f"  GPU {row['index']}: listed by nvidia-smi, not by gpu.py")
            continue
        s, m, d = row["smi"], row["gpu_py"], row["diff_mib"]
        print(f"  GPU {row['index']} MiB      total     used     free")
        print(f"    nvidia-smi  {s['total_mib']:>8} {s['used_mib']:>8} {s['free_mib']:>8}")
        print(f"    gpu.py      {m['total_mib']:>8.1f} {m['used_mib']:>8.1f} {m['free_mib']:>8.1f}")
        nvml = row["nvml"]
        print(
            f"    difference  {d['total_mib']:>8.1f} {d['used_mib']:>8.1f} {d['free_mib']:>8.1f}"
            f"  ({'agree' if row['agree'] else 'differ'}; NVML v1 used "
            f"{nvml['v1_used_mib']}, v2 reserved {nvml['v2_reserved_mib']})"
        )
    print(
        f"model {report['model']} with vram: {report['model_vram_gib']} GiB; "
        f"another process holds {report['hold_gib']} GiB in step (c)"
    )
    for step in ("before", "during", "after"):
        r = report[step]
        print(
            f"  {step:<6} exit {r['exit_code']} fits={r['fits']} available "
            f"{r['vram_available_gib']} GiB of {r['vram_total_gib']} GiB, other processes "
            f"{r['foreign_gib']} GiB, unattributed {r['unattributed_gib']} GiB"
        )
        for line in r["vram_lines"]:
            print(f"         {line}")
    print(
        f"  other processes rose by {report['foreign_rise_gib']} GiB for {report['hold_gib']} "
        "GiB held"
    )
    failed = [name for name, ok in report["checks"].items() if not ok]
    print("gpu_check: OK" if report["ok"] else f"gpu_check: FAILED {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    from reconciler import gpu

    state = gpu.read_gpus(None)
    if state.source != "nvml":
        why = state.note or "no NVIDIA GPU"
        print(f"gpu_check: skipped, no NVML GPU here ({why})")
        if out:
            out.write_text(json.dumps({"skipped": why}) + "\n")
        return 0
    report = run_check(out)
    print_report(report)
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
