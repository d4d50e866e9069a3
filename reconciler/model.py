"""The reconciler's value types: what is desired, what was observed, and the plan between them.

All are frozen dataclasses so the planner stays a pure function of its inputs. Sizes are bytes
(``int``); durations are seconds (``float``); ``FOREVER`` (-1.0) is Ollama's "pinned".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, NewType

DEFAULT_KEY_FILE = "~/.config/infernet/node.key"
ModelKey = NewType("ModelKey", str)
"""``<kind>:<canonical name>`` (``names.key``): a model's key across desired, observed and
owned maps and the state store."""
FOREVER = -1.0
"""keep_alive meaning "pinned in VRAM": Ollama treats every negative duration as forever."""


class BackendKind(str):
    """A backend kind, such as ``ollama``: a name the backend registry (``reconciler.backends``)
    has a driver for. The built-in kinds are class constants; a plugin's kind is
    ``BackendKind(name)``. One object per name, so ``is`` compares kinds as ``==`` does."""

    __slots__ = ()
    _interned: ClassVar[dict[str, BackendKind]] = {}

    OLLAMA: ClassVar[BackendKind]
    LLAMACPP: ClassVar[BackendKind]
    VLLM: ClassVar[BackendKind]
    SGLANG: ClassVar[BackendKind]
    MAX: ClassVar[BackendKind]

    def __new__(cls, name: str) -> BackendKind:
        found = cls._interned.get(name)
        if found is None:
            found = super().__new__(cls, name)
            cls._interned[str.__str__(found)] = found
        return found

    @property
    def value(self) -> str:
        """The kind's name, as the file writes it."""
        return str.__str__(self)


BackendKind.OLLAMA = BackendKind("ollama")
BackendKind.LLAMACPP = BackendKind("llamacpp")
BackendKind.VLLM = BackendKind("vllm")
BackendKind.SGLANG = BackendKind("sglang")
BackendKind.MAX = BackendKind("max")


class Op(StrEnum):
    """The closed vocabulary of plan actions (contract §3)."""

    PULL = "pull"  # download a model that is desired and not installed
    REMOVE = "remove"  # unload, withdraw and delete a model that left the file
    PIN = "pin"  # load with keep_alive forever
    UNPIN = "unpin"  # give a model we pinned back its declared keep_alive (or unload it)
    UPDATE = "update"  # re-pull: the tag now points at new weights upstream


# --------------------------------------------------------------------------- desired


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``served_models``, defaults filled in."""

    name: str  # as the file writes it
    backend: BackendKind
    canonical: str  # comparison key (names.canonical)
    advertise_as: str
    quantization: str | None = None
    keep_alive: float | None = None  # seconds; FOREVER = pinned; None = backend default
    context: int | None = None
    vram: int | None = None
    protect: bool = False
    source: str | None = None
    sha256: str | None = None  # expected hex digest of a downloaded source
    revision: str | None = None
    line: int = 0  # 1-based line of the entry in the file, for messages

    @property
    def pinned(self) -> bool:
        """True when the file asks for the model to stay in VRAM forever."""
        return self.keep_alive is not None and self.keep_alive < 0


@dataclass(frozen=True)
class BudgetSettings:
    """``budget``: ``vram`` None means auto (NVML)."""

    vram: int | None = None
    reserve: int = 1 << 30
    disk_reserve: int = 10 << 30


@dataclass(frozen=True)
class ControlPlaneSettings:
    """``control_plane``; absent from the file means local only."""

    url: str
    key_file: str = DEFAULT_KEY_FILE
    role: str = "provider"
    node_id: str | None = None
    heartbeat_interval: float = 30.0
    commands: str = "edit"
    ca_bundle: str | None = None  # extension: PEM CAs for a private control plane
    insecure: bool = False  # true = a plain http:// control plane off loopback is accepted


@dataclass(frozen=True)
class Policy:
    """``policy``: what the planner may do on its own."""

    prune: str = "managed"  # managed | all | none
    max_removals: int = 3
    allow_empty: bool = False
    parallel_pulls: int = 2
    self_heal: bool = True
    updates: str = "notify"  # notify | follow


@dataclass(frozen=True)
class ConfigSource:
    """Where the desired state came from."""

    path: str
    sha256: str
    git_commit: str | None = None


@dataclass(frozen=True)
class Desired:
    """The validated desired state of the node."""

    source: ConfigSource
    models: tuple[ModelSpec, ...]
    default_backend: BackendKind = BackendKind.OLLAMA
    backend_settings: Mapping[str, object] = field(default_factory=dict)
    """Each backend family's own settings (``backends.<family>``), keyed by family name; the
    family's code reads its own typed settings from here."""
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    control_plane: ControlPlaneSettings | None = None
    policy: Policy = field(default_factory=Policy)

    def backends_used(self) -> frozenset[BackendKind]:
        """The backends some desired model is served by."""
        return frozenset(m.backend for m in self.models)


# --------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class ModelFacts:
    """What is known about a model's artifact, from the backend or the registry."""

    digest: str | None = None  # manifest digest (Ollama) / file sha (llama.cpp)
    size: int | None = None  # bytes on disk, all layers
    weights_bytes: int | None = None
    quantization: str | None = None  # upper case, as Ollama's details print it
    parameter_size: str | None = None
    parameter_count: int | None = None
    family: str | None = None
    format: str | None = None
    context_length: int | None = None  # trained context
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    embedding_length: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    capabilities: tuple[str, ...] = ()
    file_type: int | None = None  # GGUF general.file_type (llama_ftype), when the header has it
    run_context: int | None = None  # tokens per sequence the backend runs it at (router -c)
    parallel: int | None = None  # sequences the backend serves at once (KV cache copies)
    vocab_size: int | None = None  # tokens in the vocabulary (GGUF token list)
    vocab_merges: int | None = None  # BPE merge rules (GGUF tokenizer.ggml.merges)
    feed_forward_length: int | None = None  # widest feed-forward layer (GGUF key)
    kv_unified: bool | None = None  # the sequences share one KV pool of run_context cells
    ubatch: int | None = None  # tokens per micro-batch (llama-server -ub): the compute buffer's
    cpu_repack_bytes: int | None = None  # weights llama.cpp's CPU backend copies to repack here


@dataclass(frozen=True)
class InstalledModel:
    """A model present in a backend's store."""

    backend: BackendKind
    name: str  # as the backend reports it
    canonical: str
    facts: ModelFacts
    error: str | None = None  # the artifact is there but unusable (a damaged GGUF, say)


@dataclass(frozen=True)
class LoadedModel:
    """A model resident in memory (``/api/ps``)."""

    backend: BackendKind
    name: str
    canonical: str
    digest: str | None
    size: int
    size_vram: int
    expires_at: str | None  # ISO-8601 as the backend sent it
    pinned: bool  # expires_at so far ahead that it is keep_alive forever
    context_length: int | None = None
    pid: int | None = None  # the process holding it, where the backend lets us find it
    foreign: bool = False  # served by an engine infernet did not start: observed, never touched


@dataclass(frozen=True)
class BackendState:
    """One backend's inventory, or why it couldn't be read."""

    backend: BackendKind
    url: str
    reachable: bool
    error: str | None = None
    version: str | None = None
    installed: tuple[InstalledModel, ...] = ()
    loaded: tuple[LoadedModel, ...] = ()
    serving_error: str | None = None  # the inventory is readable but nothing can be served
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Upstream:
    """What the registry says a desired name points at, before anything is downloaded."""

    backend: BackendKind
    canonical: str
    facts: ModelFacts
    total_bytes: int  # every layer + config
    download_bytes: int  # layers not yet present locally
    error: str | None = None  # e.g. "model 'x' not found in registry ..."


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory that is not an inference backend (NVML's process lists)."""

    pid: int
    name: str
    bytes: int


@dataclass(frozen=True)
class GpuInfo:
    """One GPU (or MIG instance) as NVML reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    foreign_bytes: int = 0  # held by processes that are not inference backends
    unattributed_bytes: int = 0  # used, but by no process we could identify


@dataclass(frozen=True)
class GpuState:
    """The node's accelerator memory; ``source`` says how the total was found.

    The process figures are sums over ``gpus`` and stay 0 without NVML: ``backend_bytes`` is
    held by known inference backends, ``foreign_bytes`` by other processes we can see (the
    biggest of them in ``foreign_processes``), ``unattributed_bytes`` by processes outside our PID
    namespace, with no per-process figure, or not listed at all.
    """

    source: str  # "nvml" | "config" | "cpu" | "none"
    total_bytes: int | None
    free_bytes: int | None
    gpus: tuple[GpuInfo, ...] = ()
    note: str | None = None
    backend_bytes: int = 0
    foreign_bytes: int = 0
    unattributed_bytes: int = 0
    foreign_processes: tuple[GpuProcess, ...] = ()  # biggest first
    backend_processes: Mapping[int, int] = field(default_factory=dict)  # pid → bytes


@dataclass(frozen=True)
class DiskState:
    """Free space where a backend stores models."""

    path: str
    free_bytes: int | None
    error: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything the planner may look at: backends, registry answers, GPUs and disks."""

    backends: Mapping[BackendKind, BackendState]
    upstream: Mapping[ModelKey, Upstream]
    gpu: GpuState
    disks: Mapping[BackendKind, DiskState]
    fingerprint: str = ""


@dataclass(frozen=True)
class OwnedModel:
    """A model this tool installed (from the state store)."""

    backend: BackendKind
    canonical: str
    name: str
    pinned_by_us: bool = False
    measured_vram: int | None = None


@dataclass(frozen=True)
class Owned:
    """The state store's view of what we own; empty when the store was lost."""

    models: Mapping[ModelKey, OwnedModel] = field(default_factory=dict)
    measured_vram: Mapping[ModelKey, int] = field(default_factory=dict)
    protected: frozenset[ModelKey] = frozenset()  # keys last declared with protect: true


# --------------------------------------------------------------------------- plan


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
class Noop:
    """A desired or installed model that needs nothing, and why (``plan -v``)."""

    model: str
    backend: BackendKind
    reason: str


@dataclass(frozen=True)
class Estimate:
    """A model's VRAM estimate and where it came from."""

    model: str
    bytes: int | None
    source: str  # "config" | "measured" | "metadata" | "rough" | "claim" | "unknown"
    pinned: bool
    estimated_bytes: int | None = None  # what the metadata (or rough rule) alone says
    measured_bytes: int | None = None  # what the model held when last seen loaded


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
