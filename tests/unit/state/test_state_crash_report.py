"""Crash reports: a new 0600 file in the state dir, never through a link."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from state.location import crash_report


def test_a_report_is_a_new_private_file_in_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    report = crash_report(state_dir, "Traceback: boom\n")
    assert report is not None and report.parent == state_dir
    assert report.name.startswith("crash-") and report.name.endswith(f"-{os.getpid()}.txt")
    assert report.read_text() == "Traceback: boom\n"
    assert stat.S_IMODE(report.stat().st_mode) == 0o600


def test_a_link_planted_at_the_name_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    monkeypatch.setattr(time, "strftime", lambda _fmt, _t=None: "20260101T000000Z")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    name = state_dir / f"crash-20260101T000000Z-{os.getpid()}.txt"
    name.symlink_to(victim)
    assert crash_report(state_dir, "Traceback: boom\n") is None
    assert victim.read_text() == "precious\n"
    assert name.is_symlink()


def test_an_existing_file_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    monkeypatch.setattr(time, "strftime", lambda _fmt, _t=None: "20260101T000000Z")
    name = state_dir / f"crash-20260101T000000Z-{os.getpid()}.txt"
    name.write_text("earlier report\n")
    assert crash_report(state_dir, "Traceback: boom\n") is None
    assert name.read_text() == "earlier report\n"


def test_no_usable_state_dir_means_no_report(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert crash_report(blocker / "state", "Traceback: boom\n") is None
