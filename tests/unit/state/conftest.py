"""Fixtures for the state store tests.

The tests import ``state`` from the working tree; child processes get the same path through
``PYTHONPATH`` (the ``child_env`` fixture).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
if str(REPO_ROOT) not in sys.path:
    # The package may not be installed into the venv yet; the tests need the tree's copy.
    sys.path.insert(0, str(REPO_ROOT))

from state import Store  # noqa: E402


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for a child Python that must import ``state`` from this tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env
