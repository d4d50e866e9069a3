"""The jobs taken from the control plane: each entered once, its answer kept until reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from state import JobRecord, Store
from state.jobs import KEEP_JOBS


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state")


def test_a_job_is_taken_once(store: Store) -> None:
    assert store.job_begin("j1", model="qwen2.5:7b") is True
    assert store.job_begin("j1", model="qwen2.5:7b") is False  # polled again: not rerun
    seen = store.job_seen("j1")
    assert isinstance(seen, JobRecord)
    assert (seen.state, seen.model, seen.answer, seen.reported_at) == (
        "running",
        "qwen2.5:7b",
        None,
        None,
    )
    assert store.job_seen("other") is None


def test_a_polls_jobs_are_entered_together_and_each_once(store: Store) -> None:
    store.job_begin("old", model="m")
    entered = store.jobs_begin([("old", "m"), ("a", "m"), ("b", None), ("a", "m")])
    assert entered == {"a", "b"}  # "old" was taken before; "a" twice in one poll is one job
    assert store.jobs_begin([("a", "m"), ("b", None)]) == set()
    assert [r.job_id for r in store.jobs_unreported()] == ["old", "a", "b"]


def test_an_answer_is_owed_until_reported(store: Store) -> None:
    store.job_begin("j1", model=None)
    store.job_begin("j2", model="m")
    store.job_finish("j2", {"status": "failed", "error": "x"})
    owed = store.jobs_unreported()
    assert [(j.job_id, j.state, j.answer) for j in owed] == [
        ("j1", "running", None),
        ("j2", "finished", {"status": "failed", "error": "x"}),
    ]
    store.job_reported("j2")
    assert [j.job_id for j in store.jobs_unreported()] == ["j1"]
    with pytest.raises(ValueError, match="already answered"):
        store.job_finish("j2", {"status": "completed"})  # one answer per job


def test_a_job_running_at_a_crash_is_found_after_reopening(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        store.job_begin("j1", model="m")
    with Store.open(tmp_path / "s") as store:
        [owed] = store.jobs_unreported()
        assert (owed.job_id, owed.state) == ("j1", "running")
        assert store.job_begin("j1", model="m") is False


def test_reported_jobs_are_forgotten_beyond_the_newest_thousand(store: Store) -> None:
    for n in range(KEEP_JOBS + 5):
        store.job_begin(f"j{n}", model="m")
        store.job_finish(f"j{n}", {"status": "completed"})
        store.job_reported(f"j{n}")
    store.job_begin("owed", model="m")  # the pruning runs as jobs come in
    assert store.job_seen("j0") is None
    assert store.job_seen(f"j{KEEP_JOBS + 4}") is not None
    assert [j.job_id for j in store.jobs_unreported()] == ["owed"]


def test_a_version_1_database_gains_the_jobs_table_and_keeps_what_it_knew(tmp_path: Path) -> None:
    import sqlite3

    from state import schema

    folder = tmp_path / "s"
    folder.mkdir(mode=0o700)
    conn = sqlite3.connect(folder / "state.db")
    for statement in schema.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO owned VALUES ('ollama', 'a:latest', 'a', 'd', '2026-01-01T00:00:00+00:00')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Store.open(folder) as store:
        assert store.rebuilt is None
        assert [r.canonical for r in store.owned()] == ["a:latest"]
        assert store.job_begin("j1", model=None) is True
    conn = sqlite3.connect(folder / "state.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION == 2
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "jobs" in tables and "outbox" not in tables
    conn.close()
