"""The plan between the desired and the observed state: actions, no-ops, the budget."""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.model.desired import ConfigSource
from reconciler.model.kinds import BackendKind, Op
from reconciler.model.observed import GpuProcess


@dataclass(frozen=True)
class Action:
    """One change the executor will make."""

    op: Op
    model: str  # as the file writes it, or as installed for removals
    backend: BackendKind
    canonical: str
    reason: str
    download_bytes: int | None = None
    vram_bytes: int | None = None
    keep_alive: float | None = None  # for pin/unpin: what to send
    digest: str | None = None  # for pull/update: what upstream pointed at when planned
    embedding: bool = False  # load through /api/embed, not generate
    context: int | None = None
    source: str | None = None  # for pull/update of a file-backed model: where it comes from
    advertise_as: str | None = None  # for pins of engine-served models: the name to serve as


@dataclass(frozen=True)
class Check:
    """A model's canary: the one-token generation (one embedding for an embedding model) it
    must answer before it is advertised, once per digest or revision of its weights."""

    backend: BackendKind
    canonical: str
    model: str  # as the file writes it
    advertise_as: str
    digest: str | None  # the weights it tests: installed, or what the plan's pull fetches
    keep_alive: float | None = None
    context: int | None = None
    embedding: bool = False


@dataclass(frozen=True)
class Noop:
    """A desired or installed model that needs nothing, and why (``plan -v``)."""

    model: str
    backend: BackendKind
    reason: str


@dataclass(frozen=True)
class EstimateParts:
    """What the metadata estimate is made of, so a person can see why it differs from the
    bytes-per-parameter rule of thumb (``plan -v``) and a refusal can say it is mostly KV."""

    weights: int
    kv: int  # every sequence's KV cache at ``context`` tokens
    runtime: int  # compute buffers, CUDA context, repacked copies: the rest
    context: int  # tokens per sequence
    parallel: int  # sequences, each with its KV cache
    context_from_backend: bool  # the backend's own flags set the context, not ``context:``
    rule_of_thumb: int | None  # parameters × bytes per parameter + overhead, when known
    quantization: str | None


@dataclass(frozen=True)
class Estimate:
    """A model's VRAM estimate and where it came from."""

    model: str
    bytes: int | None
    source: str  # "config" | "measured" | "metadata" | "rough" | "claim" | "unknown"
    pinned: bool
    estimated_bytes: int | None = None  # what the metadata (or rough rule) alone says
    measured_bytes: int | None = None  # what the model held when last seen loaded
    # An explanation, not part of the figure: equal estimates are equal whatever it says.
    parts: EstimateParts | None = field(default=None, compare=False)
    # Host memory the running engine's process tree holds (RSS), as observed; beside the figure,
    # never part of it (it moves from one reading to the next).
    rss_bytes: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DiskBudget:
    """One backend's downloads against the free space where it stores models."""

    backend: BackendKind
    path: str
    free_bytes: int | None
    download_bytes: int


@dataclass(frozen=True)
class Budget:
    """The VRAM and disk arithmetic behind a plan.

    ``vram_total_bytes`` is the budget's base (NVML total, ``budget.vram`` or a share of RAM);
    ``vram_available_bytes`` is what the fit used: the base less memory other processes hold.
    ``disk_free_bytes`` is the default backend's disk, ``download_bytes`` all downloads;
    ``disks`` has each backend's own figures.
    """

    vram_total_bytes: int | None
    vram_source: str
    reserve_bytes: int
    vram_pinned_bytes: int
    largest_swap_in_bytes: int
    fits: bool
    disk_free_bytes: int | None
    disk_reserve_bytes: int
    download_bytes: int
    estimates: tuple[Estimate, ...] = ()
    vram_available_bytes: int | None = None
    foreign_bytes: int = 0
    unattributed_bytes: int = 0  # unattributed memory the backends' loaded models don't explain
    foreign_processes: tuple[GpuProcess, ...] = ()
    disks: tuple[DiskBudget, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The planner's answer: actions in execution order, and everything needed to explain it."""

    source: ConfigSource
    fingerprint: str
    actions: tuple[Action, ...]
    noops: tuple[Noop, ...]
    budget: Budget
    advertised: tuple[str, ...]  # served_models once the plan is applied
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()  # canaries the apply runs before advertising these models
    unserved: tuple[str, ...] = ()  # "name: why", models installed but not advertised
