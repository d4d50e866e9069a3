"""What was observed: backends' inventories, GPUs, disks, upstream facts, and what we own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.model.kinds import BackendKind, ModelKey


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
    # Host memory resident in the engine's process tree (RSS summed), read when it was observed;
    # only for an engine infernet started and that runs. Shown beside the budget's claim.
    rss_bytes: int | None = None


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
class Canary:
    """How a model's last canary went, for the weights it tested."""

    digest: str | None
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Owned:
    """The state store's view of what we own; empty when the store was lost."""

    models: Mapping[ModelKey, OwnedModel] = field(default_factory=dict)
    measured_vram: Mapping[ModelKey, int] = field(default_factory=dict)
    protected: frozenset[ModelKey] = frozenset()  # keys last declared with protect: true
    canaries: Mapping[ModelKey, Canary] = field(default_factory=dict)  # see ``Check``
