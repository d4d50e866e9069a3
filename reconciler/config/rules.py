"""The semantic rules of ``infernet.yaml`` that the schema can't express, and the defaults.

Names per backend, duplicates after canonicalisation, advertised-name collisions, empty lists,
the VRAM reserve, a plain-http control plane: each found problem is reported at its place in
the file (``Check``), and the frozen ``Desired`` is built on the way.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler import backends, names, units
from reconciler.backends.gguf import quantization
from reconciler.config import yamldoc
from reconciler.config.yamldoc import JsonPath, format_path
from reconciler.errors import Problem, listed
from reconciler.model import (
    BackendKind,
    BudgetSettings,
    ConfigSource,
    ControlPlaneSettings,
    Desired,
    JobSettings,
    ModelSpec,
    Policy,
)


@dataclass
class Check:
    """One validation pass: the document, where problems go, and which paths are already bad."""

    doc: yamldoc.Document
    file: str
    problems: list[Problem] = field(default_factory=list)
    bad: set[JsonPath] = field(default_factory=set)

    def report(self, path: JsonPath, message: str, *, at_key: bool = False) -> None:
        mark = self.doc.locate(path, key=at_key)
        self.problems.append(Problem(self.file, mark.line, mark.column, message))
        self.bad.add(path)

    def clean(self, path: JsonPath) -> bool:
        """True when no problem was reported at or under ``path``."""
        return not any(bad[: len(path)] == path for bad in self.bad)

    def convert(self, path: JsonPath, parse: Any, value: Any) -> Any:
        """``parse(value)``, reporting its ``ValueError`` at ``path``."""
        try:
            return parse(value)
        except ValueError as exc:
            self.report(path, f"{format_path(path)}: {exc}")
            return None


def build(raw: dict[str, Any], check: Check, env: Mapping[str, str]) -> Desired:
    """The frozen ``Desired``, reporting semantic problems on the way (result unused if any)."""
    default_backend = BackendKind.OLLAMA
    if check.clean(("default_backend",)) and "default_backend" in raw:
        default_backend = BackendKind(raw["default_backend"])
    policy = Policy(**raw.get("policy", {})) if check.clean(("policy",)) else Policy()
    models = _models(raw, check, default_backend, allow_empty=policy.allow_empty)
    sections = raw.get("backends", {}) if check.clean(("backends",)) else {}
    families = backends.families()
    return Desired(
        source=ConfigSource("", ""),
        models=models,
        default_backend=default_backend,
        backend_settings={f.name: f.parse(sections.get(f.name, {}), env) for f in families},
        budget=_budget(raw, check),
        control_plane=_control_plane(raw, check),
        policy=policy,
        jobs=_jobs(raw, check, models),
    )


def _models(
    raw: dict[str, Any], check: Check, default: BackendKind, *, allow_empty: bool
) -> tuple[ModelSpec, ...]:
    entries = raw.get("served_models")
    if not isinstance(entries, list):
        return ()
    if not entries and not allow_empty:
        check.report(
            ("served_models",),
            "served_models is empty: that would remove every model; "
            "set policy.allow_empty: true if you mean it",
        )
    default_known = check.clean(("default_backend",))
    specs: list[ModelSpec] = []
    first_of: dict[str, int] = {}  # names.key → index of the first entry
    advertiser: dict[str, int] = {}  # advertised name → index of the first entry
    for index, entry in enumerate(entries):
        path: JsonPath = ("served_models", index)
        explicit = isinstance(entry, dict) and "backend" in entry
        if not check.clean(path) or not (explicit or default_known):
            continue
        spec = _model(entry, path, check, default)
        if spec is None:
            continue
        key = names.key(spec.backend, spec.canonical)
        if key in first_of:
            why = backends.driver(spec.backend).same_model
            check.report(
                path,
                f"{format_path(path)}: '{spec.name}' is a duplicate of "
                f"served_models[{first_of[key]}] ({why})",
            )
            continue
        first_of[key] = index
        if spec.advertise_as in advertiser:
            named = isinstance(entry, dict) and "advertise_as" in entry
            check.report(
                (*path, "advertise_as") if named else path,
                f"{format_path(path)}: advertised name '{spec.advertise_as}' is already used by "
                f"served_models[{advertiser[spec.advertise_as]}]; "
                "give one of them a different advertise_as",
            )
            continue
        advertiser[spec.advertise_as] = index
        specs.append(spec)
    return tuple(specs)


def _model(entry: Any, path: JsonPath, check: Check, default: BackendKind) -> ModelSpec | None:
    """One entry with defaults filled in; None (and a problem reported) when it is unusable."""
    fields: dict[str, Any] = entry if isinstance(entry, dict) else {"name": entry}
    backend = BackendKind(fields.get("backend", default))
    name: str = fields["name"]
    name_path = (*path, "name") if isinstance(entry, dict) else path
    usable = True
    reason = names.is_valid(backend, name)
    if reason is not None:
        check.report(name_path, f"{format_path(name_path)}: {reason}")
        usable = False
    driver = backends.driver(backend)  # the schema's enum is the registry's kinds
    if "source" in fields and driver.source_refusal is not None:
        refusal = driver.source_refusal.format(kind=backend.value)
        check.report((*path, "source"), f"{format_path(path)}.source: {refusal}", at_key=True)
        usable = False
    if "revision" in fields and not driver.revisions:
        having = listed([d.kind.value for d in backends.drivers() if d.revisions])
        check.report(
            (*path, "revision"),
            f"{format_path(path)}.revision: only {having} models (HuggingFace repositories) "
            f"have a revision; remove it from this {backend.value} model{driver.revision_hint}",
            at_key=True,
        )
        usable = False
    if "sha256" in fields and "source" not in fields:
        check.report(
            (*path, "sha256"),
            f"{format_path(path)}.sha256: a checksum checks a downloaded source; add source: "
            "or remove sha256",
            at_key=True,
        )
        usable = False
    if driver.gguf_quantization and isinstance(fields.get("quantization"), str):
        why = quantization.problem(fields["quantization"])
        if why is not None:
            check.report((*path, "quantization"), f"{format_path(path)}.quantization: {why}")
            usable = False
    keep_alive = vram = None
    if "keep_alive" in fields:
        keep_alive = check.convert(
            (*path, "keep_alive"), units.parse_keep_alive, fields["keep_alive"]
        )
    if "vram" in fields:
        vram = check.convert((*path, "vram"), units.parse_size, fields["vram"])
    if not usable or not check.clean(path):
        return None
    revision = fields.get("revision")
    return ModelSpec(
        name=name,
        backend=backend,
        canonical=names.canonical(backend, name, revision),
        advertise_as=fields.get("advertise_as", name),
        quantization=fields.get("quantization"),
        keep_alive=keep_alive,
        context=fields.get("context"),
        vram=vram,
        protect=fields.get("protect", False),
        source=fields.get("source"),
        sha256=_sha256(fields.get("sha256")),
        revision=revision,
        line=check.doc.locate(path).line,
    )


def _sha256(value: str | None) -> str | None:
    """The bare lower-case hex digest (the schema already checked its shape)."""
    return None if value is None else value.lower().removeprefix("sha256:")


def _budget(raw: dict[str, Any], check: Check) -> BudgetSettings:
    fields = raw.get("budget", {})
    if not check.clean(("budget",)):
        return BudgetSettings()
    defaults = BudgetSettings()
    vram_text = fields.get("vram", "auto")
    vram = (
        None
        if vram_text == "auto"
        else check.convert(("budget", "vram"), units.parse_size, vram_text)
    )
    reserve = defaults.reserve
    if "reserve" in fields:
        reserve = check.convert(("budget", "reserve"), units.parse_size, fields["reserve"])
    disk_reserve = defaults.disk_reserve
    if "disk_reserve" in fields:
        disk_reserve = check.convert(
            ("budget", "disk_reserve"), units.parse_size, fields["disk_reserve"]
        )
    if vram is not None and reserve is not None and reserve >= vram:
        # Point at the value the user wrote: reserve if set, else vram (vs the default reserve).
        if "reserve" in fields:
            where: JsonPath = ("budget", "reserve")
            what = f"{units.format_bytes(reserve)} must be less than budget.vram"
            than = units.format_bytes(vram)
        else:
            where = ("budget", "vram")
            what = f"{units.format_bytes(vram)} must be more than budget.reserve"
            than = f"{units.format_bytes(reserve)}, the default"
        check.report(
            where, f"{format_path(where)}: {what} ({than}), or no VRAM is left to plan with"
        )
    if (vram is None and vram_text != "auto") or reserve is None or disk_reserve is None:
        return defaults
    return BudgetSettings(vram=vram, reserve=reserve, disk_reserve=disk_reserve)


def _control_plane(raw: dict[str, Any], check: Check) -> ControlPlaneSettings | None:
    fields = raw.get("control_plane")
    if fields is None or not check.clean(("control_plane",)):
        return None
    values = dict(fields)
    if "heartbeat_interval" in values:
        path: JsonPath = ("control_plane", "heartbeat_interval")
        interval = check.convert(path, units.parse_duration, values["heartbeat_interval"])
        if interval is not None and interval <= 0:
            check.report(path, f"{format_path(path)}: expected more than 0 seconds")
        values["heartbeat_interval"] = interval
    if isinstance(values.get("url"), str):
        problem = plain_http_problem(values["url"], insecure=values.get("insecure") is True)
        if problem is not None:
            url_path: JsonPath = ("control_plane", "url")
            check.report(url_path, f"{format_path(url_path)}: {problem}")
    return ControlPlaneSettings(**values)


def _jobs(raw: dict[str, Any], check: Check, models: tuple[ModelSpec, ...]) -> JobSettings:
    fields = raw.get("jobs")
    if fields is None or not check.clean(("jobs",)):
        return JobSettings()
    values = dict(fields)
    for name in ("poll_interval", "drain_timeout", "max_age"):
        if name in values:
            path: JsonPath = ("jobs", name)
            seconds = check.convert(path, units.parse_duration, values[name])
            if seconds is not None and seconds <= 0:
                check.report(path, f"{format_path(path)}: expected more than 0 seconds")
            values[name] = seconds
    default = values.get("default_model")
    served = [m.advertise_as for m in models]
    if isinstance(default, str) and models and default not in served:
        path = ("jobs", "default_model")
        check.report(
            path,
            f"{format_path(path)}: '{default}' is not the advertised name of any model in "
            f"served_models ({listed(served)}); jobs naming no model would all fail",
        )
    return JobSettings(**values)


def plain_http_problem(url: str, *, insecure: bool) -> str | None:
    """Why a control plane at ``url`` is refused, or None.

    Commands come from the control plane, so a plain ``http://`` one off this host lets
    anyone on the path inject them: allowed only on loopback, or with ``insecure: true``.
    """
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() != "http" or insecure:
        return None
    host = (parts.hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"plain http:// to {host or 'the control plane'} lets anyone on the network path send "
        "this node commands and read its heartbeats; use https://, or set "
        "control_plane.insecure: true to accept that"
    )
