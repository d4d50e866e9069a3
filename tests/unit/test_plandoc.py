"""The plan document: exact round trip, schema, refusal of documents we cannot apply."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import backends
from reconciler.config import schemacheck
from reconciler.errors import ConfigError
from reconciler.model import (
    FOREVER,
    Action,
    BackendKind,
    Budget,
    ConfigSource,
    Estimate,
    Noop,
    Op,
    Plan,
)
from reconciler.planning import document as plandoc

REPO = Path(__file__).parents[2]
SHA = "ab" * 32
COMMIT = "cd" * 20

FULL = Plan(
    source=ConfigSource("infernet.yaml", SHA, COMMIT),
    fingerprint="sha256:" + "ef" * 32,
    actions=(
        Action(
            Op.PULL,
            "qwen2.5:14b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/qwen2.5:14b",
            "in served_models, not installed",
            download_bytes=8_988_124_069,
            vram_bytes=10_200_547_328,
            digest="sha256:" + "12" * 32,
            context=8192,
        ),
        Action(
            Op.PIN,
            "nomic-embed-text:latest",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/nomic-embed-text:latest",
            "keep_alive forever",
            vram_bytes=300_000_000,
            keep_alive=FOREVER,
            embedding=True,
        ),
        Action(
            Op.UNPIN,
            "llama3.2:3b",
            BackendKind.OLLAMA,
            "registry.ollama.ai/library/llama3.2:3b",
            "no longer pinned",
            keep_alive=300.0,
        ),
        Action(
            Op.UPDATE,
            "a.gguf",
            BackendKind.LLAMACPP,
            "a.gguf",
            "new weights upstream",
            download_bytes=0,
        ),
        Action(
            Op.REMOVE,
            "Qwen/Qwen2.5-7B-Instruct",
            BackendKind.VLLM,
            "Qwen/Qwen2.5-7B-Instruct@main",
            "left served_models",
        ),
    ),
    noops=(Noop("deepseek-coder:6.7b", BackendKind.OLLAMA, "installed (digest 3ddd2d3f)"),),
    budget=Budget(
        vram_total_bytes=25_769_803_776,
        vram_source="nvml",
        reserve_bytes=1 << 30,
        vram_pinned_bytes=300_000_000,
        largest_swap_in_bytes=10_200_547_328,
        fits=True,
        disk_free_bytes=500 << 30,
        disk_reserve_bytes=10 << 30,
        download_bytes=8_988_124_069,
        estimates=(
            Estimate("qwen2.5:14b", 10_200_547_328, "metadata", False),
            Estimate("mystery:1b", None, "unknown", False),
        ),
    ),
    advertised=("qwen2.5:14b", "nomic-embed-text:latest", "deepseek-coder:6.7b"),
    errors=("a plan error",),
    warnings=("a warning", "another"),
)

EMPTY = Plan(
    source=ConfigSource("/etc/infernet/infernet.yaml", SHA),
    fingerprint="",
    actions=(),
    noops=(),
    budget=Budget(None, "none", 0, 0, 0, True, None, 0, 0),
    advertised=(),
)


def _through_json(plan: Plan) -> Plan:
    text = json.dumps(plandoc.to_document(plan))
    return plandoc.from_document(json.loads(text), path="plan.json")


@pytest.mark.parametrize("plan", [FULL, EMPTY], ids=["full", "empty"])
def test_round_trip_is_exact(plan: Plan) -> None:
    assert _through_json(plan) == plan


def test_document_has_the_contract_shape() -> None:
    doc = plandoc.to_document(FULL)
    assert doc["format_version"] == 1
    assert doc["config"] == {"path": "infernet.yaml", "sha256": SHA, "git_commit": COMMIT}
    assert doc["observed"] == {"fingerprint": FULL.fingerprint}
    assert doc["actions"][0] == {
        "op": "pull",
        "model": "qwen2.5:14b",
        "revision": None,
        "backend": "ollama",
        "canonical": "registry.ollama.ai/library/qwen2.5:14b",
        "reason": "in served_models, not installed",
        "download_bytes": 8_988_124_069,
        "vram_bytes": 10_200_547_328,
        "keep_alive": None,
        "digest": "sha256:" + "12" * 32,
        "embedding": False,
        "context": 8192,
        "source": None,
        "advertise_as": None,
    }
    hf = doc["actions"][4]
    assert (hf["model"], hf["revision"]) == ("Qwen/Qwen2.5-7B-Instruct", "main")
    assert doc["budget"]["fits"] is True
    assert doc["errors"] == ["a plan error"]
    assert list(doc) == [
        "format_version",
        "config",
        "observed",
        "actions",
        "noops",
        "budget",
        "advertised",
        "errors",
        "warnings",
        "checks",
        "unserved",
    ]


def test_documents_we_write_validate_against_the_plan_schema() -> None:
    for plan in (FULL, EMPTY):
        assert schemacheck.check(plandoc.to_document(plan), plandoc.schema_text()) == []


def test_schema_is_shipped_and_valid() -> None:
    from jsonschema import Draft202012Validator

    assert plandoc.schema_text() == (REPO / "schemas" / "plan.schema.json").read_text()
    Draft202012Validator.check_schema(plandoc.schema())
    assert plandoc.schema()["$defs"]["action"]["properties"]["op"]["enum"] == [o.value for o in Op]


def test_a_saved_plan_without_revision_fields_still_reads() -> None:
    doc = plandoc.to_document(FULL)
    for action in doc["actions"]:
        del action["revision"]  # canonical carries it: a plan saved before the field existed
    assert plandoc.from_document(doc, path="p") == FULL


def test_keep_alive_written_as_an_integer_still_reads_as_seconds() -> None:
    doc = plandoc.to_document(FULL)
    doc["actions"][1]["keep_alive"] = -1
    assert plandoc.from_document(doc, path="p").actions[1].keep_alive == FOREVER


def _refusal(why: str, path: str = "plan.json") -> str:
    return (
        f"saved plan {path} is not a plan this version of infernet can apply: {why}; "
        "run infernet plan --out again"
    )


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda d: d.update(format_version=2), "format_version is 2, this version reads 1"),
        (lambda d: d.pop("format_version"), "format_version is null, this version reads 1"),
        (
            lambda d: d["actions"][0].update(op="explode"),
            "actions[0].op: 'explode' is not one of pull, remove, pin, unpin, update",
        ),
        (
            lambda d: d["actions"][0].pop("canonical"),
            "actions[0]: missing required key 'canonical'",
        ),
        (
            lambda d: d["budget"].update(fits="yes"),
            "budget.fits: expected true or false, got 'yes'",
        ),
        (
            lambda d: d.update(extra=1),
            "unknown key 'extra' at the top level; valid keys are: format_version, config, "
            "observed, actions, noops, budget, advertised, errors, warnings, checks, unserved",
        ),
        (
            lambda d: (d["noops"][0].update(backend="docker"), d.update(advertised="x")),
            "advertised: expected a list, got 'x' (and 1 more)",
        ),
    ],
)
def test_invalid_documents_are_refused(change: Any, why: str) -> None:
    doc = plandoc.to_document(FULL)
    change(doc)
    with pytest.raises(ConfigError) as caught:
        plandoc.from_document(doc, path="plan.json")
    assert str(caught.value) == _refusal(why)


def test_write_then_read(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plandoc.write_document(FULL, path)
    assert plandoc.read_document(path) == FULL
    assert json.loads(path.read_text())["format_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def test_read_refuses_what_is_not_a_plan(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as caught:
        plandoc.read_document(path)
    assert str(caught.value) == _refusal(
        "not JSON (line 1, column 2: Expecting property name enclosed in double quotes)", str(path)
    )
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        plandoc.read_document(path)
    with pytest.raises(ConfigError, match=r"^cannot read saved plan .*missing.json"):
        plandoc.read_document(tmp_path / "missing.json")


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789:.-/", min_size=1, max_size=30)
_bytes = st.integers(min_value=0, max_value=2**50)
_maybe_bytes = st.none() | _bytes
_actions = st.builds(
    Action,
    op=st.sampled_from(Op),
    model=_names,
    backend=st.sampled_from(backends.kinds()),
    canonical=_names,
    reason=st.text(max_size=40),
    download_bytes=_maybe_bytes,
    vram_bytes=_maybe_bytes,
    keep_alive=st.none() | st.just(FOREVER) | st.floats(min_value=0, max_value=1e7),
    digest=st.none() | st.text(max_size=20),
    embedding=st.booleans(),
    context=st.none() | st.integers(min_value=1, max_value=1 << 20),
)
_plans = st.builds(
    Plan,
    source=st.builds(
        ConfigSource,
        path=st.text(min_size=1, max_size=40),
        sha256=st.just(SHA),
        git_commit=st.none() | st.just(COMMIT),
    ),
    fingerprint=st.text(max_size=40),
    actions=st.lists(_actions, max_size=4).map(tuple),
    noops=st.lists(
        st.builds(Noop, _names, st.sampled_from(backends.kinds()), st.text(max_size=20)), max_size=3
    ).map(tuple),
    budget=st.builds(
        Budget,
        vram_total_bytes=_maybe_bytes,
        vram_source=st.sampled_from(["nvml", "config", "cpu", "none"]),
        reserve_bytes=_bytes,
        vram_pinned_bytes=_bytes,
        largest_swap_in_bytes=_bytes,
        fits=st.booleans(),
        disk_free_bytes=_maybe_bytes,
        disk_reserve_bytes=_bytes,
        download_bytes=_bytes,
        estimates=st.lists(
            st.builds(Estimate, _names, _maybe_bytes, st.sampled_from(["rough"]), st.booleans()),
            max_size=3,
        ).map(tuple),
    ),
    advertised=st.lists(_names, max_size=5).map(tuple),
    errors=st.lists(st.text(max_size=20), max_size=2).map(tuple),
    warnings=st.lists(st.text(max_size=20), max_size=2).map(tuple),
)


@given(_plans)
def test_any_plan_round_trips(plan: Plan) -> None:
    assert _through_json(plan) == plan
