"""``status`` and ``model list``: what is desired, installed, loaded and advertised."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import backends
from reconciler.cli.render import human_bytes, table
from reconciler.config import gitcommit
from reconciler.controlplane import load
from reconciler.model import BackendKind, Desired, Observed, Plan
from reconciler.names import key
from reconciler.planning import advertised
from reconciler.planning.document import revision
from state import StatusKey

if TYPE_CHECKING:
    from reconciler.converge.session import Session
    from state import Store


def model_rows(desired: Desired, observed: Observed, store: Store) -> list[dict[str, Any]]:
    """One row per desired or installed model: Model, Size, Backend, Status.

    ``model`` is the name as the file writes it (as installed, for models the file doesn't
    list); an HF repository's revision is its own field, ``revision``, as in the plan.
    """
    owned = {(r.backend, r.canonical) for r in store.owned()}
    wanted = {key(m.backend, m.canonical): m for m in desired.models}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for kind, state in sorted(observed.backends.items()):
        loaded = {m.canonical: m for m in state.loaded}
        loaded_digests = {m.digest: m for m in state.loaded if m.digest}
        for model in state.installed:
            k = key(kind, model.canonical)
            seen.add(k)
            run = loaded.get(model.canonical) or loaded_digests.get(model.facts.digest or "")
            if run is not None:
                status = "pinned" if run.pinned else "loaded"
            elif k in wanted or (kind.value, model.canonical) in owned:
                status = "installed"
            else:
                status = "unmanaged"
            spec = wanted.get(k)
            name, rev = _name_and_revision(kind, model.canonical, model.name)
            rows.append(
                {
                    "model": spec.name if spec else name,
                    "revision": rev,
                    "size": model.facts.size,
                    "backend": kind.value,
                    "status": status,
                    "desired": k in wanted,
                    "quantization": model.facts.quantization,
                    "digest": model.facts.digest,
                    "size_vram": run.size_vram if run else None,
                }
            )
    for k, spec in wanted.items():
        if k not in seen:
            rev = _name_and_revision(spec.backend, spec.canonical, spec.name)[1]
            rows.append(
                {
                    "model": spec.name,
                    "revision": rev,
                    "size": None,
                    "backend": spec.backend.value,
                    "status": "missing",
                    "desired": True,
                    "quantization": spec.quantization,
                    "digest": None,
                    "size_vram": None,
                }
            )
    return rows


def _name_and_revision(kind: BackendKind, canonical: str, name: str) -> tuple[str, str | None]:
    """A repository at a revision (``org/repo@revision`` in canonical form) as name and
    revision; other models are their name alone."""
    if backends.driver(kind).revisions:
        repo, _, revision = canonical.rpartition("@")
        return name.partition("@")[0] or repo, revision
    return name, None


def engine_rows(session: Session) -> list[dict[str, Any]]:
    """The processes infernet started to serve models (the engines of vLLM, SGLang, MAX):
    state, port, restarts, and the end of the log of one that is not running (why it died).
    Kinds sharing one supervisor list the same rows: the first that supervises answers."""
    from reconciler.backends.base import Supervises

    for backend in session.backends.values():
        if isinstance(backend, Supervises):
            return backend.supervised()
    return []


def build_status(session: Session, observed: Observed, plan: Plan) -> dict[str, Any]:
    """The ``status --json`` document."""
    store = session.store
    last = store.last_apply()
    return {
        "config": {
            "path": plan.source.path,
            "sha256": plan.source.sha256,
            "git_commit": plan.source.git_commit,
            "git": gitcommit.facts(Path(plan.source.path)).as_json(),
        },
        "backends": {
            kind.value: {
                "url": s.url,
                "reachable": s.reachable,
                "error": s.error,
                "used": kind in session.desired.backends_used() or bool(s.installed),
                "serving_error": s.serving_error,
            }
            for kind, s in observed.backends.items()
        },
        "models": model_rows(session.desired, observed, store),
        "engines": engine_rows(session),
        "advertised": list(advertised.now(plan, session.desired)),  # what a heartbeat lists now
        "drift": [
            {"op": a.op.value, "model": a.model, "revision": revision(a), "reason": a.reason}
            for a in plan.actions
        ],
        "errors": list(plan.errors),
        "warnings": list(plan.warnings),
        "budget": {
            "vram_total_bytes": plan.budget.vram_total_bytes,
            "vram_source": plan.budget.vram_source,
            "vram_pinned_bytes": plan.budget.vram_pinned_bytes,
            "fits": plan.budget.fits,
        },
        "last_apply": None
        if last is None
        else {
            "at": last.at,
            "config_sha256": last.config_sha256,
            "git_commit": last.git_commit,
            "converged": last.converged,
            "actions": last.actions,
            "failed": last.failed,
        },
        "unserved": list(plan.unserved),
        "untested": [c.advertise_as for c in plan.checks],
        "jobs": _jobs(session),
        "last_heartbeat": store.get_status(StatusKey.LAST_HEARTBEAT),
        "daemon": store.get_status(StatusKey.DAEMON),
        "state_notice": store.rebuilt,
    }


def _jobs(session: Session) -> dict[str, Any]:
    """The jobs part: the file's settings and what a running daemon publishes."""
    settings = session.desired.jobs
    figures = dict(load.published(session.store))
    figures.pop("gpu_utilization_max", None)
    serving = session.desired.control_plane is not None and settings.enabled
    return {
        "enabled": serving,
        "concurrency": settings.concurrency,
        "poll_interval": settings.poll_interval,
        "default_model": settings.default_model,
        **figures,
    }


def verdict(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What ``status`` exits on, from its document: ``(errors, pending)``. An error (exit 1) is
    a backend the node uses that can't be reached or serves nothing, a file invalid right now,
    or a plan that can't be carried out; pending (exit 2 under ``--detailed-exitcode``) is what
    keeps an otherwise healthy node from being converged: drift, models not yet tested, models
    installed but not advertised."""
    errors: list[str] = []
    said: set[str] = set()  # a backend's error the plan repeats is said once
    for name, b in doc["backends"].items():
        if not b.get("used", True):
            continue
        if not b["reachable"]:
            errors.append(f"backend {name} unreachable: {b['error']}")
            said.add(str(b["error"]))
        elif b.get("serving_error"):
            errors.append(f"backend {name} at {b['url']} serves nothing: {b['serving_error']}")
            said.add(str(b["serving_error"]))
    if doc.get("config_error"):
        errors.append(
            f"the file is invalid now (the last valid version is shown): {doc['config_error']}"
        )
    errors.extend(e for e in doc["errors"] if e not in said)
    pending = [f"{d['op']} {d['model']}" for d in doc["drift"]]
    pending += [f"untested {name}" for name in doc.get("untested") or []]
    pending += list(doc.get("unserved") or [])
    return errors, pending


def render_status(doc: dict[str, Any]) -> str:
    """``status`` for a person."""
    cfg = doc["config"]
    lines = [f"Config: {cfg['path']} (sha256 {cfg['sha256'][:12]})"]
    if doc.get("config_error"):
        lines.append(f"Config INVALID now, showing the last valid version: {doc['config_error']}")
    lines.extend(_git_line(cfg.get("git") or {}))
    for name, b in doc["backends"].items():
        if not b.get("used", True):
            continue  # a backend the file doesn't use and that holds nothing is not news
        state = "reachable" if b["reachable"] else f"UNREACHABLE: {b['error']}"
        if b["reachable"] and b.get("serving_error"):
            state = f"models readable, NOT SERVING: {b['serving_error']}"
        lines.append(f"Backend {name}: {b['url']} {state}")
    lines.append("")
    rows = [
        [
            r["model"],
            r["backend"],
            human_bytes(r["size"]) if r["size"] else "-",
            r["status"],
            "yes" if r["desired"] else "no",
        ]
        for r in doc["models"]
    ]
    lines.append(table(rows, ["MODEL", "BACKEND", "SIZE", "STATUS", "DESIRED"]))
    lines.append("")
    for e in doc.get("engines") or []:
        code = f", exit code {e['exit_code']}" if e["exit_code"] is not None else ""
        lines.append(
            f"Engine {e['model']}: {e['state']} on port {e['port']} (PID {e['pid']}, "
            f"{e['restarts']} restarts{code}); log {e['log']}"
        )
        if e.get("log_tail"):
            lines.extend(f"    {line}" for line in e["log_tail"].splitlines()[-12:])
    lines.append(f"Advertised: {', '.join(doc['advertised']) or '(nothing)'}")
    for why in doc.get("unserved") or []:
        lines.append(f"Not advertised: {why}")
    if doc.get("untested"):
        lines.append(
            f"Not yet tested (the next apply runs a one-token generation): "
            f"{', '.join(doc['untested'])}"
        )
    jobs = doc.get("jobs") or {}
    if jobs.get("enabled"):
        cap = jobs.get("concurrency_cap", 0)
        if cap:
            bench = jobs.get("bench") or {}
            speed = (
                f", {bench['tokens_per_second_avg']} tokens/s over {bench['samples']} jobs"
                if bench
                else ""
            )
            lines.append(f"Jobs: {jobs.get('active_jobs', 0)} running of {cap}{speed}")
        else:
            lines.append("Jobs: not served now (no `infernet watch` running on this node)")
    unseen = [n for n, b in doc["backends"].items() if b.get("used", True) and not b["reachable"]]
    if doc["drift"]:
        lines.append("Drift: " + "; ".join(f"{d['op']} {d['model']}" for d in doc["drift"]))
    elif unseen:  # what an unreachable backend holds can't be compared: never "none"
        lines.append(f"Drift: unknown ({', '.join(unseen)} unreachable)")
    else:
        lines.append("Drift: none")
    last = doc["last_apply"]
    if last:
        verdict = "converged" if last["converged"] else "NOT converged"
        lines.append(
            f"Last apply: {last['at']} ({verdict}, {last['actions']} actions, "
            f"{last['failed']} failed)"
        )
    else:
        lines.append("Last apply: never")
    daemon = doc.get("daemon")
    if daemon:
        state = "running" if daemon["running"] else "stopped"
        lines.append(
            f"Daemon: {state} (PID {daemon['pid']}, {daemon['at']}), last reconcile "
            f"{daemon['last_outcome']}"
        )
        if not daemon["config_valid"]:
            lines.append(f"Config INVALID (last valid state in force): {daemon['config_error']}")
    hb = doc["last_heartbeat"]
    if not hb:
        lines.append("Last heartbeat: none")
    elif hb.get("ok"):
        listed = ", ".join(hb.get("served_models") or []) or "(nothing)"
        lines.append(f"Last heartbeat: {hb['at']} to {hb['url']}: ok, advertised {listed}")
    else:
        lines.append(f"Last heartbeat: {hb['at']} FAILED: {hb.get('error')}")
    for err in doc["errors"]:
        lines.append(f"Error: {err}")
    for warn in doc["warnings"]:
        lines.append(f"Warning: {warn}")
    return "\n".join(lines)


def _git_line(git: dict[str, Any]) -> list[str]:
    """What git says of the file, when it is news: local edits a ``git pull`` would meet, or
    that git could not be asked (so no commit is reported)."""
    if git.get("state") == gitcommit.GitState.MODIFIED:
        head = f" (HEAD {git['head'][:12]})" if git.get("head") else ""
        return [f"Git: local edits not in git{head}; commit them, or a git pull may conflict"]
    if git.get("state") == gitcommit.GitState.UNKNOWN:
        return [f"Git: not checked: {git.get('reason')}"]
    return []


__all__ = ["build_status", "model_rows", "render_status", "verdict"]
