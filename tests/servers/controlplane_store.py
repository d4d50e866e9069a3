"""What the Infernet control-plane stand-in remembers, and the rules it applies to it.

Each method mirrors one function of the real control plane (``apps/web/lib/data/node-api.js``
and ``node-commands.js`` in Infernet Protocol): same checks in the same order, same HTTP
statuses and error texts. Supabase rows become dicts; every method runs under one lock.
Errors are raised as :class:`Refusal` and answered as ``{"error": message}``.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

ROLES = ("provider", "aggregator", "client")
KNOWN_VENDORS = ("nvidia", "amd", "apple", "intel")
VRAM_TIERS = ("<8gb", "8-16gb", "16-24gb", "24-48gb", ">=48gb", "unknown")
MAX_SPECS_GPUS = 16
MAX_POLL_LIMIT = 10
MAX_ERROR_CHARS = 2000
_VERSION_RE = re.compile(r"^[0-9A-Za-z._+-]{1,32}$")
_CSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_OSC_RE = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_ESC_RE = re.compile(r"\x1b[@-Z\\-_]")


class Refusal(Exception):
    """An answer other than 200: ``status`` and the ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_number(value: Any) -> bool:
    """JavaScript's ``Number.isFinite``: a finite number, and a bool is not one."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def vram_tier(vram_mb: Any) -> str:
    if not is_number(vram_mb) or vram_mb <= 0:
        return "unknown"
    for bound, tier in ((8, "<8gb"), (16, "8-16gb"), (24, "16-24gb"), (48, "24-48gb")):
        if vram_mb < bound * 1024:
            return tier
    return ">=48gb"


def sanitize_gpu(gpu: Any) -> dict[str, Any] | None:
    if not isinstance(gpu, dict):
        return None
    vendor = gpu["vendor"].lower() if isinstance(gpu.get("vendor"), str) else None
    client_tier = gpu["vram_tier"].lower() if isinstance(gpu.get("vram_tier"), str) else None
    tier = client_tier if client_tier in VRAM_TIERS else vram_tier(gpu.get("vram_mb"))
    return {
        "vendor": vendor if vendor in KNOWN_VENDORS else "unknown",
        "vram_tier": tier,
        "model": gpu["model"][:64] if isinstance(gpu.get("model"), str) else None,
    }


def sanitize_specs(specs: Any) -> dict[str, Any] | None:
    """``sanitizeSpecs``: only the coarse, public shape survives register."""
    if not isinstance(specs, dict):
        return None
    gpus = specs["gpus"][:MAX_SPECS_GPUS] if isinstance(specs.get("gpus"), list) else []
    served = specs.get("served_models")
    models = (
        [m for m in served if isinstance(m, str) and 0 < len(m) <= 200][:50]
        if isinstance(served, list)
        else []
    )
    e2e_version = specs.get("e2e_version")
    cli_version = specs.get("cli_version")
    return {
        "gpus": [g for g in (sanitize_gpu(g) for g in gpus) if g is not None],
        "gpu_count": len(gpus),
        "served_models": models,
        "e2e_capable": specs.get("e2e_capable") is True,
        "e2e_version": e2e_version
        if isinstance(e2e_version, str) and 0 < len(e2e_version) <= 32
        else None,
        "cli_version": cli_version
        if isinstance(cli_version, str) and _VERSION_RE.match(cli_version)
        else None,
    }


def clean_command_error(text: str) -> str:
    """``cleanCommandError``: no terminal codes, last frame of each spinner, the tail only."""
    text = _ESC_RE.sub("", _OSC_RE.sub("", _CSI_RE.sub("", text)))
    lines = []
    for line in text.split("\n"):
        frames = [part for part in line.split("\r") if part.strip()]
        lines.append((frames[-1] if frames else "").rstrip())
    kept = [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]
    cleaned = "\n".join(kept).strip()
    return "…" + cleaned[-MAX_ERROR_CHARS:] if len(cleaned) > MAX_ERROR_CHARS else cleaned


class Store:
    """Node rows per role table, the ``node_commands`` table, and the request log."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.rows: dict[tuple[str, str], dict[str, Any]] = {}  # (role, node_id) → row
            self.commands: dict[str, dict[str, Any]] = {}
            self.requests: list[dict[str, Any]] = []
            self.ignore_poll_limit = False
            # Imported here: controlplane_jobs imports this module (Refusal, Store).
            from tests.servers.controlplane_jobs import Jobs

            self.jobs = Jobs(self)

    # node rows ---------------------------------------------------------------------------------

    def register(self, role: str, pubkey: str, body: dict[str, Any]) -> dict[str, Any]:
        node_id = body.get("node_id")
        if not node_id or not isinstance(node_id, str):
            raise Refusal(400, "node_id is required")
        with self.lock:
            existing = self.rows.get((role, node_id))
            if existing and existing["public_key"] != pubkey:
                raise Refusal(403, "node_id is registered to a different pubkey")
            # A new provider row gets the column default the router reads (m0312: 50).
            fresh: dict[str, Any] = {"id": str(uuid.uuid4())}
            if role == "provider":
                fresh["reputation"] = 50
            row = existing or fresh
            row.update(
                node_id=node_id,
                public_key=pubkey,
                name=body["name"] if isinstance(body.get("name"), str) else node_id,
                status="offline" if body.get("status") == "offline" else "available",
                last_seen=now_iso(),
            )
            if isinstance(body.get("address"), str):
                row["address"] = body["address"]
            if is_number(body.get("port")):
                row["port"] = body["port"]
            if role == "provider":
                if isinstance(body.get("gpu_model"), str):
                    row["gpu_model"] = body["gpu_model"][:64]
                if is_number(body.get("price")):
                    row["price"] = body["price"]
                specs = sanitize_specs(body.get("specs"))
                if specs is not None:
                    row["specs"] = specs
            if role == "client":
                row.pop("status", None)
            self.rows[(role, node_id)] = row
            return {"id": row["id"], "node_id": node_id}

    def heartbeat(self, role: str, pubkey: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            mine = [r for (t, _), r in self.rows.items() if t == role and r["public_key"] == pubkey]
            if len(mine) > 1:  # Supabase maybeSingle() on two rows
                raise Refusal(500, "JSON object requested, multiple (or no) rows returned")
            if not mine:
                raise Refusal(404, "no row for this pubkey — call /register first")
            row = mine[0]
            row["last_seen"] = now_iso()
            if role != "client":
                row["status"] = "offline" if body.get("status") == "offline" else "available"
            if isinstance(body.get("address"), str):
                row["address"] = body["address"]
            if is_number(body.get("port")):
                row["port"] = body["port"]
            # Not sanitized: heartbeat specs replace the stored object as they arrived.
            if isinstance(body.get("specs"), dict):
                row["specs"] = body["specs"]
            return {"id": row["id"]}

    def nodes(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"role": role, **row} for (role, _), row in self.rows.items()]

    # node_commands -----------------------------------------------------------------------------

    def enqueue(self, pubkey: str, command: str, args: dict[str, Any], shape: str = "") -> str:
        """Queue a command; ``shape`` "flat" hands it out as the seed writes one:
        ``{id, type, <args>, issued_at}`` instead of ``{id, command, args}``."""
        with self.lock:
            command_id = str(uuid.uuid4())
            self.commands[command_id] = {
                "id": command_id,
                "pubkey": pubkey,
                "command": command,
                "args": args,
                "status": "pending",
                "progress": None,
                "result": None,
                "error": None,
                "issued_at": now_iso(),
                "started_at": None,
                "completed_at": None,
                "complete_calls": 0,
                "progress_posts": 0,
                "shape": shape,
            }
            return command_id

    def command(self, command_id: str) -> dict[str, Any]:
        with self.lock:
            if command_id not in self.commands:
                raise Refusal(404, "command not found")
            return dict(self.commands[command_id])

    def cancel(self, command_id: str) -> dict[str, Any]:
        with self.lock:
            row = self.commands.get(command_id)
            if row is None:
                raise Refusal(404, "command not found")
            if row["status"] not in ("pending", "running"):
                return {"id": command_id, "status": row["status"], "cancelled": False}
            row.update(status="cancelled", completed_at=now_iso(), error="cancelled by user")
            return {"id": command_id, "status": "cancelled", "cancelled": True}

    def poll(self, pubkey: str, limit: Any) -> dict[str, Any]:
        wanted = limit if is_number(limit) and limit else 5  # JS: Number(limit) || 5
        safe = int(min(max(wanted, 1), MAX_POLL_LIMIT))
        with self.lock:
            pending = [
                r
                for r in self.commands.values()
                if r["pubkey"] == pubkey and r["status"] == "pending"
            ]
            claimed = []
            # A hostile control plane (the poll_limit test route) hands out more than asked.
            handed = pending if self.ignore_poll_limit else pending[:safe]
            for row in handed:  # dicts keep insertion order: oldest issued first
                row.update(status="running", started_at=now_iso())
                if row.get("shape") == "flat":
                    flat = {"type": row["command"], **row["args"], "issued_at": row["issued_at"]}
                    claimed.append({"id": row["id"], **flat})
                    continue
                claimed.append({"id": row["id"], "command": row["command"], "args": row["args"]})
            return {"commands": claimed}

    def _owned(self, pubkey: str, command_id: str) -> dict[str, Any]:
        row = self.commands.get(command_id)
        if row is None:
            raise Refusal(404, "command not found")
        if row["pubkey"] != pubkey:
            raise Refusal(403, "command does not target this pubkey")
        return row

    def progress(self, pubkey: str, command_id: str, progress: Any) -> dict[str, Any]:
        if not progress or not isinstance(progress, dict | list):
            raise Refusal(400, "progress object is required")
        fields = progress if isinstance(progress, dict) else {}
        with self.lock:
            row = self._owned(pubkey, command_id)
            safe = {
                "status": fields["status"][:64] if isinstance(fields.get("status"), str) else None,
                "phase": fields["phase"][:32] if isinstance(fields.get("phase"), str) else None,
            }
            for name in ("step", "steps", "total", "completed"):
                safe[name] = fields[name] if is_number(fields.get(name)) else None
            pct = fields.get("pct")
            safe["pct"] = max(0, min(100, pct)) if is_number(pct) else None
            row["progress"] = safe
            row["progress_posts"] += 1
            return {"id": command_id, "progress": safe, "status": row["status"]}

    def complete(
        self, pubkey: str, command_id: str, status: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if status not in ("completed", "failed"):
            raise Refusal(400, "status must be completed | failed")
        with self.lock:
            row = self._owned(pubkey, command_id)
            row["complete_calls"] += 1
            if row["status"] != "running":
                return {"id": command_id, "status": row["status"], "noop": True}
            row.update(status=status, completed_at=now_iso())
            if "result" in body:
                row["result"] = body["result"]
            error = body.get("error")
            if isinstance(error, str) and error:
                row["error"] = clean_command_error(error)
            return {"id": command_id, "status": status}

    # request log -------------------------------------------------------------------------------

    def log(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append({**entry, "time": time.time()})

    def log_copy(self, since: int = 0) -> list[dict[str, Any]]:
        """The log from entry ``since`` on (a campaign polling it every 50 ms for hours must
        not copy and send the whole of it every time)."""
        with self.lock:
            return [dict(e) for e in self.requests[since:]]
