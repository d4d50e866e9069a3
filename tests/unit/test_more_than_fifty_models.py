"""A file may list more models than the 50 a heartbeat carries: it is valid,
with or without a control plane; the plan warns and advertises the first 50 in file order
(``plans/31_more_than_fifty_models.yaml``), and the heartbeat never carries more than 50."""

from __future__ import annotations

import pytest

from reconciler.config import desired
from reconciler.controlplane.specs import specs_for
from reconciler.limits import MAX_ADVERTISED
from reconciler.model import GpuState

NAMES = [f"m{i}:latest" for i in range(1, 53)]


@pytest.mark.parametrize("control_plane", ["", "control_plane: {url: 'https://cp.example'}\n"])
def test_a_file_with_more_than_fifty_models_is_valid(control_plane: str) -> None:
    text = f"served_models: [{', '.join(NAMES)}]\n{control_plane}"
    assert [m.name for m in desired.parse(text, path="f").models] == NAMES


def test_the_plan_and_the_heartbeat_share_the_limit() -> None:
    assert MAX_ADVERTISED == 50
    cpu = GpuState("cpu", None, None)
    assert specs_for(NAMES[:50], cpu, extension={})["served_models"] == NAMES[:50]
