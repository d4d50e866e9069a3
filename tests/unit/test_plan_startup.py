"""Start-up work `infernet plan` no longer does where it cannot matter (issue 17, item 7)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.config import gitcommit


def test_a_file_in_no_work_tree_is_answered_without_starting_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No .git in the file's folder or any parent: git could only say "not a repository".
    assert not any((d / ".git").exists() for d in (tmp_path, *tmp_path.parents))
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: []\n")

    def no_git(*args: object, **kw: object) -> None:
        raise AssertionError("git was started")

    monkeypatch.setattr(subprocess, "Popen", no_git)
    assert gitcommit.facts(path).state is gitcommit.GitState.NONE
    assert gitcommit.commit_of(path, path.read_bytes()) is None


def test_a_file_in_a_work_tree_still_asks_git(tmp_path: Path) -> None:
    if subprocess.run(["git", "--version"], capture_output=True, check=False).returncode:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    path = tmp_path / "infernet.yaml"
    path.write_text("served_models: []\n")
    assert gitcommit.facts(path).state is gitcommit.GitState.UNTRACKED
