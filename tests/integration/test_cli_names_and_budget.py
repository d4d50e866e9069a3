"""Quantization names as people write them, and VRAM refusals and estimates that explain
themselves, through the real ``infernet`` against the Ollama-compatible test server (issue 16,
items 3 and 6)."""

from __future__ import annotations

import json
import re

from tests.integration.conftest import Node, needs_fake

# The test server's llama3.2:1b: 1.2B parameters, Q4_K_M, 16 layers × 8 KV heads × (64 + 64)
# × f16 = 32 KiB of KV cache per token.
LLAMA = "llama3.2:1b"
KV_PER_TOKEN = 32 * 1024


def test_validate_refuses_an_unknown_quantization_with_a_suggestion(node: Node) -> None:
    node.write_config([{"name": LLAMA, "quantization": "BOGUS"}, {"name": "smollm2:135m"}])
    out = node.run("validate")
    assert out.returncode == 1
    said = out.stdout + out.stderr
    assert re.search(
        r"infernet\.yaml:3:\d+: served_models\[0\]\.quantization: unknown quantization "
        r"'BOGUS'; did you mean one of Q4_K_M",
        said,
    ), said
    assert "Traceback" not in said


def test_validate_suggests_the_closest_quantization(node: Node) -> None:
    node.write_config([{"name": LLAMA, "quantization": "Q4_K_N"}])
    out = node.run("validate")
    assert out.returncode == 1
    assert "did you mean 'Q4_K_M'?" in out.stdout + out.stderr


def test_quantization_written_as_people_write_it_meets_the_artifact(node: Node) -> None:
    needs_fake(node)
    node.write_config(
        [
            {"name": "smollm2:135m", "quantization": "FP16"},  # the artifact says F16
            {"name": LLAMA, "quantization": "q4"},  # Q4_K_M is a 4-bit K-quant
            {"name": "llama3.2:1b-instruct-q8_0", "quantization": "int8"},  # Q8_0
        ]
    )
    assert node.run("validate").returncode == 0
    out = node.run("plan", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["errors"] == []


def test_quantization_family_still_refuses_another_width(node: Node) -> None:
    needs_fake(node)
    node.write_config([{"name": LLAMA, "quantization": "INT8"}])
    out = node.run("plan")
    assert out.returncode == 1
    assert "is Q4_K_M, but the file asserts quantization INT8" in out.stdout


def test_refusal_that_is_mostly_kv_cache_says_so_and_suggests_context(node: Node) -> None:
    needs_fake(node)
    # 4 GiB of KV at 128k tokens in a 4 GiB budget less 1 GiB reserve: the weights are tiny
    node.write_config(
        [{"name": LLAMA, "context": 131072}],
        budget={"vram": "4GiB", "reserve": "1GiB", "disk_reserve": "1GiB"},
    )
    out = node.run("plan")
    assert out.returncode == 1
    assert (
        "4.0 GiB of it is KV cache for 131072 tokens of context: "
        "set context: 65536 on this model, or pick a smaller quantization"
    ) in out.stdout, out.stdout
    # and the suggestion is true: at 65536 tokens the same budget fits
    node.write_config(
        [{"name": LLAMA, "context": 65536}],
        budget={"vram": "4GiB", "reserve": "1GiB", "disk_reserve": "1GiB"},
    )
    assert node.run("plan").returncode == 0


def test_plan_verbose_shows_the_estimate_parts_beside_the_rule_of_thumb(node: Node) -> None:
    needs_fake(node)
    node.write_config([{"name": LLAMA, "context": 8192}])
    out = node.run("plan", "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "RULE OF THUMB" in line)
    assert lines[header].split() == [
        *("MODEL", "VRAM", "ESTIMATE", "WEIGHTS", "KV", "CACHE", "AT", "CONTEXT"),
        *("RUNTIME", "RULE", "OF", "THUMB"),
    ]
    row = lines[header + 1]
    # 8192 tokens × 32 KiB = 256 MiB of KV; the registry's 1.2B parameters × 0.5 byte + 15 %
    # = 690,000,000 bytes = 658.0 MiB
    assert row.startswith(LLAMA) and "(metadata)" in row
    assert "256.0 MiB at 8192" in row and row.endswith("658.0 MiB (Q4_K_M)"), row
    assert lines[header + 2].startswith("Rule of thumb: parameters × bytes per parameter")
    # the same parts, exact, in the plan document
    doc = json.loads(node.run("plan", "--json").stdout)
    (estimate,) = doc["budget"]["estimates"]
    parts = estimate["parts"]
    assert parts["kv"] == 8192 * KV_PER_TOKEN and parts["context"] == 8192
    assert parts["weights"] + parts["kv"] + parts["runtime"] == estimate["bytes"]
    assert parts["rule_of_thumb"] == 690_000_000


def test_plan_without_verbose_shows_no_estimate_parts(node: Node) -> None:
    node.write_config([LLAMA])
    out = node.run("plan")
    assert out.returncode == 0 and "RULE OF THUMB" not in out.stdout
