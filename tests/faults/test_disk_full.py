"""Campaign 4: the disk fills up while a model downloads.

With mount privileges, llama.cpp's ``models_dir`` is a small tmpfs: the plan fits, then another
writer fills the filesystem while a throttled ``https://`` download runs. Without them, the same
boundary is simulated in process (the download's file raises ``ENOSPC`` part-way). Either
way: a one-line failure naming the disk, no partial file left or counted, the plan still
shows the pull, and once space is back the next apply installs the model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reconciler.backends import sources
from reconciler.errors import PullFailed
from tests.faults.conftest import Ledger, budget, node_env, scaled
from tests.integration.conftest import INFERNET
from tests.servers.hub_harness import start_hub_server
from tests.servers.tinygguf import write_tiny_gguf

pytestmark = pytest.mark.faults

SIZE = 3 << 20  # the small filesystem
COUNT = scaled(2, full=10, per=10)


@contextlib.contextmanager
def small_fs(where: Path) -> Iterator[Path]:
    where.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(
            f"no small filesystem (mount -t tmpfs: {made.stderr.strip()}); "
            "the in-process ENOSPC test covers the boundary"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _run(config: Path, state: Path, env: dict[str, str], *args: str) -> Any:
    return subprocess.run(
        [INFERNET, *args, "-c", str(config), "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _pulls(config: Path, state: Path, env: dict[str, str]) -> list[str]:
    out = _run(config, state, env, "plan", "--json")
    assert "Traceback" not in out.stderr, out.stderr
    return [a["model"] for a in json.loads(out.stdout)["actions"] if a["op"] == "pull"]


@pytest.mark.integration
@pytest.mark.timeout(budget(60, 30, COUNT))
def test_disk_fills_during_a_download(tmp_path: Path) -> None:
    ledger = Ledger("disk full during a download")
    env = node_env(tmp_path)
    name = "tiny-disk.gguf"
    with small_fs(tmp_path / "small") as models_dir:
        hub = start_hub_server(tmp_path / "hub", tmp_path / "hub-root")
        try:
            env.update(hub.client_env(tmp_path / "hf-home"))
            hub.files_dir.mkdir(parents=True, exist_ok=True)
            size = write_tiny_gguf(hub.files_dir / name, name="tiny-disk", hidden=64, layers=2)
            data = (hub.files_dir / name).read_bytes()
            config, state = tmp_path / "infernet.yaml", tmp_path / "state"
            doc = {
                "served_models": [
                    {"name": name, "backend": "llamacpp", "source": hub.file_url(name)}
                ],
                "backends": {
                    "llamacpp": {"models_dir": str(models_dir), "url": "http://127.0.0.1:9"}
                },
                "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
            }
            config.write_text(yaml.safe_dump(doc))
            for _ in range(COUNT):
                ledger.trials += 1
                ledger.check(_pulls(config, state, env) == [name], "the plan must pull it")
                hub.clear_faults()
                hub.fault(f"*{name}", "slow", rate=size)
                filler = models_dir / "filler.bin"
                stop = threading.Event()

                def fill(stop: threading.Event = stop, filler: Path = filler) -> None:
                    part = sources.partial_path(models_dir / name)
                    while not stop.is_set() and not part.exists():
                        time.sleep(0.01)
                    with contextlib.suppress(OSError), filler.open("wb") as f:
                        while not stop.is_set():
                            f.write(b"\0" * 65536)
                            f.flush()

                filling = threading.Thread(target=fill, daemon=True)
                filling.start()
                out = _run(config, state, env, "apply", "--yes")
                stop.set()
                filling.join(10)
                ledger.fault("filesystem filled mid-download")
                text = out.stdout + out.stderr
                ledger.check("Traceback" not in out.stderr, f"traceback: {out.stderr}")
                ledger.check(out.returncode == 1, f"apply exited {out.returncode}: {text}")
                ledger.check("disk full" in text, f"the failure must say the disk is full: {text}")
                left = sorted(p.name for p in models_dir.iterdir() if p != filler)
                ledger.check(left == [], f"half-installed files left: {left}")
                filler.unlink()
                ledger.check(_pulls(config, state, env) == [name], "the plan must still pull it")
                hub.clear_faults()
                out = _run(config, state, env, "apply", "--yes")
                ledger.check(
                    (models_dir / name).exists() and (models_dir / name).read_bytes() == data,
                    f"the retry did not install it: {out.stdout}{out.stderr}",
                )
                ledger.check(_pulls(config, state, env) == [], "installed: nothing to pull")
                (models_dir / name).unlink(missing_ok=True)  # the next trial downloads again
        finally:
            hub.close()
    ledger.assert_clean()


class _FullDisk:
    """A file object that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, real: Any, room: int) -> None:
        self.real, self.room = real, room

    def write(self, chunk: bytes) -> int:
        if len(chunk) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(chunk)
        return int(self.real.write(chunk))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.real, attr)


def test_enospc_at_the_download_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same boundary without a small filesystem: ``fetch`` into a disk that fills."""
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    size = write_tiny_gguf(src, name="tiny", hidden=256, layers=4, ff=512)
    dest = tmp_path / "models" / "tiny.gguf"
    dest.parent.mkdir()
    source = sources.parse(src.as_uri())
    real_open = Path.open

    def full_open(self: Path, mode: str = "r", *a: Any, **kw: Any) -> Any:
        handle = real_open(self, mode, *a, **kw)
        return _FullDisk(handle, size // 3) if self.name.endswith(".part") else handle

    with httpx.Client() as http:
        remote = sources.probe(source, http, metadata=False)
        monkeypatch.setattr(Path, "open", full_open)
        with pytest.raises(PullFailed, match="disk full") as caught:
            sources.fetch(
                source,
                remote,
                dest,
                http=http,
                expected_sha256=None,
                progress=lambda *_: None,
                cancel=threading.Event(),
            )
        monkeypatch.undo()
        assert "\n" not in str(caught.value)
        assert sorted(p.name for p in dest.parent.iterdir()) == []
        sources.fetch(
            source,
            remote,
            dest,
            http=http,
            expected_sha256=None,
            progress=lambda *_: None,
            cancel=threading.Event(),
        )
    assert dest.read_bytes() == src.read_bytes()
