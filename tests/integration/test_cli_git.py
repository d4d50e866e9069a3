"""GitOps habits through the real CLI: the commit a file comes from, as git itself says it
(split indexes, SHA-256 repositories), local edits named in ``status`` and after ``model
install/remove`` with the command that commits them, and git missing, refusing or hung."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Node

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed"),
]

QWEN = "qwen2.5:0.5b"
SMOL = "smollm2:135m"
IDENTITY = ("-c", "user.name=Operator", "-c", "user.email=operator@example.net")


def git(repo: Path, *argv: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *IDENTITY, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def tracked_node(node: Node, *init: str, served: list[str] | None = None) -> Path:
    """The node's file in its own git repository (``git init *init``), committed."""
    repo = node.tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main", *init)
    node.config = repo / "infernet.yaml"
    node.write_config(served or [SMOL])
    git(repo, "add", "infernet.yaml")
    git(repo, "commit", "-q", "-m", "the node's models")
    return repo


def plan_commit(node: Node) -> str | None:
    out = node.run("plan", "--json")
    assert out.returncode == 0, out.stderr
    commit: str | None = json.loads(out.stdout)["config"]["git_commit"]
    return commit


@pytest.mark.parametrize(
    ("init", "index"),
    [
        ((), ("--split-index",)),
        (("--object-format=sha256",), ()),
        (("--object-format=sha256",), ("--split-index",)),
        (("--object-format=sha256",), ("--index-version", "4")),
    ],
    ids=["sha1-split-index", "sha256", "sha256-split-index", "sha256-index-v4"],
)
def test_the_commit_is_read_from_split_index_and_sha256_repositories(
    node: Node, init: tuple[str, ...], index: tuple[str, ...]
) -> None:
    repo = tracked_node(node, *init)
    if index:
        git(repo, "update-index", *index)
    head = git(repo, "rev-parse", "HEAD")
    assert len(head) == (64 if init else 40)
    assert plan_commit(node) == head
    node.config.write_text(node.config.read_text() + "# edited\n")
    assert plan_commit(node) is None  # the bytes planned are not HEAD's
    git(repo, "add", "infernet.yaml")
    assert plan_commit(node) is None  # staged is not committed
    git(repo, "commit", "-q", "-m", "edit")
    assert plan_commit(node) == git(repo, "rev-parse", "HEAD")


def test_model_install_and_remove_on_a_tracked_file_say_how_to_commit_it(node: Node) -> None:
    repo = tracked_node(node)
    installed = node.run("model", "install", QWEN)
    assert installed.returncode == 0, installed.stderr
    head = git(repo, "rev-parse", "HEAD")
    note = next(line for line in installed.stderr.splitlines() if "differs from git" in line)
    assert f"infernet.yaml now differs from git (HEAD {head[:12]})" in note
    command = note.partition(" with: ")[2]
    assert command.startswith(f"git -C {repo} commit -m ")

    status = node.run("status")
    assert f"Git: local edits not in git (HEAD {head[:12]})" in status.stdout
    doc = json.loads(node.run("status", "--json").stdout)
    assert doc["config"]["git"]["state"] == "modified"
    assert doc["config"]["git_commit"] is None

    # The command it names is the one that commits the edit: run it as given.
    argv = shlex.split(command)
    subprocess.run([argv[0], *IDENTITY, *argv[1:]], check=True, capture_output=True, timeout=30)
    assert git(repo, "log", "-1", "--format=%s") == f"infernet model install {QWEN}"
    assert git(repo, "status", "--porcelain") == ""
    assert "Git:" not in node.run("status").stdout
    assert plan_commit(node) == git(repo, "rev-parse", "HEAD")

    removed = node.run("model", "remove", QWEN, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "infernet.yaml now differs from git" in removed.stderr
    assert f"commit -m 'infernet model remove {QWEN}' -- infernet.yaml" in removed.stderr


def test_an_untracked_file_gets_no_git_note(node: Node) -> None:
    repo = node.tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    node.config = repo / "infernet.yaml"
    node.write_config([SMOL])
    installed = node.run("model", "install", QWEN)
    assert installed.returncode == 0, installed.stderr
    assert "git" not in installed.stderr.lower()
    assert "Git:" not in node.run("status").stdout
    assert json.loads(node.run("status", "--json").stdout)["config"]["git"]["state"] == "untracked"


def test_a_failed_install_leaves_no_git_note(node: Node) -> None:
    tracked_node(node)
    failed = node.run("model", "install", "no-such-model:1b")
    assert failed.returncode == 1
    assert "differs from git" not in failed.stderr
    assert "Git:" not in node.run("status").stdout


def _without_git(node: Node, fake_git: str | None = None) -> None:
    """PATH with no git on it, or with ``fake_git`` (a shell script body) as git."""
    bin_dir = node.tmp / "bin"
    bin_dir.mkdir()
    if fake_git is not None:
        script = bin_dir / "git"
        script.write_text(f"#!/bin/sh\n{fake_git}\n")
        script.chmod(0o755)
    node.env = {**node.env, "PATH": str(bin_dir)}


def test_without_git_nothing_is_claimed_and_status_says_why(node: Node) -> None:
    tracked_node(node)
    _without_git(node)
    assert plan_commit(node) is None
    status = node.run("status")
    assert "Git: not checked: the git command is not installed" in status.stdout
    installed = node.run("model", "install", QWEN)
    assert installed.returncode == 0, installed.stderr
    assert "differs from git" not in installed.stderr


def test_a_hung_git_is_given_up_on_within_the_deadline(node: Node) -> None:
    tracked_node(node)
    # A git that never answers and leaves a child holding our pipes.
    sleep = shutil.which("sleep")
    _without_git(node, f"{sleep} 60 &\nexec {sleep} 60")
    started = time.monotonic()
    doc = json.loads(node.run("status", "--json", timeout=40).stdout)
    assert time.monotonic() - started < 25  # two lookups (file, status), 5 s each at most
    assert doc["config"]["git_commit"] is None
    assert doc["config"]["git"] == {
        "state": "unknown",
        "head": None,
        "reason": "git did not answer within 5 s",
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the checkout to another user")
def test_a_checkout_git_refuses_to_read_is_reported_not_trusted(node: Node) -> None:
    repo = tracked_node(node)
    for path in [repo, *repo.rglob("*")]:
        os.lchown(path, 65534, 65534)  # another user's checkout: git's safe.directory applies
    node.env = {k: v for k, v in node.env.items() if k not in ("SUDO_UID", "SUDO_GID")}
    assert plan_commit(node) is None
    status = node.run("status")
    line = next(x for x in status.stdout.splitlines() if x.startswith("Git:"))
    assert "dubious ownership" in line
    assert f"safe.directory {repo}" in line
