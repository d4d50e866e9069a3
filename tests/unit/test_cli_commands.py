"""The pure rules behind issue 16's area C commands, from data tables: the two shapes of a
polled command, what ``model install`` flags mean or refuse, and which ownership record a
name means for ``state show | forget``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.config import desired
from reconciler.controlplane.args import command_of
from reconciler.converge import edits
from reconciler.converge.adoption import owned_record
from reconciler.converge.edits import local_install, looks_like_hf_repo
from reconciler.errors import PlanError
from reconciler.model import BackendKind, Desired
from state import OwnedRecord

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("row", "verb", "args"),
    [
        (
            {"id": "1", "command": "model_install", "args": {"model": "m"}},
            "model_install",
            {"model": "m"},
        ),
        (
            {"id": "1", "type": "model_install", "model": "qwen2.5:32b", "issued_at": "2026-01-01"},
            "model_install",
            {"model": "qwen2.5:32b"},
        ),
        (
            {"id": "1", "type": "model_install", "model": "x", "hf": "o/r"},
            "model_install",
            {"model": "x", "hf": "o/r"},
        ),
        (
            {"id": "1", "type": "model_remove", "args": {"model": "m"}},
            "model_remove",
            {"model": "m"},
        ),
        # {command, args} wins when both are there; a missing verb is the empty (unknown) one.
        (
            {"id": "1", "command": "model_remove", "type": "model_install", "model": "m"},
            "model_remove",
            {},
        ),
        ({"id": "1", "args": {"model": "m"}}, "", {"model": "m"}),
        ({"id": "1", "command": "model_install", "args": ["m"]}, "model_install", {}),
        ({"id": "1", "type": 7, "model": "m"}, "7", {"model": "m"}),
    ],
)
def test_a_polled_command_in_either_shape(
    row: dict[str, Any], verb: str, args: dict[str, Any]
) -> None:
    assert command_of(row) == (verb, args)


@pytest.mark.parametrize(
    ("name", "hf"),
    [
        ("Qwen/Qwen2.5-14B-Instruct", True),
        ("meta-llama/Llama-3.1-8B-Instruct@main", True),
        ("mannix/llama3.1-8b-abliterated", False),  # an Ollama namespace: lower case
        ("Qwen/Qwen2.5:14b", False),  # a tag: Ollama's
        ("hf.co/Qwen/Qwen2.5-GGUF", False),  # Ollama's own pull from the hub
        ("qwen2.5:14b", False),
        ("Llama3.2", False),
    ],
)
def test_what_reads_as_a_huggingface_repo_id(name: str, hf: bool) -> None:
    assert looks_like_hf_repo(name) is hf


def _file(text: str) -> Desired:
    return desired.parse(text, path="infernet.yaml")


OLLAMA_NODE = "served_models: [smollm2:135m]\n"
LISTED_GGUF = "served_models:\n  - {name: a.gguf, backend: llamacpp, source: 'https://h/a.gguf'}\n"


def _flags(
    backend: str | None = None, source: str | None = None, sha256: str | None = None
) -> dict[str, Any]:
    return {"given": backend, "source": source, "sha256": sha256}


GGUF_ENTRY = {"name": "q.gguf", "backend": "llamacpp", "source": "https://h/q.gguf", "sha256": SHA}
HF_ID = "Qwen/Qwen2.5-14B-Instruct"


@pytest.mark.parametrize(
    ("text", "name", "flags", "entry"),
    [
        (OLLAMA_NODE, "q.gguf", _flags(source="https://h/q.gguf", sha256=SHA), GGUF_ENTRY),
        (OLLAMA_NODE, "qwen2.5:14b", _flags(), "qwen2.5:14b"),
        (OLLAMA_NODE, HF_ID, _flags("vllm"), {"name": HF_ID, "backend": "vllm"}),
        (OLLAMA_NODE, HF_ID, _flags("ollama"), HF_ID),  # said so: an Ollama model of that name
        (
            LISTED_GGUF,
            "a.gguf",
            _flags(source="https://h/a.gguf"),
            {"name": "a.gguf", "backend": "llamacpp", "source": "https://h/a.gguf"},
        ),
    ],
)
def test_model_install_entries(text: str, name: str, flags: dict[str, Any], entry: Any) -> None:
    assert local_install(_file(text), name, pin=False, **flags).entry == entry


@pytest.mark.parametrize(
    ("text", "name", "flags", "says"),
    [
        (OLLAMA_NODE, "q.gguf", _flags(sha256=SHA), "--sha256 checks a downloaded file"),
        (OLLAMA_NODE, "q.gguf", _flags(source="https://h/q", sha256="12"), "is not a SHA-256"),
        (OLLAMA_NODE, "q.gguf", _flags(source="s3://u:pw@h/q.gguf"), "'s3://***@h/q.gguf'"),
        (OLLAMA_NODE, "q.gguf", _flags("ollama", "https://h/q.gguf"), "--source: Ollama models"),
        (
            OLLAMA_NODE,
            HF_ID,
            _flags(),
            "looks like a HuggingFace repo id: add --backend vllm (or sglang, max)",
        ),
        (LISTED_GGUF, "a.gguf", _flags(source="https://other/a.gguf"), "already in the file"),
    ],
)
def test_model_install_refusals(text: str, name: str, flags: dict[str, Any], says: str) -> None:
    with pytest.raises(PlanError) as caught:
        local_install(_file(text), name, pin=False, **flags)
    assert says in str(caught.value)
    assert "pw" not in str(caught.value)


def _owned(backend: str, canonical: str, name: str) -> OwnedRecord:
    return OwnedRecord(backend, canonical, name, None, "2026-01-01T00:00:00Z", False, None)


RECORDS = [
    _owned("ollama", "registry.ollama.ai/library/qwen2.5:0.5b", "qwen2.5:0.5b"),
    _owned("vllm", "org/tiny@v1", "org/tiny"),
    _owned("sglang", "org/tiny@main", "org/tiny"),
    _owned("llamacpp", "a.gguf", "a.gguf"),
]


@pytest.mark.parametrize(
    ("name", "backend", "found"),
    [
        ("qwen2.5:0.5b", None, "registry.ollama.ai/library/qwen2.5:0.5b"),
        ("Qwen2.5:0.5b", None, "registry.ollama.ai/library/qwen2.5:0.5b"),  # Ollama's case
        ("a.gguf", None, "a.gguf"),
        ("org/tiny@v1", None, "org/tiny@v1"),
        ("org/tiny", BackendKind.SGLANG, "org/tiny@main"),
    ],
)
def test_the_ownership_record_a_name_means(
    name: str, backend: BackendKind | None, found: str
) -> None:
    assert owned_record(RECORDS, name, backend).canonical == found


@pytest.mark.parametrize(
    ("name", "says"),
    [("org/tiny", "could mean"), ("b.gguf", "does not manage"), ("../x", "does not manage")],
)
def test_a_name_for_no_record_or_several_is_refused(name: str, says: str) -> None:
    with pytest.raises(PlanError) as caught:
        owned_record(RECORDS, name, None)
    assert says in str(caught.value)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "command", "type", "args", "model", "hf", "issued_at"]) | st.text(),
        _JSON,
        max_size=6,
    )
)
def test_any_polled_row_gives_a_verb_and_arguments_never_an_error(row: dict[str, Any]) -> None:
    verb, args = command_of(row)
    assert isinstance(verb, str) and isinstance(args, dict)
    assert not set(args) & {"id", "type", "issued_at"} or "args" in row


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        ("Qwen/Qwen2.5-14B-Instruct", True),
        ("mistralai/Mistral-7B-Instruct-v0.3", True),
        ("qwen2.5:14b", False),
        ("library/qwen2.5", False),  # an Ollama namespace/model, lower case
    ],
)
def test_a_remote_install_of_a_huggingface_id_on_an_ollama_node_says_so(
    model: str, refused: bool
) -> None:
    current = desired.parse("served_models: [smollm2:135m]\n", path="infernet.yaml")
    answer = edits.remote_install({"model": model}, current)
    said = isinstance(answer, str) and "looks like a HuggingFace repo id" in answer
    assert said is refused, answer
