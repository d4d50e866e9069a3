"""WAL: the daemon writes while a CLI reads, in one process or several."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import state.database
from state import Store

WRITER = """
import sys
from pathlib import Path
from state import Store
with Store.open(Path(sys.argv[1])) as store:
    for i in range(int(sys.argv[3])):
        store.record_command(command_id=f"{sys.argv[2]}-{i}", verb="install", payload={"i": i})
        store.put_status("counter", i)
"""


def test_reader_snapshot_does_not_block_a_writer(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short timeout: in rollback-journal mode this write would fail on the reader's lock.
    monkeypatch.setattr(state.database, "BUSY_TIMEOUT_S", 0.3)
    with Store.open(state_dir) as writer:
        writer.put_status("k", "old")
        reader = sqlite3.connect(state_dir / "state.db", isolation_level=None)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT value FROM status").fetchone()[0] == '"old"'
            writer.put_status("k", "new")
            # The open read transaction keeps its snapshot...
            assert reader.execute("SELECT value FROM status").fetchone()[0] == '"old"'
            reader.execute("COMMIT")
        finally:
            reader.close()
        # ...and a fresh reader sees the commit.
        with Store.open(state_dir) as other:
            assert other.get_status("k") == "new"


def test_readers_do_not_wait_for_an_open_write(state_dir: Path) -> None:
    with Store.open(state_dir) as first, Store.open(state_dir) as second:
        first.put_status("k", 1)
        blocker = sqlite3.connect(state_dir / "state.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            blocker.execute("UPDATE status SET value = '2' WHERE key = 'k'")
            started = time.monotonic()
            assert first.get_status("k") == 1
            assert second.get_status("k") == 1
            assert second.owned() == []
            assert time.monotonic() - started < 1.0
            blocker.execute("COMMIT")
        finally:
            blocker.close()
        assert first.get_status("k") == 2


def test_processes_write_and_read_at_once(state_dir: Path, child_env: dict[str, str]) -> None:
    with Store.open(state_dir):
        pass
    count = 100
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(state_dir), name, str(count)], env=child_env
        )
        for name in ("a", "b")
    ]
    try:
        with Store.open(state_dir) as reader:
            while any(w.poll() is None for w in writers):
                reader.get_status("counter")
                reader.unreported_commands()
    finally:
        codes = [w.wait(timeout=60) for w in writers]
    assert codes == [0, 0]
    with Store.open(state_dir) as store:
        ids = {c.command_id for c in store.unreported_commands()}
    assert ids == {f"{name}-{i}" for name in ("a", "b") for i in range(count)}
