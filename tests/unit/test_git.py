"""What infernet says from git's answers: the commit claimed, the hint after an edit, git's
errors as one line (pure parts of ``reconciler.config.gitcommit``, from data tables)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from reconciler.config.gitcommit import GitFacts, GitState, _first_line

HEAD = "9dd119d92164044d0a86fa2bcc5f74217430c4e3bf4abd686fe0c57bdf0949d4"
TOP = Path("/srv/fleet config")


@pytest.mark.parametrize(
    ("state", "commit", "hinted"),
    [
        (GitState.CLEAN, HEAD, False),
        (GitState.MODIFIED, None, True),
        (GitState.UNTRACKED, None, False),
        (GitState.NONE, None, False),
        (GitState.UNKNOWN, None, False),
    ],
)
def test_only_a_clean_file_claims_a_commit_and_only_a_modified_one_gets_a_hint(
    state: GitState, commit: str | None, hinted: bool
) -> None:
    facts = GitFacts(state, HEAD, TOP, "nodes/gpu-17.yaml")
    assert facts.commit == commit
    assert (facts.commit_hint("infernet model install x") is not None) is hinted


def test_the_hint_is_a_command_a_shell_runs_as_written() -> None:
    facts = GitFacts(GitState.MODIFIED, HEAD, TOP, "nodes/gpu 17.yaml")
    hint = facts.commit_hint("infernet model remove it's:7b")
    assert hint is not None
    assert hint.startswith(f"nodes/gpu 17.yaml now differs from git (HEAD {HEAD[:12]});")
    command = shlex.split(hint.partition(" with: ")[2])
    assert command == [
        "git",
        "-C",
        str(TOP),
        "commit",
        "-m",
        "infernet model remove it's:7b",
        "--",
        "nodes/gpu 17.yaml",
    ]


@pytest.mark.parametrize(
    ("stderr", "line"),
    [
        ("", "git failed without a message"),
        ("fatal: not a git repository\n", "not a git repository"),
        (
            "fatal: detected dubious ownership in repository at '/srv/x'\n"
            "To add an exception for this directory, call:\n\n"
            "\tgit config --global --add safe.directory /srv/x\n",
            "detected dubious ownership in repository at '/srv/x' "
            "(to trust it: git config --global --add safe.directory /srv/x)",
        ),
    ],
)
def test_git_errors_read_as_one_line(stderr: str, line: str) -> None:
    assert _first_line(stderr) == line
