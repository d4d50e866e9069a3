"""Everything the terminal sees: plan tables, progress, results, JSON.

Human output of ``plan``/``status``/``model list`` goes to stdout; progress (``progress``) and
logs to stderr so ``--json`` stdout stays one clean document (or JSON lines for ``apply``).
Model and download sizes read as ``ollama list`` prints them (decimal: ``9.0 GB``); VRAM as
GPUs are sold and ``nvidia-smi`` counts (binary: ``8.4 GiB``); JSON keeps exact bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import IO, Any

from reconciler.model import Op, Plan
from reconciler.planning.document import revision
from reconciler.units import format_bytes, format_size

_SIGN = {Op.PULL: "+", Op.UPDATE: "~", Op.PIN: "^", Op.UNPIN: "v", Op.REMOVE: "-"}
_VERB = {
    Op.PULL: "to pull",
    Op.UPDATE: "to update",
    Op.PIN: "to pin",
    Op.UNPIN: "to unpin",
    Op.REMOVE: "to remove",
}


def human_bytes(n: int | None) -> str:
    """A model or download size: ``8988124069`` → ``8.9 GB``; ``?`` when unknown."""
    return "?" if n is None else format_size(n)


def vram(n: int | None) -> str:
    """VRAM: ``10200547328`` → ``9.5 GiB``; ``?`` when unknown."""
    return "?" if n is None else format_bytes(n)


def print_json(doc: Any, out: IO[str] | None = None) -> None:
    """One JSON document, one line."""
    print(json.dumps(doc, sort_keys=False), file=out or sys.stdout, flush=True)


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain aligned table (no box drawing: it must survive logs and pipes)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render_plan(plan: Plan, *, verbose: bool = False) -> str:
    """The plan as Terraform users expect to read it."""
    src = plan.source
    git = f", git {src.git_commit[:12]}" if src.git_commit else ""
    out = [f"Plan for {src.path} (sha256 {src.sha256[:12]}{git})", ""]
    if plan.actions:
        rows = []
        for a in plan.actions:
            size = ""
            if a.download_bytes:
                size = f"{human_bytes(a.download_bytes)} to download"
            rows.append([_SIGN[a.op], a.op.value, a.model, a.backend.value, size, a.reason])
        headers = ["", "ACTION", "MODEL", "BACKEND", "DOWNLOAD", "REASON"]
        revisions = [revision(a) for a in plan.actions]
        if any(revisions):  # HF repositories: the revision is its own column, not in the name
            rows = [[*r[:3], v or "", *r[3:]] for r, v in zip(rows, revisions, strict=True)]
            headers = [*headers[:3], "REVISION", *headers[3:]]
        out.append(table(rows, headers))
        out.append("")
    if verbose and plan.noops:
        rows = [["=", "none", n.model, n.backend.value, n.reason] for n in plan.noops]
        out.append(table(rows, ["", "ACTION", "MODEL", "BACKEND", "REASON"]))
        out.append("")
    out.extend(render_budget(plan))
    if verbose:
        out.extend(render_estimates(plan))
    if plan.advertised:
        out.append(f"Advertised after apply: {', '.join(plan.advertised)}")
    else:
        out.append("Advertised after apply: (nothing)")
    if plan.checks:
        tested = ", ".join(c.advertise_as for c in plan.checks)
        out.append(f"Tested before they are advertised (a one-token generation): {tested}")
    for warning in plan.warnings:
        out.append(f"Warning: {warning}")
    for error in plan.errors:
        out.append(f"Error: {error}")
    out.append("")
    if plan.errors:
        out.append("This plan has errors and will not be applied.")
    elif not plan.actions and plan.checks:
        out.append("No changes to the inventory; apply runs the tests above.")
    elif not plan.actions:
        out.append("No changes. The node matches the file.")
    else:
        counts: dict[Op, int] = {}
        for a in plan.actions:
            counts[a.op] = counts.get(a.op, 0) + 1
        parts = [f"{n} {_VERB[op]}" for op, n in counts.items()]
        out.append(f"Plan: {', '.join(parts)}.")
    return "\n".join(out)


def render_estimates(plan: Plan) -> list[str]:
    """``plan -v``: each VRAM estimate's parts beside the seed's bytes-per-parameter rule of
    thumb, so an operator sizing a GPU from that table sees why the figures differ (mostly the
    KV cache at the context the model runs at, which the table leaves out). A running engine's
    resident host memory is shown beside its claim: the claim is what the budget counts."""
    rows = []
    for e in plan.budget.estimates:
        figure = f"{vram(e.bytes)} ({e.source})"
        if e.rss_bytes is not None:
            figure += f", engine RSS {vram(e.rss_bytes)}"
        row = [e.model, figure, "", "", "", ""]
        if (p := e.parts) is not None:
            sequences = f" × {p.parallel}" if p.parallel > 1 else ""
            thumb = "" if p.rule_of_thumb is None else vram(p.rule_of_thumb)
            thumb += f" ({p.quantization})" if thumb and p.quantization else ""
            kv = f"{vram(p.kv)} at {p.context}{sequences}"
            row[2:] = [vram(p.weights), kv, vram(p.runtime), thumb]
        rows.append(row)
    if not rows:
        return []
    headers = ["MODEL", "VRAM ESTIMATE", "WEIGHTS", "KV CACHE AT CONTEXT", "RUNTIME"]
    return [
        "",
        table(rows, [*headers, "RULE OF THUMB"]),
        "Rule of thumb: parameters × bytes per parameter (FP16 2, INT8 1, INT4 0.5) + 15 %, "
        "no KV cache.",
        "",
    ]


def render_budget(plan: Plan) -> list[str]:
    """VRAM (pinned, largest swap-in, reserve against what is available), what other processes
    hold when they hold something, and disk (per backend when more than one downloads)."""
    b = plan.budget
    lines = []
    if b.vram_total_bytes is None:
        lines.append("VRAM: budget unknown")
    else:
        available = b.vram_total_bytes if b.vram_available_bytes is None else b.vram_available_bytes
        used = b.vram_pinned_bytes + b.largest_swap_in_bytes + b.reserve_bytes
        share = used / available if available else 1.0
        filled = min(20, round(share * 20))
        bar = "#" * filled + "." * (20 - filled)
        verdict = "fits" if b.fits else "DOES NOT FIT"
        of = f"{vram(b.vram_total_bytes)} ({b.vram_source})"
        if available < b.vram_total_bytes:
            of = f"{vram(available)} available ({vram(b.vram_total_bytes)} "
            of += f"{b.vram_source}, less memory held outside the backends)"
        lines.append(
            f"VRAM [{bar}] {share:.0%} of {of}: "
            f"pinned {vram(b.vram_pinned_bytes)} + largest swap-in "
            f"{vram(b.largest_swap_in_bytes)} + reserve {vram(b.reserve_bytes)}"
            f" — {verdict}"
        )
        held = []
        if b.foreign_bytes:
            shown = ", ".join(
                f"{p.name} {vram(p.bytes)}, pid {p.pid}" for p in b.foreign_processes[:3]
            )
            more = len(b.foreign_processes) - 3
            shown += f", {more} more" if more > 0 else ""
            held.append(
                f"other processes {vram(b.foreign_bytes)}" + (f" ({shown})" if shown else "")
            )
        if b.unattributed_bytes:
            held.append(f"{vram(b.unattributed_bytes)} used by no identifiable process")
        if held:
            lines.append(f"VRAM held outside the backends: {'; '.join(held)}")
    if len(b.disks) > 1:
        parts = [
            f"{d.backend.value} {human_bytes(d.download_bytes)} to download, "
            f"{human_bytes(d.free_bytes) if d.free_bytes is not None else 'unknown'} free at "
            f"{d.path}"
            for d in b.disks
        ]
        lines.append(f"Disk: {'; '.join(parts)} (reserve {human_bytes(b.disk_reserve_bytes)} each)")
        return lines
    free = human_bytes(b.disk_free_bytes) if b.disk_free_bytes is not None else "unknown"
    lines.append(
        f"Disk: {human_bytes(b.download_bytes)} to download, {free} free "
        f"(reserve {human_bytes(b.disk_reserve_bytes)})"
    )
    return lines


def render_models(rows: Iterable[dict[str, Any]]) -> str:
    """``model list``: Model, Size, Backend, Status (and Revision when an HF model is there)."""
    rows = list(rows)
    body = [[r["model"], human_bytes(r.get("size")), r["backend"], r["status"]] for r in rows]
    if any(r.get("revision") for r in rows):
        body = [[b[0], r.get("revision") or "", *b[1:]] for b, r in zip(body, rows, strict=True)]
        return table(body, ["MODEL", "REVISION", "SIZE", "BACKEND", "STATUS"])
    return table(body, ["MODEL", "SIZE", "BACKEND", "STATUS"])
