"""The reconciler's value types: what is desired, what was observed, and the plan between them.

All are frozen dataclasses so the planner stays a pure function of its inputs. Sizes are bytes
(``int``); durations are seconds (``float``); ``FOREVER`` (-1.0) is Ollama's "pinned". One module
per side (``kinds``, ``desired``, ``observed``, ``plan``); everything is importable from here.
"""

from __future__ import annotations

from reconciler.model.desired import (
    BudgetSettings,
    ConfigSource,
    ControlPlaneSettings,
    Desired,
    JobSettings,
    ModelSpec,
    Policy,
)
from reconciler.model.kinds import (
    DEFAULT_KEY_FILE,
    FOREVER,
    BackendKind,
    ModelKey,
    Op,
)
from reconciler.model.observed import (
    BackendState,
    Canary,
    DiskState,
    GpuInfo,
    GpuProcess,
    GpuState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    Observed,
    Owned,
    OwnedModel,
    Upstream,
)
from reconciler.model.plan import (
    Action,
    Budget,
    Check,
    DiskBudget,
    Estimate,
    EstimateParts,
    Noop,
    Plan,
)

__all__ = [
    "DEFAULT_KEY_FILE",
    "FOREVER",
    "Action",
    "BackendKind",
    "BackendState",
    "Budget",
    "BudgetSettings",
    "Canary",
    "Check",
    "ConfigSource",
    "ControlPlaneSettings",
    "Desired",
    "DiskBudget",
    "DiskState",
    "Estimate",
    "EstimateParts",
    "GpuInfo",
    "GpuProcess",
    "GpuState",
    "InstalledModel",
    "JobSettings",
    "LoadedModel",
    "ModelFacts",
    "ModelKey",
    "ModelSpec",
    "Noop",
    "Observed",
    "Op",
    "Owned",
    "OwnedModel",
    "Plan",
    "Policy",
    "Upstream",
]
