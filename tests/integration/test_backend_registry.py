"""A backend is one family of drivers plus one registry entry: ``tests/toy_backend.py``, which
no line of product code knows, goes through validate → plan → apply → heartbeat in the real
``infernet`` process, loaded through the plugin hook (``$INFERNET_BACKENDS``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.integration.conftest import Node, keygen, verified_beats
from tests.servers.controlplane_harness import ControlPlaneServer
from tests.toy_backend import content

PLUGIN = "tests.toy_backend:FAMILY"
ROOT = Path(__file__).resolve().parents[2]


def _configure(node: Node, cp: ControlPlaneServer, served: list[Any]) -> Path:
    toys = node.tmp / "toys"
    toys.mkdir(exist_ok=True)
    doc = {
        "served_models": served,
        "default_backend": "toy",
        "backends": {"toy": {"dir": str(toys)}},
        "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
        "control_plane": {
            "url": cp.url,
            "key_file": str(node.tmp / "node.key"),
            "node_id": "toy-node",
        },
    }
    node.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    return toys


def _served(beat: dict[str, Any]) -> list[str]:
    served: list[str] = beat["body"]["specs"]["served_models"]
    return served


def test_a_backend_from_a_plugin_is_validated_planned_applied_and_advertised(
    node: Node, cp: ControlPlaneServer
) -> None:
    node.env["INFERNET_BACKENDS"] = PLUGIN
    keygen(node)
    toys = _configure(node, cp, ["alpha", {"name": "beta", "keep_alive": "forever"}])

    out = node.run("validate")
    assert out.returncode == 0, out.stderr
    plan = json.loads(node.run("plan", "--json").stdout)
    assert [(a["op"], a["model"], a["backend"]) for a in plan["actions"]] == [
        ("pull", "alpha", "toy"),
        ("pull", "beta", "toy"),
        ("pin", "beta", "toy"),
    ]
    assert plan["advertised"] == ["alpha", "beta"]

    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert (toys / "alpha.toy").read_bytes() == content("alpha")
    assert (toys / "beta.pinned").exists()
    assert [_served(b) for b in verified_beats(cp)] == [["alpha", "beta"]]
    again = json.loads(node.run("plan", "--json").stdout)
    assert again["actions"] == [] and again["errors"] == []

    # A model that left the file is withdrawn from the heartbeat, then deleted (it is ours).
    cp.reset()
    _configure(node, cp, [{"name": "beta", "keep_alive": "forever"}])
    out = node.run("apply", "--yes")
    assert out.returncode == 0, out.stderr
    assert not (toys / "alpha.toy").exists()
    assert [_served(b) for b in verified_beats(cp)] == [["beta"], ["beta"]]
    status = json.loads(node.run("status", "--json").stdout)
    assert status["backends"]["toy"]["reachable"] is True
    assert {r["model"]: r["status"] for r in status["models"]} == {"beta": "pinned"}


def test_the_schema_and_the_choices_come_from_the_registry(node: Node) -> None:
    node.env["INFERNET_BACKENDS"] = PLUGIN
    schema = json.loads(node.run("schema").stdout)
    assert "toy" in schema["$defs"]["backend"]["enum"]
    assert schema["properties"]["backends"]["properties"]["toy"]["properties"]["dir"]
    out = node.run("model", "remove", "nothing", "--backend", "bogus")
    assert out.returncode == 1 and "invalid choice: 'bogus'" in out.stderr
    assert "'toy'" in out.stderr


def test_an_unregistered_kind_is_an_error_never_another_backend(node: Node) -> None:
    node.config.write_text("served_models: [{name: alpha, backend: toy}]\n")
    out = node.run("validate")
    assert out.returncode == 1
    assert "served_models[0].backend" in out.stderr and "toy" in out.stderr
    node.env["INFERNET_BACKENDS"] = "tests.no_such_module:FAMILY"
    out = node.run("validate")
    assert out.returncode == 1
    assert out.stderr.startswith("error: INFERNET_BACKENDS: can't load 'tests.no_such_module")
    assert "Traceback" not in out.stderr


def test_no_product_code_names_the_test_backend() -> None:
    named = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("reconciler", "state", "schemas")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in (".py", ".json")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\btoy\b", line, re.IGNORECASE)
    ]
    assert named == []
