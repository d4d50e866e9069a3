"""`infernet plan` on an Ollama-only file loads nothing of the other backends' heavy parts.

The plan of a node that serves Ollama models only must not pay for the libraries of the
backends it does not use, nor for what a valid file or a node without a control plane never
needs: ``huggingface_hub`` (~150 ms to import), ``psutil`` (engine and llama-server child
processes), the control-plane client, and ``jsonschema`` (a file already found valid is not
checked again: ``reconciler.config.verdicts``). Each is a measurable share of `infernet plan`'s
start-up, which is held to 1.5× a bare ``ollama`` client listing (``bench/compare.py``, item 2).
Checked in the real CLI process with ``python -X importtime``, which names every module the
process imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import INFERNET, Node

NOT_ON_AN_OLLAMA_PLAN = (
    "huggingface_hub",
    "psutil",
    "jsonschema",
    "reconciler.controlplane.client",
    "reconciler.controlplane.heartbeat",
)
HEAVY = {"huggingface_hub", "psutil", "jsonschema", "click", "pygments", "ollama", "pydantic"}
"""Packages none of whose modules an Ollama-only plan imports (click and pygments: httpx's own
command line, which ``reconciler/__init__.py`` keeps out; ollama and pydantic: observing is
three JSON reads, the client is for changes and chats)."""


def imported_by_plan(node: Node) -> set[str]:
    cmd = [sys.executable, "-X", "importtime", INFERNET, "plan"]
    cmd += ["-c", str(node.config), "--state-dir", str(node.state)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=node.env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("hub_cache", ["none", "without models"])
def test_plan_of_an_ollama_only_file_imports_no_other_backend(node: Node, hub_cache: str) -> None:
    if hub_cache != "none":
        # A hub cache a past download left behind with no model in it (locks, a dataset):
        # it lists no model, so it needs no huggingface_hub to say so.
        hub = Path(node.env["HOME"]) / ".cache" / "huggingface" / "hub"
        (hub / ".locks" / "datasets--org--data").mkdir(parents=True)
        (hub / "datasets--org--data" / "snapshots").mkdir(parents=True)
        (hub / "version.txt").write_text("1")
    node.write_config(["qwen2.5:0.5b", "llama3.2:1b"])
    first = imported_by_plan(node)
    assert "jsonschema" in first  # a file never seen is checked
    modules = imported_by_plan(node)
    assert "reconciler.backends.ollama.parse" in modules  # it did observe Ollama
    assert "reconciler.config.schemacheck" in modules
    loaded = {m for m in modules if m in NOT_ON_AN_OLLAMA_PLAN or m.split(".")[0] in HEAVY}
    assert loaded == set()
    # One character edited: checked again.
    node.write_config(["llama3.2:1b", "qwen2.5:0.5b"])
    assert "jsonschema" in imported_by_plan(node)


def test_plan_of_an_invalid_file_still_words_its_errors(node: Node) -> None:
    # A broken file is never remembered: jsonschema finds and words the error every time.
    node.write_config(["qwen2.5:0.5b"], policy={"parallel_pulls": "four"})
    for _ in range(2):
        done = node.run("plan")
        assert done.returncode != 0
        assert "parallel_pulls" in done.stderr and "Traceback" not in done.stderr
