"""The words every value type uses: backend kinds, plan operations, model keys, "forever"."""

from __future__ import annotations

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
