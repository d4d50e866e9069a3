"""Opt-in: the core contract against a real Ollama (``INFERNET_TEST_OLLAMA_URL``).

Ollama can't be installed on CI, so these are skipped there, saying why. Run them on a node:

    INFERNET_TEST_OLLAMA_URL=http://127.0.0.1:11434 ./run test tests/contract tests/integration

(the integration suite then also runs against that Ollama, skipping only the fault-injection
tests). They pull ``all-minilm:latest`` (46 MB) from the real registry and remove it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

URL = os.environ.get("INFERNET_TEST_OLLAMA_URL")
INFERNET = str(Path(sys.executable).with_name("infernet"))
MODEL = "all-minilm:latest"

pytestmark = [
    pytest.mark.contract,
    pytest.mark.skipif(not URL, reason="set INFERNET_TEST_OLLAMA_URL to run against a real Ollama"),
]


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INFERNET, *args, "-c", str(tmp / "infernet.yaml"), "--state-dir", str(tmp / "state")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_real_ollama_plan_apply_plan_remove(tmp_path: Path) -> None:
    assert URL is not None
    config = tmp_path / "infernet.yaml"
    doc = {
        "served_models": [{"name": MODEL, "keep_alive": "forever"}],
        "backends": {"ollama": {"url": URL}},
        "budget": {"disk_reserve": "1GiB"},
    }
    config.write_text(yaml.safe_dump(doc))
    plan = _run(tmp_path, "plan", "--json")
    assert plan.returncode in (0, 2), plan.stderr
    assert _run(tmp_path, "apply", "--yes").returncode == 0
    again = json.loads(_run(tmp_path, "plan", "--json").stdout)
    assert again["actions"] == [] and again["errors"] == []
    assert _run(tmp_path, "model", "remove", MODEL, "--yes").returncode == 0
    listed = json.loads(_run(tmp_path, "model", "list", "--json").stdout)["models"]
    assert MODEL not in {m["model"] for m in listed}
