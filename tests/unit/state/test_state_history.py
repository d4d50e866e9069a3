"""Applies, the action journal, caches and status values."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import state.clock
import state.journal
from state import ApplyRecord, JournalEntry, Store

T0 = datetime(2026, 11, 27, 4, 0, 0, tzinfo=UTC)


def _at(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    monkeypatch.setattr(state.clock, "now", lambda: moment)


def _action_row(state_dir: Path, action_id: int) -> tuple[str | None, str | None, str | None]:
    conn = sqlite3.connect(state_dir / "state.db")
    try:
        row = conn.execute(
            "SELECT outcome, error, finished_at FROM actions WHERE id = ?", (action_id,)
        ).fetchone()
    finally:
        conn.close()
    return row[0], row[1], row[2]


def _run_row(state_dir: Path, run_id: str) -> tuple[str | None, int | None]:
    conn = sqlite3.connect(state_dir / "state.db")
    try:
        row = conn.execute(
            "SELECT finished_at, converged FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
    finally:
        conn.close()
    return row[0], row[1]


# -- applies ---------------------------------------------------------------------------------


def test_last_apply_none_at_first(store: Store) -> None:
    assert store.last_apply() is None


def test_record_apply_and_last_apply(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, T0)
    store.record_apply(
        config_sha256="aa", git_commit=None, converged=False, actions=3, failed=1, summary={}
    )
    _at(monkeypatch, T0 + timedelta(minutes=5))
    summary = {"pulled": ["qwen2.5:14b"], "bytes": 8988124069, "nested": {"ok": True}, "n": None}
    store.record_apply(
        config_sha256="bb",
        git_commit="abc123",
        converged=True,
        actions=2,
        failed=0,
        summary=summary,
    )
    assert store.last_apply() == ApplyRecord(
        at="2026-11-27T04:05:00Z",
        config_sha256="bb",
        git_commit="abc123",
        converged=True,
        actions=2,
        failed=0,
        summary=summary,
    )


def test_apply_history_is_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state.journal, "KEEP_APPLIES", 3)
    for i in range(10):
        store.record_apply(
            config_sha256=str(i), git_commit=None, converged=True, actions=0, failed=0, summary={}
        )
    conn = sqlite3.connect(store.path)
    try:
        kept = [r[0] for r in conn.execute("SELECT config_sha256 FROM applies ORDER BY id")]
    finally:
        conn.close()
    assert kept == ["7", "8", "9"]
    last = store.last_apply()
    assert last is not None
    assert last.config_sha256 == "9"


def test_summary_must_be_json(store: Store) -> None:
    with pytest.raises(TypeError):
        store.record_apply(
            config_sha256="x",
            git_commit=None,
            converged=True,
            actions=0,
            failed=0,
            summary={"bad": object()},
        )
    with pytest.raises(ValueError):
        store.record_apply(
            config_sha256="x",
            git_commit=None,
            converged=True,
            actions=0,
            failed=0,
            summary={"bad": float("nan")},
        )
    assert store.last_apply() is None


# -- action journal ----------------------------------------------------------------------------


def test_begin_run_returns_uuid4_hex(store: Store) -> None:
    first = store.begin_run(config_sha256="c", plan={"actions": []})
    second = store.begin_run(config_sha256="c", plan={})
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first[12] == "4"
    assert first != second


def test_journal_round_trip(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, T0)
    run = store.begin_run(config_sha256="c", plan={"actions": [{"op": "pull"}]})
    pull = store.begin_action(
        run_id=run, op="pull", backend="ollama", canonical="qwen2.5:14b", model="qwen2.5:14b"
    )
    remove = store.begin_action(
        run_id=run, op="remove", backend="ollama", canonical="old:1", model="old:1"
    )
    assert store.unfinished_actions() == [
        JournalEntry(
            pull, run, "pull", "ollama", "qwen2.5:14b", "qwen2.5:14b", "2026-11-27T04:00:00Z"
        ),
        JournalEntry(remove, run, "remove", "ollama", "old:1", "old:1", "2026-11-27T04:00:00Z"),
    ]
    store.finish_action(pull, outcome="ok")
    store.finish_action(remove, outcome="failed", error="backend said no")
    assert store.unfinished_actions() == []
    assert _action_row(store.state_dir, pull) == ("ok", None, "2026-11-27T04:00:00Z")
    assert _action_row(store.state_dir, remove)[:2] == ("failed", "backend said no")
    store.finish_run(run, converged=False)
    assert _run_row(store.state_dir, run) == ("2026-11-27T04:00:00Z", 0)


def test_skipped_outcome(store: Store) -> None:
    run = store.begin_run(config_sha256="c", plan={})
    action = store.begin_action(run_id=run, op="pin", backend="ollama", canonical="a", model="a")
    store.finish_action(action, outcome="skipped")
    assert _action_row(store.state_dir, action)[0] == "skipped"


def test_finish_action_rejects_bad_outcomes_and_ids(store: Store) -> None:
    run = store.begin_run(config_sha256="c", plan={})
    action = store.begin_action(run_id=run, op="pull", backend="ollama", canonical="a", model="a")
    with pytest.raises(ValueError, match="outcome"):
        store.finish_action(action, outcome="interrupted")
    with pytest.raises(ValueError, match="unknown"):
        store.finish_action(action + 100, outcome="ok")
    store.finish_action(action, outcome="ok")
    with pytest.raises(ValueError, match="already finished"):
        store.finish_action(action, outcome="failed")


def test_begin_action_needs_an_open_run(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown run"):
        store.begin_action(run_id="nope", op="pull", backend="ollama", canonical="a", model="a")
    run = store.begin_run(config_sha256="c", plan={})
    store.finish_run(run, converged=True)
    with pytest.raises(ValueError, match="already finished"):
        store.begin_action(run_id=run, op="pull", backend="ollama", canonical="a", model="a")
    with pytest.raises(ValueError, match="already finished"):
        store.finish_run(run, converged=True)
    with pytest.raises(ValueError, match="unknown"):
        store.finish_run("nope", converged=True)


def test_unfinished_actions_survive_reopen_across_runs(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        first = store.begin_run(config_sha256="c1", plan={})
        a1 = store.begin_action(run_id=first, op="pull", backend="ollama", canonical="a", model="a")
        done = store.begin_action(
            run_id=first, op="pin", backend="ollama", canonical="a", model="a"
        )
        store.finish_action(done, outcome="ok")
        # The process "dies" here: the run is never finished.
    with Store.open(state_dir) as store:
        second = store.begin_run(config_sha256="c2", plan={})
        a2 = store.begin_action(run_id=second, op="remove", backend="hf", canonical="b", model="b")
    with Store.open(state_dir) as store:
        entries = store.unfinished_actions()
        assert [(e.id, e.run_id, e.op) for e in entries] == [
            (a1, first, "pull"),
            (a2, second, "remove"),
        ]


def test_close_unfinished(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.close_unfinished(note="nothing to do") == 0
    crashed = store.begin_run(config_sha256="c", plan={})
    a1 = store.begin_action(run_id=crashed, op="pull", backend="ollama", canonical="a", model="a")
    a2 = store.begin_action(run_id=crashed, op="pull", backend="ollama", canonical="b", model="b")
    clean = store.begin_run(config_sha256="c", plan={})
    ok = store.begin_action(run_id=clean, op="pull", backend="ollama", canonical="c", model="c")
    store.finish_action(ok, outcome="ok")
    _at(monkeypatch, T0)

    assert store.close_unfinished(note="interrupted; rolled forward by run xyz") == 2

    assert store.unfinished_actions() == []
    for action in (a1, a2):
        assert _action_row(store.state_dir, action) == (
            "interrupted",
            "interrupted; rolled forward by run xyz",
            "2026-11-27T04:00:00Z",
        )
    assert _action_row(store.state_dir, ok)[0] == "ok"
    # The crashed run is closed as not converged; a run without stranded actions stays open.
    assert _run_row(store.state_dir, crashed) == ("2026-11-27T04:00:00Z", 0)
    assert _run_row(store.state_dir, clean) == (None, None)
    store.finish_run(clean, converged=True)


def test_finished_runs_age_out_but_unfinished_ones_stay(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state.journal, "KEEP_RUNS", 2)
    stuck = store.begin_run(config_sha256="c", plan={})
    stuck_action = store.begin_action(
        run_id=stuck, op="pull", backend="ollama", canonical="a", model="a"
    )
    runs = []
    for _ in range(5):
        run = store.begin_run(config_sha256="c", plan={})
        action = store.begin_action(run_id=run, op="pull", backend="o", canonical="x", model="x")
        store.finish_action(action, outcome="ok")
        store.finish_run(run, converged=True)
        runs.append(run)
    store.begin_run(config_sha256="c", plan={})
    conn = sqlite3.connect(store.path)
    try:
        kept = {r[0] for r in conn.execute("SELECT id FROM runs")}
        orphans = conn.execute(
            "SELECT count(*) FROM actions WHERE run_id NOT IN (SELECT id FROM runs)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert stuck in kept
    assert runs[-1] in kept
    assert runs[0] not in kept
    assert orphans == 0
    assert [e.id for e in store.unfinished_actions()] == [stuck_action]


# -- caches ------------------------------------------------------------------------------------


def test_cache_miss(store: Store) -> None:
    assert store.cache_get("show", "sha256:abc") is None


def test_cache_round_trip_and_overwrite(store: Store) -> None:
    value = {"details": {"parameter_size": "14.8B"}, "layers": [1, 2, 3]}
    store.cache_put("show", "sha256:abc", value)
    assert store.cache_get("show", "sha256:abc") == value
    store.cache_put("show", "sha256:abc", [1, "two"])
    assert store.cache_get("show", "sha256:abc") == [1, "two"]
    # Kinds are separate namespaces.
    assert store.cache_get("registry", "sha256:abc") is None
    store.cache_put("registry", "sha256:abc", 42)
    assert store.cache_get("registry", "sha256:abc") == 42
    assert store.cache_get("show", "sha256:abc") == [1, "two"]


def test_cache_max_age(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, T0)
    store.cache_put("registry", "qwen2.5:14b", {"digest": "d"})
    _at(monkeypatch, T0 + timedelta(seconds=59.5))
    assert store.cache_get("registry", "qwen2.5:14b", max_age=60) == {"digest": "d"}
    _at(monkeypatch, T0 + timedelta(seconds=60.5))
    assert store.cache_get("registry", "qwen2.5:14b", max_age=60) is None
    # Without max_age an entry never expires.
    assert store.cache_get("registry", "qwen2.5:14b") == {"digest": "d"}


def test_cache_entry_from_the_future_is_stale(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _at(monkeypatch, T0)
    store.cache_put("registry", "k", 1)
    _at(monkeypatch, T0 - timedelta(hours=1))
    assert store.cache_get("registry", "k", max_age=3600 * 24) is None


def test_cache_survives_reopen(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.cache_put("show", "k", {"v": 1})
    with Store.open(state_dir) as store:
        assert store.cache_get("show", "k", max_age=60) == {"v": 1}


# -- status ------------------------------------------------------------------------------------


def test_status_values(store: Store) -> None:
    assert store.get_status("heartbeat") is None
    store.put_status("heartbeat", {"at": "2026-11-27T04:00:00Z", "ok": True})
    store.put_status("errors", ["backend ollama unreachable"])
    store.put_status("heartbeat", {"at": "2026-11-27T04:01:00Z", "ok": False})
    assert store.get_status("heartbeat") == {"at": "2026-11-27T04:01:00Z", "ok": False}
    assert store.get_status("errors") == ["backend ollama unreachable"]
    store.put_status("count", 3)
    assert store.get_status("count") == 3
