"""Everything infernet writes in its state dir is 0600, whoever made the
folder (systemd's ``StateDirectory=`` makes it 0755) and whatever the umask (022 by default).

The store and its lock are checked in ``tests/unit/state``; here the real CLI and a real engine
process (the fake engine, through ``Engines`` exactly as vLLM is started) write the rest.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.backends.hf.engines import Engines
from reconciler.errors import BackendError
from tests.integration.conftest import Node
from tests.integration.test_engines import KEY, ROOT, free_base, spec

pytestmark = pytest.mark.integration


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    old = os.umask(0o022)
    try:
        yield folder
    finally:
        os.umask(old)


def test_the_cli_leaves_only_private_files(node: Node, state: Path) -> None:
    node.state = state
    node.write_config(["smollm2:135m"])
    for args in (("apply", "--yes"), ("status",), ("plan",)):
        out = node.run(*args)
        assert out.returncode == 0, out.stderr
    modes = _modes(state)
    assert {"state.db", "lock"} <= set(modes), modes
    assert modes == dict.fromkeys(modes, 0o600), modes


def test_engine_records_logs_and_exit_files_are_private(tmp_path: Path, state: Path) -> None:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    engines = Engines(state / "engines", base_port=free_base(), env={"PYTHONPATH": str(ROOT)})
    try:
        engines.start(spec(model, env={"FAKE_ENGINE_EXIT_AT_START": "3"}))
        with pytest.raises(BackendError):
            engines.wait_ready(KEY, 10)
        modes = _modes(state)
        assert any(name.endswith(".exit") for name in modes), modes  # written by the shell
        assert any(name.endswith(".log") for name in modes), modes
        assert any(name.endswith(".json") for name in modes), modes
        assert modes == dict.fromkeys(modes, 0o600), modes
    finally:
        for status in engines.list():
            engines.stop(status.key, timeout=5)
        engines.close()
