"""What the store remembers as protected: every apply and reconcile records
it now, plans with nothing to do included, so a reconcile against a backend that is down must
not forget a protection: a backend that doesn't answer says nothing about what it has."""

from __future__ import annotations

from pathlib import Path

from reconciler.config import desired
from reconciler.converge.session import remember_protected
from reconciler.model import (
    BackendKind,
    BackendState,
    GpuState,
    InstalledModel,
    ModelFacts,
    Observed,
)
from reconciler.names import canonical, key
from state import StatusKey, Store

OLLAMA = BackendKind.OLLAMA
PRECIOUS = key(OLLAMA, canonical(OLLAMA, "precious:7b"))


def _observed(*, reachable: bool, installed: tuple[str, ...]) -> Observed:
    models = tuple(
        InstalledModel(OLLAMA, n, canonical(OLLAMA, n), ModelFacts(digest="d")) for n in installed
    )
    state = BackendState(OLLAMA, "http://127.0.0.1:11434", reachable, installed=models)
    return Observed({OLLAMA: state}, {}, GpuState("none", None, None), {})


def test_a_protection_outlives_the_file_until_the_model_is_seen_gone(tmp_path: Path) -> None:
    declared = desired.parse("served_models: [{name: precious:7b, protect: true}]\n", path="f")
    dropped = desired.parse("served_models: [other:1b]\n", path="f")
    with Store.open(tmp_path / "state") as store:
        remember_protected(store, declared, _observed(reachable=True, installed=("precious:7b",)))
        assert store.get_status(StatusKey.PROTECTED) == [PRECIOUS]
        # Ollama is down: it lists nothing, which does not mean the model is gone.
        remember_protected(store, dropped, _observed(reachable=False, installed=()))
        assert store.get_status(StatusKey.PROTECTED) == [PRECIOUS]
        remember_protected(store, dropped, _observed(reachable=True, installed=("precious:7b",)))
        assert store.get_status(StatusKey.PROTECTED) == [PRECIOUS]
        remember_protected(store, dropped, _observed(reachable=True, installed=()))  # gone now
        assert store.get_status(StatusKey.PROTECTED) == []
