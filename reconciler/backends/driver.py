"""What a backend is to the rest of infernet: a ``Driver`` per kind, a ``Family`` per settings
section (``backends.<family>`` in the file), shared by the kinds of one family.

A description is pure data and pure functions, so the pure layers (``config``, ``planning``,
``names``) read it freely. The I/O side, the adapters that talk to a server, is named by a
string (``Family.adapters``: ``"package.module:function"``) that only the converge layer
resolves: reading the registry never loads an HTTP client, and ``infernet plan`` starts fast.

Capabilities replace "is it this backend?" branches: shared code asks what a kind can do,
and the one thing a family does its own way is a hook its driver carries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reconciler.model import BackendKind, BackendState, Desired, ModelFacts, ModelSpec

if TYPE_CHECKING:
    from reconciler.backends.base import AdapterContext, Backend

Settings = Any
"""A family's own typed settings (a frozen dataclass the family defines and reads)."""

OpenAdapters = Callable[
    [Sequence[BackendKind], Settings, "AdapterContext"], Mapping[BackendKind, "Backend"]
]
"""``open_backends(kinds, settings, context)``: the adapters of a family's kinds."""


@dataclass(frozen=True)
class Driver:
    """One backend kind: its name rules, its capabilities and its hooks.

    Capabilities:

    * ``engine``: one engine process per model serves it: "pin" starts the engine (and a
      ``keep_alive`` has no effect), it is served under its ``advertise_as`` name, and it
      claims ``claim_share`` of the VRAM whatever the model needs;
    * ``revisions``: models are repositories at a revision: the canonical form is
      ``name@revision``, the backend acts on that form, and plans show the revision apart;
    * ``source_refusal``: None when a model may name a ``source:`` (and ``sha256:``) to
      download from; else why it may not (``{kind}`` is replaced by the kind).
    """

    kind: BackendKind
    canonical: Callable[[str, str | None], str]
    """``(name, revision) -> canonical form``; raises ``InvalidModelName``."""
    same_model: str = "same repository and revision"
    """Why two entries of this kind are duplicates (validation's wording)."""
    engine: bool = False
    revisions: bool = False
    source_refusal: str | None = None
    revision_hint: str = ""
    """Added to the refusal of a ``revision:`` on this kind (say where its revision goes)."""
    claims: Callable[[str], bool] | None = None
    """Whether a name, by its look, is this kind's (``model install`` without ``--backend``)."""
    processes: tuple[str, ...] = ()
    """Prefixes of the executable or module names of this kind's processes (GPU attribution)."""
    processes_exact: tuple[str, ...] = ()
    """Names that mean this kind only when they are the whole executable name."""
    claim_share: Callable[[Settings], float] | None = None
    """For engines: the share of the total VRAM an engine claims, from the family's settings."""
    run_context: Callable[[ModelSpec, ModelFacts], int | None] | None = None
    """Tokens per sequence the backend really runs a model at, when it decides that itself
    (overrides the file's ``context``); None when it does not say."""
    default_context: Callable[[ModelFacts], int | None] | None = None
    """The context without a ``context:`` in the file or a run context, when the backend has
    its own default (else Ollama's automatic one)."""
    estimate_parts: Callable[[ModelFacts, int, int, bool], Mapping[str, int] | None] | None = None
    """``(facts, context, parallel, accelerator) -> terms``: this kind's own metadata estimate
    (summed), instead of weights + KV cache + a graph allowance."""
    plan_warnings: Callable[[ModelSpec, ModelFacts, Settings], Sequence[str]] | None = None
    """Warnings the planner adds for a desired model of this kind (what the file asks and the
    backend can't do); repeated texts are said once."""
    pull_source: Callable[[ModelSpec], str | None] | None = None
    """Where a pull of this kind comes from, shown in plans (default: the file's ``source``)."""
    remote_install_problem: Callable[[str, Desired], str | None] | None = None
    """Why a remote command may not install this name on this kind, or None."""
    title: str = ""
    """The backend's name as people write it (``llama.cpp``); the kind when empty."""
    gguf_quantization: bool = True
    """Whether ``quantization:`` names a GGUF quantization (validated, and checked against
    the artifact). Engines' repositories carry no quantization infernet reads: their
    ``quantization:`` is the operator's note (AWQ, GPTQ, FP8…), not checked."""

    @property
    def value(self) -> str:
        return self.kind.value

    @property
    def shown(self) -> str:
        """``title``, or the kind's name when the driver gives none."""
        return self.title or self.kind.value


@dataclass(frozen=True)
class Family:
    """The kinds that share one settings section of the file, and their adapters."""

    name: str
    drivers: tuple[Driver, ...]
    schema: Mapping[str, Any]
    """The JSON Schema of ``backends.<name>``."""
    parse: Callable[[Mapping[str, Any], Mapping[str, str]], Settings]
    """``(the section as written, the environment) -> settings`` (the schema checked it)."""
    models_dir: Callable[[Settings], str]
    """Where the family keeps weights (the disk check)."""
    adapters: str
    """``"package.module:function"``, an ``OpenAdapters``: resolved by the converge layer only."""
    defs: Mapping[str, Any] = field(default_factory=dict)
    """``$defs`` the schema fragment refers to."""
    merge_states: (
        Callable[[dict[BackendKind, BackendState], Desired, Mapping[str, BackendKind]], None] | None
    ) = None
    """After every kind's inventory: share what the family's kinds see together (one cache
    for several kinds, say); ``owners`` maps a canonical name to the kind that installed it."""

    def adapter_path(self) -> tuple[str, str]:
        module, _, function = self.adapters.partition(":")
        return module, function


def plain_name(pattern: re.Pattern[str], name: str) -> bool:
    """Whether ``name`` matches its kind's ``pattern`` and never climbs a folder (``..``): a
    model name ends up in a path (a models folder, the hub cache)."""
    return bool(pattern.match(name)) and ".." not in name
