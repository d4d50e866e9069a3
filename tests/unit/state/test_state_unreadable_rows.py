"""A store whose rows were damaged after it was opened: read like a damaged file, never a crash.

Random bytes inside one stored row made every read raise "Could not decode
to UTF-8 column 'value'" (a StateError telling the user to check the disk) until someone
intervened. The store only remembers: the damaged file is set aside, an empty one takes its
place (nothing owned, so nothing is pruned) and the read answers from it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from state import NodeLock, Store

GARBAGE = bytes([0xFF, 0xFE, 0x80, 0x00, 0xC3, 0x28, 0x41]) * 8


def _poke(state_dir: Path, sql: str, *args: object) -> None:
    """Change the file behind the store's back, as a damaged disk would."""
    conn = sqlite3.connect(state_dir / "state.db", isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


def _filled(state_dir: Path) -> Store:
    store = Store.open(state_dir)
    store.record_installed(backend="ollama", canonical="a:latest", name="a", digest="d1")
    store.put_status("protected", ["ollama:a:latest"])
    store.cache_put("show", "a", {"size": 1})
    return store


def _aside(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if ".corrupt-" in p.name)


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("status", "value", "text"),  # invalid UTF-8 stored as TEXT: the report
        ("status", "value", "blob"),  # the same bytes stored as a BLOB
        ("status", "value", "not json"),
        ("owned", "name", "text"),
        ("owned", "name", "blob"),
        ("cache", "value", "text"),
        ("cache", "stored_at", "not json"),
    ],
)
def test_an_unreadable_row_sets_the_file_aside_and_reads_empty(
    state_dir: Path, table: str, column: str, value: str
) -> None:
    store = _filled(state_dir)
    try:
        if value == "text":
            _poke(state_dir, f"UPDATE {table} SET {column} = CAST(? AS TEXT)", GARBAGE)
        elif value == "blob":
            _poke(state_dir, f"UPDATE {table} SET {column} = ?", GARBAGE)
        else:
            _poke(state_dir, f"UPDATE {table} SET {column} = ?", "{half")
        # The read that meets the damage answers (never a StateError), from an empty store,
        # and so does every read after it.
        first: dict[str, Callable[[], object]] = {
            "status": lambda: store.get_status("protected"),
            "owned": store.owned,
            "cache": lambda: store.cache_get("show", "a", max_age=60),
        }
        assert not first[table]()
        assert store.get_status("protected") is None
        assert store.owned() == []
        assert store.cache_get("show", "a") is None
        assert store.rebuilt is not None and "unreadable" in store.rebuilt
        assert _aside(state_dir)  # kept for inspection, under a new name
        # The store goes on working on the fresh file.
        store.record_installed(backend="ollama", canonical="b:latest", name="b", digest=None)
        assert [r.name for r in store.owned()] == ["b"]
    finally:
        store.close()
    with Store.open(state_dir) as again:
        assert again.rebuilt is None
        assert [r.name for r in again.owned()] == ["b"]


def test_every_part_of_the_store_reads_damage_as_empty(state_dir: Path) -> None:
    store = _filled(state_dir)
    run = store.begin_run(config_sha256="c", plan={})
    store.begin_action(run_id=run, op="pull", backend="ollama", canonical="a:latest", model="a")
    store.record_apply(
        config_sha256="c", git_commit=None, converged=True, actions=1, failed=0, summary={}
    )
    store.record_command(command_id="c1", verb="model_install", payload={"model": "a"})
    store.job_begin("j1", model="a")
    store.job_finish("j1", {"status": "completed"})
    store.record_measured_vram(backend="ollama", canonical="a:latest", size_vram=5)
    store.close()
    damage: list[tuple[str, str, Callable[[Store], object], object]] = [
        ("actions", "model", lambda s: s.unfinished_actions(), []),
        ("applies", "summary", lambda s: s.last_apply(), None),
        ("commands", "payload", lambda s: s.unreported_commands(), []),
        ("commands", "state", lambda s: s.command_seen("c1"), None),
        ("jobs", "answer", lambda s: s.jobs_unreported(), []),
        ("jobs", "state", lambda s: s.job_seen("j1"), None),
        ("measured_vram", "size_vram", lambda s: s.measured_vram(), {}),
    ]
    for table, column, read, empty in damage:
        _refill(state_dir)
        _poke(state_dir, f"UPDATE {table} SET {column} = CAST(? AS TEXT)", GARBAGE)
        with Store.open(state_dir) as store:
            assert read(store) == empty, table
            assert store.rebuilt is not None, table


def _refill(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.record_installed(backend="ollama", canonical="a:latest", name="a", digest="d1")
        store.set_pinned(backend="ollama", canonical="a:latest", pinned=True)
        store.record_measured_vram(backend="ollama", canonical="a:latest", size_vram=5)
        run = store.begin_run(config_sha256="c", plan={})
        store.begin_action(run_id=run, op="pull", backend="ollama", canonical="a:latest", model="a")
        store.record_apply(
            config_sha256="c", git_commit=None, converged=True, actions=1, failed=0, summary={}
        )
        if store.command_seen("c1") is None:
            store.record_command(command_id="c1", verb="model_install", payload={"model": "a"})
        if store.job_seen("j1") is None:
            store.job_begin("j1", model="a")
            store.job_finish("j1", {"status": "completed"})


def test_a_store_follows_a_file_another_process_set_aside(state_dir: Path) -> None:
    daemon = _filled(state_dir)
    cli = Store.open(state_dir)
    try:
        _poke(state_dir, "UPDATE status SET value = CAST(? AS TEXT)", GARBAGE)
        assert cli.get_status("protected") is None  # the CLI meets the damage first
        assert len(_aside(state_dir)) >= 1
        # The daemon's connection still points at the file set aside: what it writes now must
        # land in the fresh one, not be lost with the old.
        daemon.put_status("daemon", {"running": True})
        assert daemon.rebuilt is not None
        assert cli.get_status("daemon") == {"running": True}
        assert daemon.owned() == []
    finally:
        daemon.close()
        cli.close()


def test_two_stores_meeting_the_same_damage_set_it_aside_once(state_dir: Path) -> None:
    one = _filled(state_dir)
    two = Store.open(state_dir)
    try:
        _poke(state_dir, "UPDATE owned SET name = CAST(? AS TEXT)", GARBAGE)
        assert one.owned() == []
        two.record_installed(backend="ollama", canonical="b:latest", name="b", digest=None)
        assert two.owned() != [] and one.owned() == two.owned()
        databases = [p for p in _aside(state_dir) if not p.name.endswith(("-wal", "-shm"))]
        assert len(databases) == 1
    finally:
        one.close()
        two.close()


def _modes(state_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(state_dir)): stat.S_IMODE(p.stat().st_mode)
        for p in state_dir.rglob("*")
        if p.is_file()
    }


def test_files_in_the_state_dir_are_private_whatever_the_folder(state_dir: Path) -> None:
    # systemd's StateDirectory= makes the folder 0755; the umask is the usual 022.
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    old = os.umask(0o022)
    try:
        with Store.open(state_dir) as store, NodeLock(state_dir, purpose="apply", timeout=1):
            store.put_status("x", {"a": 1})  # the WAL and its index exist while open
            modes = _modes(state_dir)
            assert {"state.db", "state.db-wal", "state.db-shm", "lock"} <= set(modes)
            assert modes == dict.fromkeys(modes, 0o600), modes
    finally:
        os.umask(old)


def test_a_database_left_world_readable_is_narrowed(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.put_status("x", 1)
    for name in ("state.db", "lock"):
        path = state_dir / name
        path.touch()
        path.chmod(0o644)
    with Store.open(state_dir), NodeLock(state_dir, purpose="apply", timeout=1):
        modes = _modes(state_dir)
    assert modes["state.db"] == 0o600 and modes["lock"] == 0o600, modes


def test_a_database_rebuilt_at_open_is_private_and_so_is_the_damaged_copy(
    state_dir: Path,
) -> None:
    state_dir.mkdir(mode=0o755)
    (state_dir / "state.db").write_bytes(b"not a database" * 100)
    (state_dir / "state.db").chmod(0o644)
    with Store.open(state_dir) as store:
        assert store.rebuilt is not None
        store.put_status("x", 1)
        modes = _modes(state_dir)
    assert modes == dict.fromkeys(modes, 0o600), modes
