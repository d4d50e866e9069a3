"""The plan document (contract §3): ``Plan`` ⇄ JSON, as ``plan --json`` prints and ``--out`` saves.

A saved plan is applied exactly, so reading one back must give the very ``Plan`` that was
written: every field is written (nulls included) and the round trip is exact. A document this
version cannot apply — another ``format_version``, a hand edit that breaks
``schemas/plan.schema.json`` — is refused as a whole before anything acts on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

from reconciler import backends
from reconciler.config import schemacheck
from reconciler.errors import ConfigError
from reconciler.files import write_atomically
from reconciler.model import (
    Action,
    BackendKind,
    Budget,
    Check,
    ConfigSource,
    Desired,
    DiskBudget,
    Estimate,
    EstimateParts,
    GpuProcess,
    Noop,
    Op,
    Plan,
)
from reconciler.names import key
from reconciler.redact import redact

FORMAT_VERSION = 1
SCHEMA_FILE = "plan.schema.json"
_BUDGET_LISTS = ("estimates", "foreign_processes", "disks")  # rebuilt as tuples of dataclasses


def to_document(plan: Plan) -> dict[str, Any]:
    """The JSON-ready document of ``plan``."""
    budget = plan.budget
    return {
        "format_version": FORMAT_VERSION,
        "config": {
            "path": plan.source.path,
            "sha256": plan.source.sha256,
            "git_commit": plan.source.git_commit,
        },
        "observed": {"fingerprint": plan.fingerprint},
        "actions": [
            {
                "op": a.op.value,
                "model": a.model,
                "revision": revision(a),
                "backend": a.backend.value,
                "canonical": a.canonical,
                "reason": a.reason,
                "download_bytes": a.download_bytes,
                "vram_bytes": a.vram_bytes,
                "keep_alive": a.keep_alive,
                "digest": a.digest,
                "embedding": a.embedding,
                "context": a.context,
                # Shown without credentials or a signed query: the document is printed, saved
                # and passed around (Ansible); ``with_sources`` restores it from the file.
                "source": redact(a.source) if a.source else None,
                "advertise_as": a.advertise_as,
            }
            for a in plan.actions
        ],
        "noops": [
            {"model": n.model, "backend": n.backend.value, "reason": n.reason} for n in plan.noops
        ],
        "budget": {
            "vram_total_bytes": budget.vram_total_bytes,
            "vram_source": budget.vram_source,
            "reserve_bytes": budget.reserve_bytes,
            "vram_pinned_bytes": budget.vram_pinned_bytes,
            "largest_swap_in_bytes": budget.largest_swap_in_bytes,
            "fits": budget.fits,
            "disk_free_bytes": budget.disk_free_bytes,
            "disk_reserve_bytes": budget.disk_reserve_bytes,
            "download_bytes": budget.download_bytes,
            "estimates": [
                {
                    "model": e.model,
                    "bytes": e.bytes,
                    "source": e.source,
                    "pinned": e.pinned,
                    "estimated_bytes": e.estimated_bytes,
                    "measured_bytes": e.measured_bytes,
                    "parts": None if e.parts is None else asdict(e.parts),
                    "rss_bytes": e.rss_bytes,
                }
                for e in budget.estimates
            ],
            "vram_available_bytes": budget.vram_available_bytes,
            "foreign_bytes": budget.foreign_bytes,
            "unattributed_bytes": budget.unattributed_bytes,
            "foreign_processes": [
                {"pid": p.pid, "name": p.name, "bytes": p.bytes} for p in budget.foreign_processes
            ],
            "disks": [
                {
                    "backend": d.backend.value,
                    "path": d.path,
                    "free_bytes": d.free_bytes,
                    "download_bytes": d.download_bytes,
                }
                for d in budget.disks
            ],
        },
        "advertised": list(plan.advertised),
        "errors": list(plan.errors),
        "warnings": list(plan.warnings),
        "checks": [
            {
                "model": c.model,
                "backend": c.backend.value,
                "canonical": c.canonical,
                "advertise_as": c.advertise_as,
                "digest": c.digest,
                "keep_alive": c.keep_alive,
                "context": c.context,
                "embedding": c.embedding,
            }
            for c in plan.checks
        ],
        "unserved": list(plan.unserved),
    }


def with_sources(plan: Plan, desired: Desired) -> Plan:
    """``plan`` read back from a document, each download's source restored from ``desired``
    (the document shows them redacted). The caller has checked that ``desired`` is the very
    file the plan was made from."""
    real = {key(s.backend, s.canonical): s.source for s in desired.models if s.source}
    actions = tuple(
        replace(a, source=real.get(key(a.backend, a.canonical), a.source)) if a.source else a
        for a in plan.actions
    )
    return replace(plan, actions=actions)


def revision(action: Action) -> str | None:
    """The revision an action is at (its own field: never part of ``model``); None for
    backends without revisions. ``canonical`` is ``org/repo@revision`` for those that have one,
    so reading a saved plan needs nothing more."""
    if not backends.driver(action.backend).revisions:
        return None
    return action.canonical.rpartition("@")[2]


def from_document(doc: dict[str, Any], *, path: str) -> Plan:
    """The ``Plan`` in ``doc`` (read from ``path``); ``ConfigError`` if this version can't."""
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != FORMAT_VERSION:
        _refuse(
            path, f"format_version is {json.dumps(version)}, this version reads {FORMAT_VERSION}"
        )
    findings = schemacheck.check(doc, schema_text())
    if findings:
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        _refuse(path, findings[0].message + more)
    budget = doc["budget"]
    return Plan(
        source=ConfigSource(**doc["config"]),
        fingerprint=doc["observed"]["fingerprint"],
        actions=tuple(
            Action(
                op=Op(a["op"]),
                model=a["model"],
                backend=BackendKind(a["backend"]),
                canonical=a["canonical"],
                reason=a["reason"],
                download_bytes=a["download_bytes"],
                vram_bytes=a["vram_bytes"],
                # JSON has one number type: a keep_alive written as -1 comes back as an int.
                keep_alive=None if a["keep_alive"] is None else float(a["keep_alive"]),
                digest=a["digest"],
                embedding=a["embedding"],
                context=a["context"],
                source=a["source"],
                advertise_as=a["advertise_as"],
            )
            for a in doc["actions"]
        ),
        noops=tuple(Noop(n["model"], BackendKind(n["backend"]), n["reason"]) for n in doc["noops"]),
        budget=Budget(
            **{k: v for k, v in budget.items() if k not in _BUDGET_LISTS},
            estimates=tuple(_estimate(e) for e in budget["estimates"]),
            foreign_processes=tuple(GpuProcess(**p) for p in budget["foreign_processes"]),
            disks=tuple(
                DiskBudget(
                    BackendKind(d["backend"]), d["path"], d["free_bytes"], d["download_bytes"]
                )
                for d in budget["disks"]
            ),
        ),
        advertised=tuple(doc["advertised"]),
        errors=tuple(doc["errors"]),
        warnings=tuple(doc["warnings"]),
        # A plan saved before canaries existed has none: the next apply runs what it needs.
        checks=tuple(
            Check(
                **{k: v for k, v in c.items() if k not in ("backend", "keep_alive")},
                backend=BackendKind(c["backend"]),
                keep_alive=None if c["keep_alive"] is None else float(c["keep_alive"]),
            )
            for c in doc.get("checks", [])
        ),
        unserved=tuple(doc.get("unserved", [])),
    )


def write_document(plan: Plan, path: Path) -> None:
    """Save ``plan`` to ``path`` as JSON, atomically (a reader never sees half a plan)."""
    text = json.dumps(to_document(plan), indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, text.encode("utf-8"))


def _estimate(doc: dict[str, Any]) -> Estimate:
    """An estimate from its JSON; ``parts`` and ``rss_bytes`` are absent from plans saved
    before they existed."""
    fields = {k: v for k, v in doc.items() if k != "parts"}
    parts = doc.get("parts")
    return Estimate(**fields, parts=None if parts is None else EstimateParts(**parts))


def read_document(path: Path) -> Plan:
    """The plan saved at ``path``; ``ConfigError`` when missing, not JSON or not applicable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read saved plan {path}: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        _refuse(str(path), f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
    if not isinstance(doc, dict):
        _refuse(str(path), "not a JSON object")
    return from_document(doc, path=str(path))


def schema_text() -> str:
    """The JSON Schema of the plan document: the shipped file, with the backend registry's
    kinds (the shipped file itself while only the built-in backends are registered)."""
    return schemacheck.shipped_or_assembled(SCHEMA_FILE)


def schema() -> dict[str, Any]:
    """The JSON Schema of the plan document as a fresh dict."""
    value: dict[str, Any] = json.loads(schema_text())
    return value


def _refuse(path: str, why: str) -> NoReturn:
    raise ConfigError(
        f"saved plan {path} is not a plan this version of infernet can apply: {why}; "
        "run infernet plan --out again"
    )
