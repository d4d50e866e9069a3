"""What git says about a config file: the commit it comes from, or that it has local edits.

A GitOps node wants ``plan`` and heartbeats to say "deployed from commit X", but only when that
is true: the file must be tracked and its bytes identical to HEAD's version of it. The answer
comes from the ``git`` command itself, run without a shell and with a deadline, so split
indexes, SHA-256 repositories, worktrees, packed refs and whatever git adds next are read the
way git reads them. When git is not installed, refuses the repository (another user's checkout:
git's ``safe.directory``) or does not answer in time, the facts say so and carry no commit.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 5.0
"""Seconds all git commands for one file may take together: a hung network filesystem or a
stuck git must not hang ``plan`` or the daemon."""

# Variables that would point git at another repository than the one holding the file (a git
# hook, for instance, runs with GIT_DIR and GIT_INDEX_FILE set).
_REDIRECTS = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
)


class GitState(enum.StrEnum):
    NONE = "none"  # not inside a git work tree
    UNTRACKED = "untracked"  # in a work tree, but not in HEAD (or nothing committed yet)
    CLEAN = "clean"  # identical to HEAD's version
    MODIFIED = "modified"  # tracked, and differs from HEAD's version: local edits not in git
    UNKNOWN = "unknown"  # in a repository, but git could not say (``reason`` says why)


@dataclass(frozen=True)
class GitFacts:
    """What git says about one file."""

    state: GitState
    head: str | None = None  # HEAD's commit, when there is one
    toplevel: Path | None = None
    relative: str | None = None  # the file's path from the work tree's top
    reason: str | None = None  # why git could not say (UNKNOWN only)

    @property
    def commit(self) -> str | None:
        """The commit the file comes from: HEAD's, when the file is exactly HEAD's version."""
        return self.head if self.state is GitState.CLEAN else None

    def as_json(self) -> dict[str, str | None]:
        return {"state": self.state.value, "head": self.head, "reason": self.reason}

    def commit_hint(self, message: str) -> str | None:
        """For a tracked file with local edits: one line saying so and how to commit them."""
        if self.state is not GitState.MODIFIED or self.toplevel is None:
            return None
        head = f" (HEAD {self.head[:12]})" if self.head else ""
        command = shlex.join(
            ["git", "-C", str(self.toplevel), "commit", "-m", message, "--", str(self.relative)]
        )
        return (
            f"{self.relative} now differs from git{head}; commit it (and push, where nodes "
            f"pull it) with: {command}"
        )


def commit_of(path: Path, data: bytes) -> str | None:
    """HEAD's commit when ``path`` (whose bytes are ``data``) is tracked and clean, else None."""
    return facts(path, data).commit


def facts(path: Path, data: bytes | None = None) -> GitFacts:
    """What git says about ``path``; ``data`` is its content as read (None: read it now), so
    the commit named is the one whose version is exactly the bytes that were validated."""
    try:
        resolved = path.resolve()  # a symlink into a checkout: the checkout decides
        if data is None:
            data = resolved.read_bytes()
    except OSError:
        return GitFacts(GitState.NONE)
    folder = resolved.parent
    if not any((d / ".git").exists() for d in (folder, *folder.parents)):
        # In no work tree (git's own variables are not passed to it, see _REDIRECTS): git
        # would say so, after ~10 ms of starting up on every plan and reconcile.
        return GitFacts(GitState.NONE)
    if shutil.which("git") is None:
        return GitFacts(GitState.UNKNOWN, reason="the git command is not installed")
    try:
        return _ask(folder, resolved.name, data)
    except _GitFailed as exc:
        return GitFacts(GitState.UNKNOWN, reason=str(exc))


# --------------------------------------------------------------------------- internals


class _GitFailed(Exception):
    """git did not answer, or answered with an error we can't read as a fact."""


def _ask(folder: Path, name: str, data: bytes) -> GitFacts:
    deadline = time.monotonic() + TIMEOUT
    inside = _git(deadline, folder, "rev-parse", "--is-inside-work-tree", "--show-toplevel")
    if inside.returncode != 0:
        if "not a git repository" in inside.stderr or "in a work tree" in inside.stderr:
            return GitFacts(GitState.NONE)  # no repository, or inside a .git folder
        raise _GitFailed(_first_line(inside.stderr))
    answer = inside.stdout.split("\n")
    if answer[0] != "true":
        return GitFacts(GitState.NONE)  # inside a .git folder or a bare repository
    toplevel = Path(answer[1])
    try:
        relative = (folder / name).relative_to(toplevel).as_posix()
    except ValueError:  # a path git spells differently (case, bind mounts): no claim
        raise _GitFailed(f"git places {folder} outside its work tree {toplevel}") from None
    head = _git(deadline, folder, "rev-parse", "-q", "--verify", "HEAD^{commit}")
    if head.returncode != 0:
        return GitFacts(GitState.UNTRACKED, toplevel=toplevel, relative=relative)
    commit = head.stdout.strip()
    committed = _git(deadline, folder, "rev-parse", "-q", "--verify", f"HEAD:./{name}")
    if committed.returncode != 0:
        return GitFacts(GitState.UNTRACKED, commit, toplevel, relative)
    # --path: the file's attributes apply (end-of-line conversion), as for `git status`.
    ours = _git(deadline, folder, "hash-object", "--stdin", f"--path={name}", stdin=data)
    if ours.returncode != 0:
        raise _GitFailed(_first_line(ours.stderr))
    same = ours.stdout.strip() == committed.stdout.strip()
    state = GitState.CLEAN if same else GitState.MODIFIED
    return GitFacts(state, commit, toplevel, relative)


def _git(
    deadline: float, folder: Path, *argv: str, stdin: bytes = b""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _REDIRECTS}
    # Never take the index lock or ask for credentials: these are reads, run by a daemon.
    env.update({"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    try:
        # Its own process group: on the deadline the whole group goes, so nothing git started
        # (a hook, an fsmonitor) can keep our pipes open and the wait going.
        child = subprocess.Popen(
            ["git", *argv],
            cwd=folder,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise _GitFailed(f"cannot run git: {exc.strerror or exc}") from None
    try:
        out, err = child.communicate(stdin, timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise _GitFailed(f"git did not answer within {TIMEOUT:g} s") from None
    return subprocess.CompletedProcess(
        child.args,
        child.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
    )


def _first_line(text: str) -> str:
    """git's error as one line. Its refusal of another user's checkout explains itself over
    several lines: the first says what, a later one the command that trusts the folder."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "git failed without a message"
    first = lines[0].removeprefix("fatal: ")
    trust = next((line for line in lines if line.startswith("git config ")), None)
    return f"{first} (to trust it: {trust})" if trust else first
