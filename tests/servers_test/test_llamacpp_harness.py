"""The llama-server router harness against the real binary, with tiny GGUF models.

The binary comes from ``tests.servers.llamabuild`` (cached; a cold build takes minutes, so run
``python -m tests.servers.llamabuild`` before the tests). Every model here loads in ~30 ms.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.servers import llamabuild
from tests.servers.llamacpp_harness import Router, RouterStartError, alias_of, start_router
from tests.servers.tinygguf import corrupt_gguf, param_count, write_tiny_gguf


@pytest.fixture(scope="module")
def llama_bin() -> Path:
    return llamabuild.build()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny-a.gguf", name="tiny-a")
    write_tiny_gguf(folder / "tiny-b.gguf", name="tiny-b", hidden=128, ff=256, f16=True)
    return folder


@pytest.fixture
def router(tmp_path: Path, models_dir: Path, llama_bin: Path) -> Iterator[Router]:
    with start_router(tmp_path / "router", models_dir, binary=llama_bin, models_max=2) as r:
        yield r


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_tiny_model_loads_and_reports_its_size(router: Router, models_dir: Path) -> None:
    assert {m["id"]: m["status"]["value"] for m in router.models()} == {
        "tiny-a": "unloaded",
        "tiny-b": "unloaded",
    }

    resp = router.load("tiny-a")
    assert (resp.status_code, resp.json()) == (200, {"success": True})
    entry = router.wait_status("tiny-a", "loaded")

    meta = entry["meta"]
    assert meta["size"] == 4 * param_count()  # all F32
    assert meta["n_params"] == param_count()
    assert (meta["n_ctx"], meta["n_vocab"], meta["ftype"]) == (256, 259, "all F32")
    chat = router.request(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny-a",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 4

    (child,) = router.children()
    assert alias_of(child) == "tiny-a"
    assert str(models_dir / "tiny-a.gguf") in child.cmdline()
    assert child.memory_info().rss > 0
    assert router.child("tiny-b") is None


def test_reload_discovers_a_renamed_file(router: Router, models_dir: Path) -> None:
    write_tiny_gguf(models_dir / "incoming.part", name="tiny-new", seed=7)
    (models_dir / "incoming.part").rename(models_dir / "tiny-new.gguf")

    # No file watcher: invisible until ?reload=1 (reference P5).
    assert "tiny-new" not in {m["id"] for m in router.models()}
    assert router.load("tiny-new").status_code == 404

    assert router.model("tiny-new") is None
    listed = {m["id"]: m["status"]["value"] for m in router.models(reload=True)}
    assert listed["tiny-new"] == "unloaded"
    assert router.load("tiny-new").status_code == 200
    assert router.wait_status("tiny-new", "loaded")["meta"]["n_params"] == param_count()


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_corrupt_gguf_is_listed_but_fails_to_load(
    router: Router, models_dir: Path, kind: str
) -> None:
    corrupt_gguf(models_dir / "broken.gguf", kind=kind)  # type: ignore[arg-type]
    assert "broken" in {m["id"] for m in router.models(reload=True)}

    # 200 means "spawned" (P6); the failure shows in the status.
    assert router.load("broken").status_code == 200
    status = router.wait_status("broken", "failed")["status"]

    assert status["value"] == "unloaded"
    assert status["exit_code"] == 1
    assert router.child("broken") is None
    assert "broken" in router.log()


def test_router_restart_on_the_same_port_forgets_loaded_models(router: Router) -> None:
    router.load("tiny-a")
    router.wait_status("tiny-a", "loaded")
    (child,) = router.children()
    url, first_pid = router.url, router.pid

    assert router.stop() == 0
    assert gone(child.pid)
    assert router.pid is None

    router.start()
    assert router.url == url
    assert router.pid != first_pid
    assert router.model("tiny-a")["status"]["value"] == "unloaded"  # type: ignore[index]
    assert router.children() == []


def test_kill_leaves_no_child_behind_and_start_works_again(router: Router) -> None:
    for model in ("tiny-a", "tiny-b"):
        router.load(model)
        router.wait_status(model, "loaded")
    children = router.children()
    assert sorted(alias_of(c) or "" for c in children) == ["tiny-a", "tiny-b"]

    assert router.kill() == -9

    # Reaped, not left as zombies: the harness re-parents the orphans to itself.
    assert not any(psutil.pid_exists(c.pid) for c in children)
    router.start()
    router.load("tiny-b")
    assert router.wait_status("tiny-b", "loaded")["meta"]["ftype"] == "F16"


def test_children_follow_loads_unloads_and_lru_eviction(router: Router, models_dir: Path) -> None:
    write_tiny_gguf(models_dir / "tiny-c.gguf", name="tiny-c", hidden=96, heads=6, kv_heads=3)
    router.models(reload=True)
    for model in ("tiny-a", "tiny-b", "tiny-c"):  # --models-max 2: tiny-a is evicted
        router.load(model)
        router.wait_status(model, "loaded")
    router.wait_status("tiny-a", "unloaded")
    assert sorted(alias_of(c) or "" for c in router.children()) == ["tiny-b", "tiny-c"]

    child_b = router.child("tiny-b")
    assert child_b is not None
    assert router.unload("tiny-b").status_code == 200
    router.wait_status("tiny-b", "unloaded")
    child_b.wait(5)
    assert [alias_of(c) for c in router.children()] == ["tiny-c"]


def test_no_process_is_left_when_a_test_fails(
    tmp_path: Path, models_dir: Path, llama_bin: Path
) -> None:
    pids: list[int] = []
    with (
        pytest.raises(RuntimeError, match="test failed"),
        start_router(tmp_path / "r", models_dir, binary=llama_bin) as router,
    ):
        router.load("tiny-a")
        router.wait_status("tiny-a", "loaded")
        pids = [router.pid or 0, *(c.pid for c in router.children())]
        raise RuntimeError("test failed")
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)


def test_start_failure_raises_with_the_log(tmp_path: Path, llama_bin: Path) -> None:
    with pytest.raises(RouterStartError, match="does not exist"):
        start_router(tmp_path / "r", tmp_path / "missing", binary=llama_bin)


def test_hermetic_environment_and_extra_args(
    tmp_path: Path, models_dir: Path, llama_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "4096")  # would reach the children (P4)
    with start_router(
        tmp_path / "r",
        models_dir,
        binary=llama_bin,
        extra_args=["--no-models-autoload"],
        env={"INFERNET_TEST_MARK": "1"},
    ) as router:
        chat = router.request(
            "POST",
            "/v1/chat/completions",
            json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert chat.status_code == 400  # not loaded, and autoload is off

        router.load("tiny-a")
        assert router.wait_status("tiny-a", "loaded")["meta"]["n_ctx"] == 256
        child = router.child("tiny-a")
        assert child is not None
        environ = child.environ()
        assert environ["LLAMA_CACHE"] == str(router.cache_dir)
        assert environ["INFERNET_TEST_MARK"] == "1"
        assert "LLAMA_ARG_CTX_SIZE" not in environ
        assert list(router.cache_dir.iterdir()) == []
