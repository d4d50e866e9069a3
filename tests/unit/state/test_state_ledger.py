"""The remote-command ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from state import CommandRecord, Store

# -- commands ----------------------------------------------------------------------------------


def test_unknown_command_is_not_seen(store: Store) -> None:
    assert store.command_seen("cmd-1") is None


def test_record_command_refuses_a_duplicate_id(store: Store) -> None:
    payload = {"model": "qwen2.5:14b", "backend": "ollama"}
    assert store.record_command(command_id="cmd-1", verb="install", payload=payload) is True
    assert store.record_command(command_id="cmd-1", verb="remove", payload={}) is False
    seen = store.command_seen("cmd-1")
    assert seen is not None
    # The first delivery wins; the duplicate changed nothing.
    assert (seen.verb, seen.payload, seen.state) == ("install", payload, "received")
    assert seen.result is None
    assert seen.error is None
    assert seen.reported_at is None


def test_duplicate_is_refused_after_reopen_and_completion(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.record_command(command_id="cmd-1", verb="install", payload={})
        store.set_command_state("cmd-1", state="running")
        store.set_command_state("cmd-1", state="completed", result={"ok": True})
        store.mark_command_reported("cmd-1")
    with Store.open(state_dir) as store:
        assert store.record_command(command_id="cmd-1", verb="install", payload={}) is False


def test_command_lifecycle(store: Store) -> None:
    store.record_command(command_id="c", verb="install", payload={"model": "a"})
    store.set_command_state("c", state="running")
    running = store.command_seen("c")
    assert running is not None
    assert running.state == "running"
    store.set_command_state("c", state="completed", result={"installed": "a"})
    done = store.command_seen("c")
    assert done is not None
    assert (done.state, done.result, done.error) == ("completed", {"installed": "a"}, None)
    assert done.received_at <= done.updated_at


def test_failed_command_keeps_its_error(store: Store) -> None:
    store.record_command(command_id="c", verb="remove", payload={})
    store.set_command_state("c", state="failed", error="model is protected")
    record = store.command_seen("c")
    assert record is not None
    assert (record.state, record.error, record.result) == ("failed", "model is protected", None)


def test_a_command_never_goes_back(store: Store) -> None:
    store.record_command(command_id="c", verb="install", payload={})
    store.set_command_state("c", state="running")
    with pytest.raises(ValueError, match="never run twice"):
        store.set_command_state("c", state="received")
    store.set_command_state("c", state="completed", result={})
    for state in ("received", "running", "failed"):
        with pytest.raises(ValueError, match="never run twice"):
            store.set_command_state("c", state=state)
    record = store.command_seen("c")
    assert record is not None
    assert record.state == "completed"


def test_set_command_state_rejects_bad_input(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown command"):
        store.set_command_state("nope", state="running")
    store.record_command(command_id="c", verb="install", payload={})
    with pytest.raises(ValueError, match="state must be"):
        store.set_command_state("c", state="done")


def test_mark_command_reported(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown command"):
        store.mark_command_reported("nope")
    store.record_command(command_id="c", verb="install", payload={})
    store.set_command_state("c", state="completed", result={})
    store.mark_command_reported("c")
    record = store.command_seen("c")
    assert record is not None
    assert record.reported_at is not None


def test_unreported_commands(store: Store) -> None:
    for command_id in ("received", "running", "completed", "failed", "reported"):
        store.record_command(command_id=command_id, verb="install", payload={"id": command_id})
    store.set_command_state("running", state="running")
    store.set_command_state("completed", state="completed", result={"ok": 1})
    store.set_command_state("failed", state="failed", error="boom")
    store.set_command_state("reported", state="completed", result={})
    store.mark_command_reported("reported")

    owed = store.unreported_commands()
    assert [c.command_id for c in owed] == ["received", "running", "completed", "failed"]
    assert all(isinstance(c, CommandRecord) for c in owed)


def test_reporting_too_early_does_not_lose_the_answer(store: Store) -> None:
    store.record_command(command_id="c", verb="install", payload={})
    store.set_command_state("c", state="running")
    # An acknowledgement of "running" must not count as the final answer.
    store.mark_command_reported("c")
    assert [c.command_id for c in store.unreported_commands()] == ["c"]
    store.set_command_state("c", state="completed", result={})
    assert [c.command_id for c in store.unreported_commands()] == ["c"]
    store.mark_command_reported("c")
    assert store.unreported_commands() == []


def test_commands_cut_off_by_a_crash_are_still_owed(state_dir: Path) -> None:
    with Store.open(state_dir) as store:
        store.record_command(command_id="c", verb="install", payload={})
        store.set_command_state("c", state="running")
    with Store.open(state_dir) as store:
        [owed] = store.unreported_commands()
        assert (owed.command_id, owed.state) == ("c", "running")
        # The daemon answers it as failed rather than running it again.
        store.set_command_state("c", state="failed", error="interrupted by a restart")
        store.mark_command_reported("c")
        assert store.unreported_commands() == []
