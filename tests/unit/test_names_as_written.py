"""Names are the file's: which entry a typed name refers to, and the
name every action, row and document carries: as written, with an HF revision in its own field."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.cli import render
from reconciler.cli.status import model_rows
from reconciler.config import desired
from reconciler.model import (
    BackendKind,
    BackendState,
    DiskState,
    GpuState,
    InstalledModel,
    ModelFacts,
    ModelSpec,
    Observed,
    Owned,
    OwnedModel,
    Upstream,
)
from reconciler.names import key, refers_to
from reconciler.planning import document as plandoc
from reconciler.planning.plan import plan
from state import Store

VLLM = BackendKind.VLLM
FILE = """\
served_models:
  - {name: org/tiny, backend: vllm, revision: v1, protect: true}
  - {name: org/chat, backend: sglang, advertise_as: chat}
  - Qwen2.5:0.5B
"""


def _specs() -> dict[str, ModelSpec]:
    return {m.name: m for m in desired.parse(FILE, path="f").models}


@pytest.mark.parametrize(
    ("entry", "name", "expected"),
    [
        ("org/tiny", "org/tiny", True),  # the entry's own revision: v1
        ("org/tiny", "org/tiny@v1", True),
        ("org/tiny", "org/tiny@main", False),  # another revision is another model
        ("org/tiny", "org/other", False),
        ("org/chat", "chat", True),  # its advertised name
        ("org/chat", "org/chat@main", True),
        ("Qwen2.5:0.5B", "qwen2.5:0.5b", True),  # Ollama's case-insensitive matching
        ("Qwen2.5:0.5B", "registry.ollama.ai/library/qwen2.5:0.5b", True),
        ("Qwen2.5:0.5B", "qwen2.5", False),  # :latest is another tag
        ("Qwen2.5:0.5B", "not a name", False),
    ],
)
def test_which_entry_a_name_refers_to(entry: str, name: str, expected: bool) -> None:
    assert refers_to(_specs()[entry], name) is expected


def test_a_backend_narrows_the_match() -> None:
    tiny = _specs()["org/tiny"]
    assert refers_to(tiny, "org/tiny", VLLM)
    assert not refers_to(tiny, "org/tiny", BackendKind.SGLANG)


def _hf_observed(installed: tuple[InstalledModel, ...]) -> Observed:
    up = Upstream(VLLM, "org/tiny@v1", ModelFacts(digest="c2", size=1000), 1000, 1000)
    state = BackendState(VLLM, "http://127.0.0.1:8000", True, installed=installed)
    return Observed(
        backends={VLLM: state},
        upstream={key(VLLM, "org/tiny@v1"): up},
        gpu=GpuState("config", 80 << 30, None),
        disks={VLLM: DiskState("/hub", 500 << 30)},
        fingerprint="sha256:test",
    )


def test_hf_actions_name_the_repo_as_written_and_carry_the_revision_apart() -> None:
    wanted = desired.parse(
        "served_models: [{name: org/tiny, backend: vllm, revision: v1}]\n", path="f"
    )
    old = InstalledModel(VLLM, "org/old@main", "org/old@main", ModelFacts(digest="c1", size=9))
    owned = Owned(models={key(VLLM, "org/old@main"): OwnedModel(VLLM, "org/old@main", "org/old")})
    result = plan(wanted, _hf_observed((old,)), owned)
    assert [(a.op.value, a.model, a.canonical) for a in result.actions] == [
        ("pull", "org/tiny", "org/tiny@v1"),
        ("pin", "org/tiny", "org/tiny@v1"),
        ("remove", "org/old", "org/old@main"),
    ]
    doc = plandoc.to_document(result)
    assert [(a["model"], a["revision"]) for a in doc["actions"]] == [
        ("org/tiny", "v1"),
        ("org/tiny", "v1"),
        ("org/old", "main"),
    ]
    assert doc["actions"][0]["source"] == "hf://org/tiny@v1"
    actions = render.render_plan(result).split("\n\n")[1]  # the table of actions
    assert actions.splitlines()[0].split()[:3] == ["ACTION", "MODEL", "REVISION"]
    assert "org/tiny@" not in actions and "org/old@" not in actions


def test_model_list_names_hf_models_as_written_with_the_revision_apart(tmp_path: Path) -> None:
    wanted = desired.parse(
        "served_models: [{name: org/tiny, backend: vllm, revision: v1}, Qwen2.5:0.5B]\n", path="f"
    )
    stray = InstalledModel(VLLM, "org/old@main", "org/old@main", ModelFacts(size=9))
    tiny = InstalledModel(VLLM, "org/tiny@v1", "org/tiny@v1", ModelFacts(size=7))
    with Store.open(tmp_path / "state") as store:
        rows = model_rows(wanted, _hf_observed((stray, tiny)), store)
    got = {(r["model"], r["revision"], r["status"]) for r in rows}
    assert got == {
        ("org/old", "main", "unmanaged"),
        ("org/tiny", "v1", "installed"),
        ("Qwen2.5:0.5B", None, "missing"),  # the file's spelling, not Ollama's
    }
    table = render.render_models(rows)
    assert table.splitlines()[0].split() == ["MODEL", "REVISION", "SIZE", "BACKEND", "STATUS"]
