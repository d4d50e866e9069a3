"""Pulls end to end: parallel pulls, aliases and upstream updates, exact download bytes, the GGUF
header read before a pull."""

from __future__ import annotations

import json
import subprocess

from tests.integration.conftest import Node, needs_fake

SMALL = "smollm2:135m"
QWEN = "qwen2.5:0.5b"
LLAMA = "llama3.2:1b"


def _events(out: subprocess.CompletedProcess[str]) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _order(events: list[dict]) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(e["event"], e["model"]) for e in events if e["event"].startswith("action_")]


def test_parallel_pulls_overlap_and_serial_ones_do_not(node: Node) -> None:
    node.throttle(150_000)
    node.write_config([QWEN, LLAMA], policy={"parallel_pulls": 2})
    out = node.run("apply", "--yes", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    order = _order(_events(out))
    assert [e for e, _ in order[:2]] == ["action_started", "action_started"], order
    node.write_config(
        [SMALL, "all-minilm:latest"],
        policy={"parallel_pulls": 1},
        budget={"vram": "24GiB", "disk_reserve": "1GiB"},
    )
    out = node.run("apply", "--yes", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    pulls = [o for o in _order(_events(out)) if o[1] in (SMALL, "all-minilm:latest")]
    assert [e for e, _ in pulls] == ["action_started", "action_finished"] * 2, pulls


def test_alias_of_an_installed_model_downloads_nothing(node: Node) -> None:
    needs_fake(node)
    node.write_config([QWEN])
    assert node.run("apply", "--yes").returncode == 0
    node.write_config([QWEN, "qwen2.5:latest"])
    doc = json.loads(node.run("plan", "--json").stdout)
    (action,) = doc["actions"]
    assert (action["op"], action["model"], action["download_bytes"]) == (
        "pull",
        "qwen2.5:latest",
        0,
    )


def test_new_weights_upstream_notify_then_follow(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([SMALL])
    assert node.run("apply", "--yes").returncode == 0
    old = next(m for m in _tags(node) if m["name"] == SMALL)["digest"]
    server.bump_upstream(SMALL)
    doc = json.loads(node.run("plan", "--json", "--refresh").stdout)
    assert doc["actions"] == []
    assert any("new weights upstream" in w for w in doc["warnings"])
    node.write_config([SMALL], policy={"updates": "follow"})
    doc = json.loads(node.run("plan", "--json").stdout)
    assert [(a["op"], a["model"]) for a in doc["actions"]] == [("update", SMALL)]
    assert node.run("apply", "--yes").returncode == 0
    new = next(m for m in _tags(node) if m["name"] == SMALL)["digest"]
    assert new != old
    assert node.run("plan", "--detailed-exitcode").returncode == 0


def _tags(node: Node) -> list[dict]:  # type: ignore[type-arg]
    import httpx

    return httpx.get(f"{node.url}/api/tags").json()["models"]  # type: ignore[no-any-return]


def test_plan_reads_the_gguf_header_of_a_model_not_yet_pulled(node: Node) -> None:
    server = needs_fake(node)
    node.write_config([LLAMA])
    out = node.run("plan", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (estimate,) = doc["budget"]["estimates"]
    assert (estimate["model"], estimate["source"]) == (LLAMA, "metadata"), estimate
    assert LLAMA not in node.installed()
    ranged = [r for r in server.registry_requests() if r["range"]]
    assert ranged and all(r["range"].startswith("bytes=0-") for r in ranged), ranged
    server.reset_requests()
    again = json.loads(node.run("plan", "--json").stdout)
    assert again["budget"]["estimates"][0]["source"] == "metadata"
    seen = server.registry_requests()
    assert seen and not [r for r in seen if r["range"]], "header not cached"
