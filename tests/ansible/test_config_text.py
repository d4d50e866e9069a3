"""The module's own YAML writer and the document it builds: whatever the options hold, the file
reads back (with PyYAML's safe loaders, as infernet reads it) as exactly that value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.infernet.node.plugins.module_utils.config_text import HEADER, render
from ansible_collections.infernet.node.plugins.modules.models import build_document

LOADERS = [yaml.SafeLoader, *([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])]

TRICKY = [
    "qwen2.5:14b",
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "http://127.0.0.1:11434",
    "~/.ollama/models",
    "24GiB",
    "10m",
    "forever",
    "-1",
    "1:30",
    "12:30:00",
    "1e3",
    "1_000",
    "0x1F",
    "0o17",
    "012",
    ".5",
    "yes",
    "No",
    "on",
    "OFF",
    "y",
    "n",
    "null",
    "~",
    "Null",
    "",
    " lead",
    "trail ",
    "a: b",
    "a #b",
    "#x",
    "- x",
    "-",
    "?",
    ":x",
    "x:",
    "@x",
    "`x",
    "!x",
    "&x",
    "*x",
    "%x",
    "{x",
    "[x",
    "|",
    ">",
    "'",
    '"',
    "a\nb",
    "tab\there",
    "\u2028",
    "é",
    "=",
    "<<",
    ".inf",
    "-.Inf",
    ".NaN",
    "2024-01-01",
    "2024-1-1 10:00:00",
    "3.",
    "+1",
    "true",
    "False",
]


def load(text: str) -> Any:
    values = [yaml.load(text, Loader=loader) for loader in LOADERS]
    assert all(v == values[0] for v in values[1:])
    return values[0]


@pytest.mark.parametrize("text", TRICKY)
def test_strings_read_back_as_themselves(text: str) -> None:
    doc = {"served_models": [text, {"name": text, "advertise_as": text}], text: {text: [text]}}
    assert load(render(doc)) == doc


def test_layout_is_plain_block_yaml() -> None:
    doc = build_document(
        {
            "served_models": [
                "qwen2.5:14b",
                {"name": "llama3.2:3b", "keep_alive": -1, "protect": True},
            ],
            "default_backend": None,
            "backends": {"ollama": {"url": "http://127.0.0.1:11434"}},
            "budget": {"vram": "22GiB", "reserve": "1GiB"},
            "control_plane": {},
            "policy": None,
            "settings": {"version": 1},
        }
    )
    assert render(doc) == HEADER + (
        "version: 1\n"
        "served_models:\n"
        "  - qwen2.5:14b\n"
        "  - name: llama3.2:3b\n"
        "    keep_alive: -1\n"
        "    protect: true\n"
        "backends:\n"
        "  ollama:\n"
        "    url: http://127.0.0.1:11434\n"
        "budget:\n"
        "  vram: 22GiB\n"
        "  reserve: 1GiB\n"
    )


def test_empty_containers_and_scalars() -> None:
    doc = {
        "served_models": [],
        "policy": {"allow_empty": True, "max_removals": 0, "x": 0.9},
        "a": {},
        "b": [[], {}, [1, [2]], None],
        "c": float("inf"),
    }
    assert load(render(doc)) == doc


def test_an_option_given_twice_is_refused() -> None:
    params = {"served_models": [], "budget": {"vram": "8GiB"}, "settings": {"budget": {}}}
    params.update(dict.fromkeys(("default_backend", "backends", "control_plane", "policy")))
    with pytest.raises(ValueError, match="budget given both as an option and in settings"):
        build_document(params)
    params["budget"] = None
    params["settings"] = {"served_models": []}
    with pytest.raises(ValueError, match="served_models given both"):
        build_document(params)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=12),
    st.floats(allow_nan=False),
    st.sampled_from(TRICKY),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), values, max_size=5))
def test_any_document_reads_back(doc: dict[str, Any]) -> None:
    assert load(render(doc)) == doc


def test_only_infernets_own_script_for_this_python_runs_in_process(tmp_path: Path) -> None:
    """The module imports infernet only for the console script of its own interpreter; a
    wrapper, ``#!/usr/bin/env``, another Python or another script run as a subprocess."""
    import sys
    from collections.abc import Callable

    from ansible_collections.infernet.node.plugins.modules import models
    from reconciler.cli import main

    importable_main: Callable[[str], object] = models.importable_main

    def script(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    entry = "import sys\nfrom reconciler.cli import main\nsys.exit(main())\n"
    other = tmp_path / "other" / "bin" / "python"
    other.parent.mkdir(parents=True)
    other.symlink_to(sys.executable)  # the same binary, in another environment's folder
    assert importable_main(script("own", f"#!{sys.executable}\n{entry}")) is main
    assert importable_main(script("wrapper", '#!/bin/sh\nexec infernet "$@"\n')) is None
    assert importable_main(script("env", f"#!/usr/bin/env python3\n{entry}")) is None
    assert importable_main(script("venv", f"#!{other}\n{entry}")) is None
    assert importable_main(script("tool", f"#!{sys.executable}\nprint('hello')\n")) is None
    assert importable_main(str(tmp_path / "missing")) is None
