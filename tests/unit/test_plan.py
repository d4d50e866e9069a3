"""The planner, from data tables: every ``plans/<case>.yaml`` is one case.

A case holds the file (``config``), what was observed, what infernet owns, and the expected
actions (``"op model"`` in order), error and warning substrings, and advertised names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import desired
from reconciler.model import (
    BackendKind,
    BackendState,
    DiskState,
    GpuState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    Observed,
    Owned,
    OwnedModel,
    Upstream,
)
from reconciler.names import canonical, key
from reconciler.planning.plan import plan
from reconciler.units import parse_size

CASES = sorted((Path(__file__).parent / "plans").glob("*.yaml"))
OLLAMA = BackendKind.OLLAMA


def _size(value: Any) -> int | None:
    return None if value is None else parse_size(value)


def _facts(raw: dict[str, Any]) -> ModelFacts:
    return ModelFacts(
        digest=raw.get("digest"),
        size=_size(raw.get("size")),
        weights_bytes=_size(raw.get("weights", raw.get("size"))),
        quantization=raw.get("quantization"),
        parameter_count=raw.get("parameter_count"),
        context_length=raw.get("context_length"),
        block_count=raw.get("block_count"),
        head_count=raw.get("head_count"),
        head_count_kv=raw.get("head_count_kv"),
        embedding_length=raw.get("embedding_length"),
        capabilities=tuple(raw.get("capabilities", ())),
    )


def _observed(raw: dict[str, Any], vram: int | None = None) -> Observed:
    o = raw.get("ollama", {})
    installed = tuple(
        InstalledModel(OLLAMA, m["name"], canonical(OLLAMA, m["name"]), _facts(m))
        for m in o.get("installed", [])
    )
    loaded = tuple(
        LoadedModel(
            OLLAMA,
            m["name"],
            canonical(OLLAMA, m["name"]),
            m.get("digest"),
            _size(m.get("size", 0)) or 0,
            _size(m.get("size_vram", 0)) or 0,
            "2318-01-01T00:00:00Z" if m.get("pinned") else "2026-11-27T05:00:00Z",
            bool(m.get("pinned")),
        )
        for m in o.get("loaded", [])
    )
    state = BackendState(
        OLLAMA,
        "http://127.0.0.1:11434",
        o.get("reachable", True),
        error=o.get("error"),
        installed=installed,
        loaded=loaded,
    )
    upstream = {}
    for name, u in raw.get("upstream", {}).items():
        upstream[key(OLLAMA, canonical(OLLAMA, name))] = Upstream(
            OLLAMA,
            canonical(OLLAMA, name),
            _facts(u),
            _size(u.get("total", 0)) or 0,
            _size(u.get("download", u.get("total", 0))) or 0,
            error=u.get("error"),
        )
    # As gpu.read_gpus does: budget.vram in the file wins over what NVML says.
    gpu = raw.get("gpu", {"total": "24GiB", "source": "nvml"})
    if vram is not None:
        gpu = {"total": vram, "source": "config"}
    return Observed(
        backends={OLLAMA: state},
        upstream=upstream,
        gpu=GpuState(gpu["source"], _size(gpu.get("total")), None),
        disks={OLLAMA: DiskState("/models", _size(raw.get("disk_free", "500GiB")))},
        fingerprint="sha256:test",
    )


def _owned(raw: list[dict[str, Any]], protected: list[str]) -> Owned:
    models = {
        key(OLLAMA, canonical(OLLAMA, m["name"])): OwnedModel(
            OLLAMA, canonical(OLLAMA, m["name"]), m["name"], bool(m.get("pinned"))
        )
        for m in raw
    }
    prot = frozenset(key(OLLAMA, canonical(OLLAMA, n)) for n in protected)
    return Owned(models=models, protected=prot)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_plan_case(case: Path) -> None:
    spec = yaml.safe_load(case.read_text())
    wanted = desired.parse(spec["config"], path=f"{case.name}#config")
    result = plan(
        wanted,
        _observed(spec.get("observed", {}), wanted.budget.vram),
        _owned(spec.get("owned", []), spec.get("protected", [])),
        allow_destroy=spec.get("allow_destroy", False),
    )
    expect = spec["expect"]
    got = [f"{a.op.value} {a.model}" for a in result.actions]
    assert got == expect.get("actions", []), result.errors
    for fragment in expect.get("errors", []):
        assert any(fragment in e for e in result.errors), (fragment, result.errors)
    if not expect.get("errors"):
        assert result.errors == (), result.errors
    for fragment in expect.get("warnings", []):
        assert any(fragment in w for w in result.warnings), (fragment, result.warnings)
    if "advertised" in expect:
        assert list(result.advertised) == expect["advertised"]
    if "fits" in expect:
        assert result.budget.fits is expect["fits"]
    if "noops" in expect:
        assert [n.model for n in result.noops] == expect["noops"]


def test_plan_is_pure_and_deterministic() -> None:
    """Same inputs, same plan: nothing hidden (clock, environment) leaks in."""
    spec = yaml.safe_load(CASES[0].read_text())
    wanted = desired.parse(spec["config"], path="x")
    observed = _observed(spec.get("observed", {}))
    owned = _owned(spec.get("owned", []), [])
    assert plan(wanted, observed, owned) == plan(wanted, observed, owned)
