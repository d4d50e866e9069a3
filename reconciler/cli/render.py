"""Everything the terminal sees: plan tables, progress, results, JSON.

Human output of ``plan``/``status``/``model list`` goes to stdout; progress and logs to stderr
so ``--json`` stdout stays one clean document (or JSON lines for ``apply``). rich is imported
only when a progress bar is actually drawn on a terminal.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

from reconciler.events import Event, Kind
from reconciler.model import Op, Plan
from reconciler.planning.document import revision
from reconciler.units import format_bytes

_SIGN = {Op.PULL: "+", Op.UPDATE: "~", Op.PIN: "^", Op.UNPIN: "v", Op.REMOVE: "-"}
_VERB = {
    Op.PULL: "to pull",
    Op.UPDATE: "to update",
    Op.PIN: "to pin",
    Op.UNPIN: "to unpin",
    Op.REMOVE: "to remove",
}


def human_bytes(n: int | None) -> str:
    """``8988124069`` → ``8.4 GiB``; ``?`` when unknown."""
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
        of = f"{human_bytes(b.vram_total_bytes)} ({b.vram_source})"
        if available < b.vram_total_bytes:
            of = f"{human_bytes(available)} available ({human_bytes(b.vram_total_bytes)} "
            of += f"{b.vram_source}, less memory held outside the backends)"
        lines.append(
            f"VRAM [{bar}] {share:.0%} of {of}: "
            f"pinned {human_bytes(b.vram_pinned_bytes)} + largest swap-in "
            f"{human_bytes(b.largest_swap_in_bytes)} + reserve {human_bytes(b.reserve_bytes)}"
            f" — {verdict}"
        )
        held = []
        if b.foreign_bytes:
            shown = ", ".join(
                f"{p.name} {human_bytes(p.bytes)}, pid {p.pid}" for p in b.foreign_processes[:3]
            )
            more = len(b.foreign_processes) - 3
            shown += f", {more} more" if more > 0 else ""
            held.append(
                f"other processes {human_bytes(b.foreign_bytes)}" + (f" ({shown})" if shown else "")
            )
        if b.unattributed_bytes:
            held.append(f"{human_bytes(b.unattributed_bytes)} used by no identifiable process")
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


class ProgressPrinter:
    """Turns executor events into output: JSON lines, rich bars on a TTY, or plain lines."""

    def __init__(self, *, json_lines: bool, verbose: bool, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}
        self._speed: dict[str, tuple[float, int]] = {}
        self._last_line: dict[str, float] = {}
        # Bars on a terminal, started by the first action's event: nothing is drawn before
        # there is progress to show (the plan, a question, a heartbeat note come first).
        self._tty = not json_lines and self.stream.isatty()

    def _started_bars(self) -> Any:
        if self._bars is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bars.start()
        return self._bars

    def close(self) -> None:
        """Stop the live display."""
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self.json_lines:
                print_json(event.to_json())
            elif self._tty and event.action is not None:
                self._bar(event)
            else:
                self._line(event)

    def _bar(self, event: Event) -> None:
        action = event.action
        assert action is not None
        bars = self._started_bars()
        label = f"{action.op.value} {action.model}"
        task = self._tasks.get(label)
        if task is None:
            task = bars.add_task(label, total=None)
            self._tasks[label] = task
        if event.kind is Kind.PROGRESS and event.total:
            bars.update(task, completed=event.completed or 0, total=event.total)
        elif event.kind is Kind.FINISHED:
            done = "done" if event.outcome == "ok" else f"{event.outcome}: {event.message or ''}"
            bars.update(task, description=f"{label} — {done}")
            if event.outcome == "ok":
                total = bars.tasks[task].total or 1
                bars.update(task, completed=total, total=total)
        elif event.kind is Kind.RETRY:
            bars.console.print(f"retry {label}: {event.message}")

    def _line(self, event: Event) -> None:
        action = event.action
        label = f"{action.op.value} {action.model}" if action else ""
        if event.kind is Kind.STARTED:
            self._speed[label] = (time.monotonic(), 0)
            print(f"{label}: started", file=self.stream, flush=True)
        elif event.kind is Kind.PROGRESS and self.verbose and event.total:
            now = time.monotonic()
            if now - self._last_line.get(label, 0.0) < 1.0 and event.completed != event.total:
                return
            self._last_line[label] = now
            start, _ = self._speed.get(label, (now, 0))
            done = event.completed or 0
            rate = done / max(now - start, 1e-6)
            pct = 100 * done / event.total
            # The seed's line: percent, GB done/total, speed; MB for models under a GB.
            unit, scale = ("GB", 1e9) if event.total >= 1e9 else ("MB", 1e6)
            print(
                f"{label}: {event.phase or ''} {pct:3.0f}% {done / scale:.2f}/"
                f"{event.total / scale:.2f} {unit} {rate / 1e6:.1f} MB/s",
                file=self.stream,
                flush=True,
            )
        elif event.kind is Kind.FINISHED:
            tail = f": {event.message}" if event.message else ""
            print(f"{label}: {event.outcome}{tail}", file=self.stream, flush=True)
        elif event.kind in (Kind.RETRY, Kind.NOTE):
            prefix = f"{label}: " if label else ""
            print(f"{prefix}{event.message}", file=self.stream, flush=True)


def render_models(rows: Iterable[dict[str, Any]]) -> str:
    """``model list``: Model, Size, Backend, Status (and Revision when an HF model is there)."""
    rows = list(rows)
    body = [[r["model"], human_bytes(r.get("size")), r["backend"], r["status"]] for r in rows]
    if any(r.get("revision") for r in rows):
        body = [[b[0], r.get("revision") or "", *b[1:]] for b, r in zip(body, rows, strict=True)]
        return table(body, ["MODEL", "REVISION", "SIZE", "BACKEND", "STATUS"])
    return table(body, ["MODEL", "SIZE", "BACKEND", "STATUS"])
