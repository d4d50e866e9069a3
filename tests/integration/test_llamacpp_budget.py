"""llama.cpp's estimate through the real CLI against a real router: what runs, and bad headers.

The estimate must be of what the router really runs (its ``-c`` and ``-np``: every slot holds
a KV cache), and a GGUF file whose header is hostile (arrays nested thousands deep) is a
one-line error for that file: never a crash of ``plan`` or ``watch``, never advertised.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.backends.gguf import meta as ggufmeta
from reconciler.backends.llamacpp.router import run_settings
from reconciler.model import BackendKind, ModelSpec
from reconciler.planning import budget
from tests.integration.conftest import Node
from tests.servers.llamacpp_harness import Router, start_router
from tests.servers.tinygguf import corrupt_gguf, write_tiny_gguf

pytestmark = pytest.mark.integration


def _write(
    node: Node, router_url: str, models_dir: Path, served: list[Any], **llamacpp: Any
) -> None:
    doc = {
        "served_models": served,
        "backends": {
            "ollama": {
                "url": node.url,
                "registry": node.registry,
                "models_dir": str(node.models_dir),
            },
            "llamacpp": {"models_dir": str(models_dir), "url": router_url, **llamacpp},
        },
        "budget": {"vram": "24GiB", "disk_reserve": "1MiB"},
    }
    node.config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _plan(node: Node) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    out = node.run("plan", "--json")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode in (0, 1, 2), out.stderr
    doc: dict[str, Any] = json.loads(out.stdout) if out.stdout.strip() else {}
    return doc, out


def _estimate(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in doc["budget"]["estimates"] if e["model"] == name)
    return found


def _expected(path: Path, router_args: list[str], *, spec_context: int | None = None) -> int:
    """The library's figure for a file run the way ``router_args`` say (a CPU-only node)."""
    facts = ggufmeta.read_file(path)
    facts = dataclasses.replace(facts, **run_settings(router_args, facts.context_length))
    spec = ModelSpec(path.name, BackendKind.LLAMACPP, path.name, path.name, context=spec_context)
    got = budget.estimate(spec, facts, None, None, accelerator=False).bytes
    assert got is not None
    return got


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    models = tmp_path / "gguf"
    models.mkdir()
    return models


@pytest.fixture
def four_slots(tmp_path: Path, folder: Path) -> Iterator[Router]:
    router = start_router(tmp_path / "router", folder, extra_args=["-c", "2048", "-np", "4"])
    try:
        yield router
    finally:
        router.close()


def test_plan_counts_every_slot_and_the_context_the_router_runs(
    node: Node, folder: Path, four_slots: Router
) -> None:
    # the router: -c 2048 -np 4, so 4 slots of 512 tokens, each with its own KV cache; the
    # file says 256 tokens, which llama.cpp can't apply per model, and 2 slots
    path = folder / "tiny-a.gguf"
    write_tiny_gguf(path, name="tiny-a", context=4096)
    four_slots.models(reload=True)
    entry = {"name": "tiny-a.gguf", "backend": "llamacpp", "context": 256}
    _write(node, four_slots.url, folder, [entry], parallel=2)
    doc, _ = _plan(node)
    got = _estimate(doc, "tiny-a.gguf")
    want = _expected(path, ["-c", "2048", "-np", "4"])
    one_slot = _expected(path, ["-c", "256", "-np", "1"])
    assert got["source"] == "metadata" and got["estimated_bytes"] == want
    assert want > one_slot  # the three other slots' KV caches and state are counted
    assert any("router runs it at 512 tokens a slot" in w for w in doc["warnings"])
    said = [w for w in doc["warnings"] if w.startswith("backends.llamacpp.parallel is 2")]
    assert len(said) == 1 and "router runs 4 slots" in said[0]


def test_plan_uses_the_files_parallel_while_the_router_is_down(
    node: Node, folder: Path, tmp_path: Path
) -> None:
    path = folder / "tiny-a.gguf"
    write_tiny_gguf(path, name="tiny-a", context=4096)
    router = start_router(tmp_path / "router", folder)
    url = router.url
    router.close()  # down: the plan reads the folder, and the file says how it runs
    _write(
        node,
        url,
        folder,
        [{"name": "tiny-a.gguf", "backend": "llamacpp", "context": 512}],
        parallel=3,
    )
    doc, _ = _plan(node)
    want = _expected(path, ["-c", str(3 * 512), "-np", "3"], spec_context=512)
    assert _estimate(doc, "tiny-a.gguf")["estimated_bytes"] == want


def test_a_deeply_nested_gguf_in_the_folder_is_one_line_and_never_advertised(
    node: Node, folder: Path, tmp_path: Path
) -> None:
    corrupt_gguf(folder / "deep.gguf", kind="nested", size=100_000)
    write_tiny_gguf(folder / "tiny-a.gguf", name="tiny-a")
    router = start_router(tmp_path / "router", folder)
    try:
        router.models(reload=True)
        served = [
            {"name": "deep.gguf", "backend": "llamacpp"},
            {"name": "tiny-a.gguf", "backend": "llamacpp"},
        ]
        _write(node, router.url, folder, served)
        doc, _ = _plan(node)
        said = [w for w in doc["warnings"] if w.startswith("deep.gguf:")]
        assert len(said) == 1 and "\n" not in said[0], doc["warnings"]
        assert "nested" in said[0] and str(folder / "deep.gguf") in said[0]
        assert "deep.gguf" not in json.dumps(doc["advertised"])
        # the daemon reconciles over the same file and keeps running
        watch = node.popen("watch")
        try:
            time.sleep(4)
            assert watch.poll() is None, watch.communicate()[1]
        finally:
            watch.send_signal(signal.SIGTERM)
            _, err = watch.communicate(timeout=30)
        assert "Traceback" not in err and "RecursionError" not in err, err
        status = node.run("status", "--json")
        assert "Traceback" not in status.stderr, status.stderr
    finally:
        router.close()


def test_a_source_serving_a_deeply_nested_gguf_is_refused_in_one_line(
    node: Node, folder: Path, tmp_path: Path
) -> None:
    source = tmp_path / "deep-src.gguf"
    corrupt_gguf(source, kind="nested", size=100_000)
    router = start_router(tmp_path / "router", folder)
    try:
        entry = {"name": "deep.gguf", "backend": "llamacpp", "source": source.as_uri()}
        _write(node, router.url, folder, [entry])
        doc, out = _plan(node)
        assert out.returncode == 1
        said = [*doc.get("errors", []), *out.stderr.splitlines()]
        lines = [line for line in said if "deep" in line]
        assert lines and all("nested" in line and "\n" not in line for line in lines), said
        applied = node.run("apply", "--yes")
        assert applied.returncode == 1 and "Traceback" not in applied.stderr, applied.stderr
        assert not (folder / "deep.gguf").exists()
    finally:
        router.close()
