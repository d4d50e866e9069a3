"""Opening the store: creation, rebuilding a damaged database, unusable directories."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import state.database
from reconciler.errors import StateError
from state import Store, schema

ISO_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
RUNNING_AS_ROOT = os.geteuid() == 0


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def _fill(store: Store) -> None:
    store.record_installed(
        backend="ollama", canonical="qwen2.5:14b", name="qwen2.5:14b", digest="d1"
    )
    # Enough rows to span many pages, so damage past the first page hits real data.
    for i in range(300):
        store.cache_put("show", f"key-{i}", {"blob": "x" * 200, "i": i})


def test_missing_database_and_directory_are_created(tmp_path: Path) -> None:
    state_dir = tmp_path / "a" / "b" / "state"
    with Store.open(state_dir) as store:
        assert store.rebuilt is None
        assert store.owned() == []
        assert store.path == state_dir / "state.db"
    assert (state_dir / "state.db").is_file()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    conn = _raw(state_dir / "state.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
    finally:
        conn.close()


def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    state_dir.chmod(0o750)
    with Store.open(state_dir):
        pass
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o750


def test_data_survives_reopen(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    with Store.open(state_dir) as store:
        assert store.rebuilt is None
        assert [r.canonical for r in store.owned()] == ["a:1"]


def test_garbage_database_is_moved_aside_and_rebuilt(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        _fill(store)
    db = state_dir / "state.db"
    garbage = os.urandom(8192)
    db.write_bytes(garbage)

    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        assert "\n" not in store.rebuilt
        assert str(db) in store.rebuilt
        # Empty ownership: nothing that was installed before can be pruned by mistake.
        assert store.owned() == []
        store.record_installed(backend="ollama", canonical="b:1", name="b:1", digest=None)
        assert len(store.owned()) == 1

    asides = sorted(state_dir.glob("state.db.corrupt-*"))
    assert [p.name for p in asides if not p.name.endswith(("-wal", "-shm"))] == [asides[0].name]
    assert re.fullmatch(r"state\.db\.corrupt-\d{8}T\d{6}Z", asides[0].name)
    assert asides[0].name in store.rebuilt
    assert asides[0].read_bytes() == garbage

    with Store.open(state_dir) as store:
        assert store.rebuilt is None
        assert [r.canonical for r in store.owned()] == ["b:1"]


def test_damaged_pages_are_detected(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        _fill(store)
    db = state_dir / "state.db"
    data = bytearray(db.read_bytes())
    assert len(data) > 8 * 4096
    # Keep the header (so SQLite still calls it a database) and wreck the b-tree pages.
    data[4096 : 4096 * 6] = os.urandom(4096 * 5)
    db.write_bytes(bytes(data))

    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        assert store.owned() == []
        assert store.cache_get("show", "key-1") is None


def test_stale_wal_does_not_leak_into_the_fresh_database(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / "state.db").write_bytes(b"not a database at all, really" * 100)
    (state_dir / "state.db-wal").write_bytes(b"junk wal")
    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        store.put_status("k", "v")
    wal = state_dir / "state.db-wal"
    assert not wal.exists() or wal.read_bytes() != b"junk wal"
    with Store.open(state_dir) as store:
        assert store.rebuilt is None
        assert store.get_status("k") == "v"


def test_two_rebuilds_in_one_second_do_not_collide(state_dir: Path) -> None:
    for _ in range(2):
        state_dir.mkdir(exist_ok=True)
        (state_dir / "state.db").write_bytes(b"garbage" * 1000)
        with Store.open(state_dir) as store:
            assert store.rebuilt is not None
    main_files = [p for p in state_dir.glob("state.db.corrupt-*") if not p.name.endswith("-wal")]
    assert len(main_files) == 2


def test_foreign_database_counts_as_missing_schema(state_dir: Path) -> None:
    state_dir.mkdir()
    conn = _raw(state_dir / "state.db")
    conn.execute("CREATE TABLE something_else (x)")
    conn.close()
    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        assert "not infernet's" in store.rebuilt
        assert store.owned() == []


def test_dropped_table_counts_as_missing_schema(state_dir: Path) -> None:
    with Store.open(state_dir):
        pass
    conn = _raw(state_dir / "state.db")
    conn.execute("DROP TABLE owned")
    conn.close()
    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        assert "owned" in store.rebuilt
        assert store.owned() == []


def test_newer_schema_is_refused_and_left_untouched(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    conn = _raw(state_dir / "state.db")
    conn.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    conn.close()
    with pytest.raises(StateError, match="newer than this infernet"):
        Store.open(state_dir)
    assert list(state_dir.glob("state.db.corrupt-*")) == []


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    target = blocker / "state"
    with pytest.raises(StateError) as info:
        Store.open(target)
    message = str(info.value)
    assert str(target) in message
    assert "--state-dir" in message


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_text("")
    with pytest.raises(StateError, match=re.escape(str(target))):
        Store.open(target)


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root writes through permission bits")
def test_unwritable_state_dir(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(StateError, match=re.escape(str(target))):
            Store.open(target)
    finally:
        target.chmod(0o700)


def test_unwritable_state_dir_as_seen_by_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root bypasses permission bits, so the check itself is exercised through os.access.
    target = tmp_path / "state"
    target.mkdir()
    monkeypatch.setattr(os, "access", lambda *_args, **_kw: False)
    with pytest.raises(StateError) as info:
        Store.open(target)
    assert str(target) in str(info.value)
    assert "not writable" in str(info.value)


def test_busy_database_is_a_state_error(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state.database, "BUSY_TIMEOUT_S", 0.2)
    with Store.open(state_dir) as store:
        blocker = _raw(state_dir / "state.db")
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StateError, match="locked"):
                store.put_status("k", 1)
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        # The failed write left no transaction behind.
        store.put_status("k", 2)
        assert store.get_status("k") == 2


def test_close_is_idempotent_and_use_after_close_is_a_bug(state_dir: Path) -> None:
    store = Store.open(state_dir)
    store.close()
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store.owned()


def test_timestamps_are_utc_iso8601(store: Store) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    store.record_installed(backend="ollama", canonical="a:1", name="a:1", digest=None)
    store.record_apply(
        config_sha256="c", git_commit=None, converged=True, actions=0, failed=0, summary={}
    )
    run = store.begin_run(config_sha256="c", plan={})
    store.begin_action(run_id=run, op="pull", backend="ollama", canonical="a:1", model="a:1")
    store.record_command(command_id="c1", verb="pull", payload={})
    store.job_begin("j1", model="a:1")
    last = store.last_apply()
    assert last is not None
    command = store.command_seen("c1")
    assert command is not None
    stamps = [
        store.owned()[0].installed_at,
        last.at,
        store.unfinished_actions()[0].started_at,
        command.received_at,
        command.updated_at,
        store.jobs_unreported()[0].received_at,
    ]
    after = datetime.now(UTC)
    for stamp in stamps:
        assert ISO_SECONDS.match(stamp), stamp
        moment = datetime.fromisoformat(stamp)
        assert moment.utcoffset() is not None
        assert moment.utcoffset() == UTC.utcoffset(None)
        assert before <= moment <= after


REBUILD_CHILD = """
import sys
from pathlib import Path
from state import Store
with Store.open(Path(sys.argv[1])) as store:
    print("rebuilt" if store.rebuilt else "clean")
"""


def test_concurrent_openers_rebuild_once(state_dir: Path, child_env: dict[str, str]) -> None:
    state_dir.mkdir()
    (state_dir / "state.db").write_bytes(os.urandom(16384))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", REBUILD_CHILD, str(state_dir)],
            env=child_env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    answers = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        answers.append(out.strip())
    assert sorted(answers) == ["clean", "clean", "clean", "rebuilt"]
    asides = state_dir.glob("state.db.corrupt-*")
    assert len([p for p in asides if not p.name.endswith(("-wal", "-shm"))]) == 1
