"""Ownership, pins and measured VRAM."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import state.clock
from state import OwnedRecord, Store

T0 = datetime(2026, 11, 27, 4, 0, 0, tzinfo=UTC)


def _at(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    monkeypatch.setattr(state.clock, "now", lambda: moment)


def test_owned_starts_empty(store: Store) -> None:
    assert store.owned() == []


def test_record_installed_and_owned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, T0)
    store.record_installed(backend="ollama", canonical="b:1", name="B:1", digest="sha256:bb")
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    store.record_installed(backend="llamacpp", canonical="z", name="z.gguf", digest="d")
    assert store.owned() == [
        OwnedRecord("llamacpp", "z", "z.gguf", "d", "2026-11-27T04:00:00Z", False, None),
        OwnedRecord("ollama", "a:1", "a:1", None, "2026-11-27T04:00:00Z", False, None),
        OwnedRecord("ollama", "b:1", "B:1", "sha256:bb", "2026-11-27T04:00:00Z", False, None),
    ]


def test_owned_record_is_frozen(store: Store) -> None:
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    record = store.owned()[0]
    with pytest.raises(AttributeError):
        record.name = "other"  # type: ignore[misc]


def test_record_installed_upserts(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, T0)
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest="d1")
    _at(monkeypatch, T0 + timedelta(hours=1))
    # Same weights recorded again (an idempotent apply): installed_at does not move.
    store.record_installed(backend="ollama", canonical="a:1", name="A:1", digest="d1")
    [record] = store.owned()
    assert (record.name, record.digest, record.installed_at) == (
        "A:1",
        "d1",
        "2026-11-27T04:00:00Z",
    )
    _at(monkeypatch, T0 + timedelta(hours=2))
    # New weights under the same tag (an update): it was installed again, now.
    store.record_installed(backend="ollama", canonical="a:1", name="A:1", digest="d2")
    [record] = store.owned()
    assert (record.digest, record.installed_at) == ("d2", "2026-11-27T06:00:00Z")


def test_record_removed(store: Store) -> None:
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    store.record_installed(backend="ollama", canonical="b:1", name="b:1", digest=None)
    store.set_pinned(backend="ollama", canonical="a:1", pinned=True)
    store.record_removed(backend="ollama", canonical="a:1")
    assert [r.canonical for r in store.owned()] == ["b:1"]
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    assert {r.canonical: r.pinned_by_us for r in store.owned()} == {"a:1": False, "b:1": False}
    store.record_removed(backend="ollama", canonical="a:1")
    # Removing what is not recorded is a no-op.
    store.record_removed(backend="ollama", canonical="never")
    store.record_removed(backend="hf", canonical="b:1")
    assert [r.canonical for r in store.owned()] == ["b:1"]


def test_set_pinned(store: Store) -> None:
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    store.set_pinned(backend="ollama", canonical="a:1", pinned=True)
    store.set_pinned(backend="ollama", canonical="a:1", pinned=True)
    assert store.owned()[0].pinned_by_us is True
    store.set_pinned(backend="ollama", canonical="a:1", pinned=False)
    store.set_pinned(backend="ollama", canonical="a:1", pinned=False)
    assert store.owned()[0].pinned_by_us is False


def test_pinning_an_unowned_model_does_not_make_it_owned(store: Store) -> None:
    store.set_pinned(backend="ollama", canonical="users:1", pinned=True)
    assert store.owned() == []
    store.record_installed(backend="ollama", canonical="users:1", name="users:1", digest=None)
    assert store.owned()[0].pinned_by_us is True  # the pin was kept all along


def test_measured_vram_is_kept_for_unowned_models(store: Store) -> None:
    assert store.measured_vram() == {}
    store.record_measured_vram(backend="ollama", canonical="users:1", size_vram=5_000)
    store.record_measured_vram(backend="ollama", canonical="ours:1", size_vram=7_000, digest="d1")
    store.record_installed(backend="ollama", canonical="ours:1", name="ours:1", digest="d1")
    assert store.measured_vram() == {("ollama", "users:1"): 5_000, ("ollama", "ours:1"): 7_000}
    assert store.owned()[0].measured_vram == 7_000
    assert store.owned()[0].pinned_by_us is False


def test_measured_vram_is_replaced_by_a_new_measurement(store: Store) -> None:
    store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=1)
    store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=2)
    assert store.measured_vram() == {("ollama", "a:1"): 2}


def test_new_weights_drop_a_stale_measurement(store: Store) -> None:
    store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=9, digest="old")
    store.record_measured_vram(backend="ollama", canonical="b:1", size_vram=8)
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest="new")
    # Without a digest on either side nothing says the weights changed.
    store.record_installed(backend="ollama", canonical="b:1", name="b:1", digest="any")
    assert store.measured_vram() == {("ollama", "b:1"): 8}
    assert {r.canonical: r.measured_vram for r in store.owned()} == {"a:1": None, "b:1": 8}


def test_same_weights_keep_their_measurement(store: Store) -> None:
    store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=9, digest="same")
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest="same")
    assert store.owned()[0].measured_vram == 9


def test_measured_vram_rejects_negative_sizes(store: Store) -> None:
    with pytest.raises(ValueError, match="size_vram"):
        store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=-1)


def test_measurements_survive_removal(store: Store) -> None:
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    store.record_measured_vram(backend="ollama", canonical="a:1", size_vram=3)
    store.record_removed(backend="ollama", canonical="a:1")
    assert store.measured_vram() == {("ollama", "a:1"): 3}
