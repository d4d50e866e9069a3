"""A backend that exists only in the tests: proof that a backend is one family of drivers plus
one registry entry, and that no line of product code needs to know its name.

Kind ``toy``, settings ``backends: {toy: {dir: FOLDER}}``. Its "server" is the folder: a model
``NAME`` is the file ``FOLDER/NAME.toy`` (pulled from nowhere: its bytes are made from its
name), pinned while ``FOLDER/NAME.pinned`` exists. The ``infernet`` process loads it through
the plugin hook: ``INFERNET_BACKENDS=tests.toy_backend:FAMILY``.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.backends.base import ChatRequest, Ending, Served
from reconciler.backends.driver import Driver, Family
from reconciler.errors import ChatFailed, InvalidModelName, ModelNotFound, PullFailed
from reconciler.model import (
    BackendKind,
    BackendState,
    InstalledModel,
    LoadedModel,
    ModelFacts,
    ModelSpec,
    Upstream,
)

KIND = BackendKind("toy")
REPLY = ("toy", " model", " says", " hi.")
"""Every toy chat's answer, one delta per token."""
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")


@dataclass(frozen=True)
class ToySettings:
    """``backends.toy``."""

    dir: str = "/nonexistent/toy"


def canonical(name: str, _revision: str | None = None) -> str:
    if not _NAME.match(name):
        raise InvalidModelName(f"'{name}' is not a toy model name (lower-case letters, digits)")
    return name


def content(name: str) -> bytes:
    """What a pull of ``name`` writes: made from its name, 64 KiB."""
    return (f"toy model {name}\n".encode() * 4096)[: 64 << 10]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ToyBackend:
    """The folder as a backend."""

    def __init__(self, kind: BackendKind, settings: ToySettings) -> None:
        self.kind = kind
        self.folder = Path(settings.dir)
        self.url = f"file://{self.folder}"

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.toy"

    def _facts(self, name: str) -> ModelFacts:
        data = self._file(name).read_bytes()
        return ModelFacts(digest=_digest(data), size=len(data), weights_bytes=len(data))

    def inventory(self) -> BackendState:
        if not self.folder.is_dir():
            return BackendState(self.kind, self.url, False, error=f"no toy folder {self.folder}")
        installed, loaded = [], []
        for path in sorted(self.folder.glob("*.toy")):
            name = path.name.removesuffix(".toy")
            facts = self._facts(name)
            installed.append(InstalledModel(self.kind, name, canonical(name), facts))
            if (self.folder / f"{name}.pinned").exists():
                loaded.append(
                    LoadedModel(self.kind, name, name, facts.digest, facts.size or 0, 0, None, True)
                )
        return BackendState(
            self.kind, self.url, True, installed=tuple(installed), loaded=tuple(loaded)
        )

    def details(self, name: str, digest: str | None) -> ModelFacts:
        if not self._file(name).exists():
            raise ModelNotFound(f"toy model {name} is not installed")
        return self._facts(name)

    def upstream(self, spec: ModelSpec) -> Upstream:
        data = content(spec.name)
        facts = ModelFacts(digest=_digest(data), size=len(data), weights_bytes=len(data))
        return Upstream(self.kind, spec.canonical, facts, len(data), len(data))

    def pull(
        self,
        name: str,
        progress: Callable[[str, int | None, int | None], None],
        cancel: threading.Event,
        *,
        source: str | None = None,
        digest: str | None = None,
    ) -> None:
        data = content(name)
        temp = self.folder / f".{name}.part"
        temp.write_bytes(data)
        os.replace(temp, self._file(name))
        progress("success", len(data), len(data))

    def verify(self, name: str, digest: str | None) -> ModelFacts:
        facts = self.details(name, digest)
        if digest and facts.digest != digest:
            raise PullFailed(f"toy model {name} has {facts.digest}, expected {digest}")
        return facts

    def load(
        self,
        name: str,
        *,
        keep_alive: float,
        embedding: bool,
        context: int | None,
        advertise_as: str | None = None,
    ) -> None:
        marker = self.folder / f"{name}.pinned"
        if keep_alive < 0:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def chat(
        self, model: Served, request: ChatRequest, ending: Ending, cancel: threading.Event
    ) -> Iterator[str]:
        """``REPLY``, cut at ``max_tokens``; an embedding or missing model fails."""
        if model.embedding:
            raise ChatFailed(f"{model.name} is an embedding model; it does not chat")
        if not self._file(model.name).exists():
            raise ChatFailed(f"toy model {model.name} is not installed", model=model.name)
        cap = request.max_tokens
        tokens = REPLY[:cap] if cap is not None and cap > 0 else REPLY
        for token in tokens:
            if cancel.is_set():
                ending.reason = "cancel"
                return
            yield token
        ending.reason = "length" if len(tokens) < len(REPLY) else "stop"
        ending.tokens = len(tokens)

    def canary(self, model: Served) -> None:
        """The model's file is there (and, for a chat model, one token comes out)."""
        if not self._file(model.name).exists():
            raise ChatFailed(f"toy model {model.name} is not installed", model=model.name)
        if not model.embedding:
            one = ChatRequest(messages=({"role": "user", "content": "hi"},), max_tokens=1)
            for _ in self.chat(model, one, Ending(), threading.Event()):
                pass

    def remove(self, name: str, *, embedding: bool) -> None:
        (self.folder / f"{name}.pinned").unlink(missing_ok=True)
        self._file(name).unlink(missing_ok=True)

    def close(self) -> None:
        pass


def open_backends(
    kinds: Sequence[BackendKind], settings: ToySettings, _context: Any
) -> dict[BackendKind, Any]:
    return {kind: ToyBackend(kind, settings) for kind in kinds}


def _parse(fields: Mapping[str, Any], _env: Mapping[str, str]) -> ToySettings:
    return ToySettings(**fields)


FAMILY = Family(
    name="toy",
    drivers=(Driver(kind=KIND, canonical=canonical, same_model="same toy"),),
    schema={
        "description": "A folder of toy models (tests only).",
        "type": "object",
        "additionalProperties": False,
        "properties": {"dir": {"type": "string", "minLength": 1}},
    },
    parse=_parse,
    models_dir=lambda settings: settings.dir,
    adapters="tests.toy_backend:open_backends",
)
