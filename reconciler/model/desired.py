"""What the file asks for: the validated desired state, defaults filled in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.model.kinds import DEFAULT_KEY_FILE, BackendKind


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
class JobSettings:
    """``jobs``: the chat jobs the network routes to this node (with a control plane)."""

    enabled: bool = True  # false: heartbeats and commands only; advertises concurrency_cap 0
    concurrency: int = 4  # jobs run at once; sent as load.concurrency_cap
    poll_interval: float = 2.0  # seconds between job polls
    default_model: str | None = None  # the advertised name jobs naming no model go to
    drain_timeout: float = 60.0  # seconds running jobs get on removal or shutdown
    max_age: float = 600.0  # older assigned jobs are failed unrun: the consumer has given up


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
    jobs: JobSettings = field(default_factory=JobSettings)

    def backends_used(self) -> frozenset[BackendKind]:
        """The backends some desired model is served by."""
        return frozenset(m.backend for m in self.models)
