"""default_state_dir: the contract's lookup order for the state directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from state import default_state_dir


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INFERNET_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def test_env_var_wins_even_for_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("INFERNET_STATE_DIR", str(tmp_path / "custom"))
    assert default_state_dir() == tmp_path / "custom"


def test_env_var_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERNET_STATE_DIR", "~/st")
    assert default_state_dir() == tmp_path / "home" / "st"


def test_empty_env_var_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFERNET_STATE_DIR", "")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "infernet"


def test_root_uses_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_STATE_HOME", "/somewhere")
    assert default_state_dir() == Path("/var/lib/infernet")


def test_user_uses_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "infernet"


def test_relative_xdg_state_home_is_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "infernet"


def test_user_default_is_local_state(tmp_path: Path) -> None:
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "infernet"
