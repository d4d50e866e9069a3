"""An engine's resident host memory (RSS) beside the budget's claim: observed by the backend,
carried by the (pure) planner into ``budget.estimates[].rss_bytes``, shown by ``plan -v`` and
valid against the plan schema. The planner never measures anything: it carries what it is given.
"""

from __future__ import annotations

import pytest

from reconciler.cli.render import render_plan
from reconciler.config import desired, schemacheck
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
)
from reconciler.planning import document as plandoc
from reconciler.planning.plan import plan

GiB = 1 << 30
VLLM = BackendKind.VLLM
REPO = "Qwen/Qwen2.5-0.5B-Instruct"
CANONICAL = f"{REPO}@main"


def _loaded(rss: int | None, *, foreign: bool = False) -> LoadedModel:
    return LoadedModel(
        VLLM, CANONICAL, CANONICAL, None, 0, 0, None, True, pid=4321, foreign=foreign, rss_bytes=rss
    )


def _observed(loaded: tuple[LoadedModel, ...]) -> Observed:
    facts = ModelFacts(digest="c" * 40, size=GiB, format="safetensors")
    state = BackendState(
        VLLM,
        "http://127.0.0.1:8000",
        True,
        installed=(InstalledModel(VLLM, CANONICAL, CANONICAL, facts),),
        loaded=loaded,
    )
    return Observed(
        backends={VLLM: state},
        upstream={},
        gpu=GpuState("config", 24 * GiB, None),
        disks={VLLM: DiskState("/hub", 500 * GiB)},
        fingerprint="sha256:test",
    )


# (case, what the backend observed serving the model, rss_bytes the estimate carries)
CASES = [
    ("running engine infernet started", (_loaded(2_300_000_000),), 2_300_000_000),
    ("engine not running", (), None),
    ("running, RSS unreadable", (_loaded(None),), None),
    ("foreign engine: never measured", (_loaded(None, foreign=True),), None),
]


@pytest.mark.parametrize(("loaded", "rss"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_planner_carries_the_observed_engine_rss(
    loaded: tuple[LoadedModel, ...], rss: int | None
) -> None:
    wanted = desired.parse(
        f"served_models: ['{REPO}']\ndefault_backend: vllm\nbudget: {{vram: 24GiB}}\n",
        path="infernet.yaml",
    )
    result = plan(wanted, _observed(loaded), Owned())
    (est,) = result.budget.estimates
    assert est.source == "claim"  # the budget still counts the claim, whatever RSS says
    assert est.rss_bytes == rss

    doc = plandoc.to_document(result)
    assert doc["budget"]["estimates"][0]["rss_bytes"] == rss
    assert schemacheck.check(doc, plandoc.schema_text()) == []
    # Saved and read back exactly; RSS is beside the figure, not part of it.
    back = plandoc.from_document(doc, path="plan.json")
    assert back.budget.estimates[0].rss_bytes == rss

    text = render_plan(result, verbose=True)
    line = next(ln for ln in text.splitlines() if ln.startswith(REPO))
    if rss is None:
        assert "RSS" not in line
    else:
        assert "engine RSS 2.1 GiB" in line, line


def test_a_plan_saved_before_rss_bytes_existed_still_reads() -> None:
    wanted = desired.parse(
        f"served_models: ['{REPO}']\ndefault_backend: vllm\nbudget: {{vram: 24GiB}}\n",
        path="infernet.yaml",
    )
    doc = plandoc.to_document(plan(wanted, _observed((_loaded(GiB),)), Owned()))
    del doc["budget"]["estimates"][0]["rss_bytes"]
    back = plandoc.from_document(doc, path="old-plan.json")
    assert back.budget.estimates[0].rss_bytes is None
