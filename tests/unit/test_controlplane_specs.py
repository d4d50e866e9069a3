"""The heartbeat's ``specs`` object (reconciler.controlplane.specs, re-exported by controlplane)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from reconciler.controlplane.client import offline_body, specs_for
from reconciler.controlplane.specs import CLI_VERSION, vram_tier
from reconciler.model import GpuInfo, GpuState
from tests.servers.controlplane_store import sanitize_specs
from tests.servers.controlplane_store import vram_tier as server_vram_tier

MIB = 1 << 20
GIB = 1 << 30
EXTENSION: dict[str, Any] = {
    "config_sha256": "ab" * 32,
    "git_commit": None,
    "converged": True,
    "drift": [],
    "errors": [],
    "last_apply_at": "2026-01-01T00:00:00Z",
    "estimates": {"qwen2.5:7b": 5_000_000_000},
}


def gpu_state(*totals_mib: int, free_mib: int = 1000) -> GpuState:
    gpus = tuple(
        GpuInfo(i, "NVIDIA GeForce RTX 4090", t * MIB, free_mib * MIB, (t - free_mib) * MIB)
        for i, t in enumerate(totals_mib)
    )
    return GpuState(
        "nvml",
        sum(g.total_bytes for g in gpus),
        sum(g.free_bytes for g in gpus),
        gpus,
    )


CPU_ONLY = GpuState("cpu", 10 * GIB, None, (), "no NVIDIA GPU")


@pytest.mark.parametrize(
    ("total_bytes", "tier"),
    [
        (None, "unknown"),
        (0, "unknown"),
        (-1, "unknown"),
        (1, "<8gb"),
        (8 * GIB - 1, "<8gb"),  # 8191 MiB
        (8 * GIB, "8-16gb"),  # bounds are exclusive: exactly 8 GiB is the next tier
        (16 * GIB - MIB, "8-16gb"),
        (16 * GIB, "16-24gb"),
        (24564 * MIB, "16-24gb"),  # an RTX 4090 as nvidia-smi reports it
        (24576 * MIB, "24-48gb"),  # an RTX 3090
        (48 * GIB - MIB, "24-48gb"),
        (48 * GIB, ">=48gb"),
        (81559 * MIB, ">=48gb"),  # an H100 80GB
    ],
)
def test_vram_tier_matches_the_real_nodes_boundaries(total_bytes: int | None, tier: str) -> None:
    assert vram_tier(total_bytes) == tier


def test_vram_tier_agrees_with_the_servers_rule_on_every_mib() -> None:
    for mib in range(0, 64 * 1024, 7):
        assert vram_tier(mib * MIB) == server_vram_tier(mib)
    for mib in (8191, 8192, 16383, 16384, 24575, 24576, 49151, 49152):
        assert vram_tier(mib * MIB) == server_vram_tier(mib)


def test_specs_shape() -> None:
    specs = specs_for(["qwen2.5:7b", "llama3.2:3b"], gpu_state(24564, 81559), extension=EXTENSION)
    assert specs["served_models"] == ["qwen2.5:7b", "llama3.2:3b"]
    assert specs["gpu_count"] == 2
    assert specs["gpus"] == [
        {"vendor": "nvidia", "vram_tier": "16-24gb", "model": "NVIDIA GeForce RTX 4090"},
        {"vendor": "nvidia", "vram_tier": ">=48gb", "model": "NVIDIA GeForce RTX 4090"},
    ]
    vram = specs["load"]["vram"]
    assert vram == {"total_gb": round((24564 + 81559) / 1024, 2), "free_gb": round(2000 / 1024, 2)}
    assert set(specs["load"]["ram"]) == {"total_gb", "free_gb"}
    assert specs["load"]["ram"]["total_gb"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", specs["load"]["measured_at"])
    assert specs["cli_version"] == CLI_VERSION
    assert specs["reconciler"] == EXTENSION and specs["reconciler"] is not EXTENSION
    if "cpu" in specs:
        assert set(specs["cpu"]) == {"vendor", "arch", "cores", "groups", "ram_gb"}
    # No exact VRAM per GPU and nothing the router would misread as saturation.
    assert "vram_mb" not in str(specs) and "active_jobs" not in specs["load"]


def test_cpu_only_node_has_no_gpus() -> None:
    specs = specs_for(["smollm2:135m"], CPU_ONLY, extension={})
    assert specs["gpu_count"] == 0 and specs["gpus"] == []
    assert specs["load"]["vram"] == {"total_gb": 0.0, "free_gb": 0.0}


def test_gpu_model_names_are_cut_to_what_the_server_keeps() -> None:
    gpu = GpuState("nvml", 8 * GIB, GIB, (GpuInfo(0, "X" * 100, 8 * GIB, GIB, 7 * GIB),))
    assert specs_for([], gpu, extension={})["gpus"][0]["model"] == "X" * 64


def test_served_models_keep_order_and_drop_exact_duplicates_only() -> None:
    specs = specs_for(["b", "a", "b", "A"], CPU_ONLY, extension={})
    assert specs["served_models"] == ["b", "a", "A"]


def test_fifty_names_fit() -> None:
    names = [f"model-{i}:latest" for i in range(50)]
    assert specs_for(names, CPU_ONLY, extension={})["served_models"] == names


def test_more_than_fifty_names_is_an_error_not_a_silent_cut() -> None:
    names = [f"model-{i}:latest" for i in range(51)]
    with pytest.raises(ValueError, match=r"51 models to advertise.*at most 50"):
        specs_for(names, CPU_ONLY, extension={})


@pytest.mark.parametrize("bad", ["", "x" * 201])
def test_names_outside_1_to_200_characters_are_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="1-200 characters"):
        specs_for(["ok", bad], CPU_ONLY, extension={})


def test_two_hundred_characters_fit() -> None:
    assert specs_for(["x" * 200], CPU_ONLY, extension={})["served_models"] == ["x" * 200]


def test_the_register_sanitizer_keeps_everything_routing_needs() -> None:
    names = [f"m{i}:latest" for i in range(49)] + ["hf:org/repo"]
    specs = specs_for(names, gpu_state(24564), extension=EXTENSION)
    kept = sanitize_specs(specs)
    assert kept is not None
    assert kept["served_models"] == specs["served_models"]
    assert kept["gpus"] == specs["gpus"] and kept["gpu_count"] == specs["gpu_count"]
    assert kept["cli_version"] == CLI_VERSION  # passes ^[0-9A-Za-z._+-]{1,32}$


def test_offline_body() -> None:
    assert offline_body("provider") == {"role": "provider", "status": "offline"}
