"""Loading, keep_alive, expiry and eviction in the stand-in's scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.servers.harness import DEFAULT_CATALOGUE, OllamaServer, start_ollama_server
from tests.servers_test._support import pull_lines, statuses, wait_until

MIB = 1 << 20


def _ps(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in http.get("/api/ps").json()["models"]}


def _expires(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["expires_at"])


def _load(http: httpx.Client, model: str, keep_alive: Any = None, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"model": model, **extra}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return http.post("/api/generate", json=body)


def test_pin_unpin_and_unload(http: httpx.Client, client: ollama.Client) -> None:
    pull_lines(http, "qwen2.5:0.5b")
    loaded = client.generate(model="qwen2.5:0.5b", keep_alive=-1)
    assert loaded.done_reason == "load" and loaded.response == ""
    (entry,) = client.ps().models
    assert entry.expires_at is not None and entry.expires_at.year >= 2300
    assert entry.digest == client.list().models[0].digest
    assert entry.context_length == 32768
    assert entry.size == entry.size_vram and entry.size is not None and entry.size > 0

    assert _load(http, "qwen2.5:0.5b", "5m").json()["done_reason"] == "load"
    soon = datetime.now(UTC) + timedelta(minutes=5, seconds=5)
    assert _expires(_ps(http)["qwen2.5:0.5b"]) < soon
    _load(http, "qwen2.5:0.5b")  # no keep_alive: the duration stays as it was
    assert _expires(_ps(http)["qwen2.5:0.5b"]) < soon

    unloaded = http.post("/api/generate", json={"model": "qwen2.5:0.5b", "keep_alive": 0})
    assert unloaded.json()["done_reason"] == "unload"
    assert _ps(http) == {}
    again = http.post("/api/chat", json={"model": "qwen2.5:0.5b", "keep_alive": 0})
    assert again.json()["message"] == {"role": "assistant", "content": ""}
    assert again.json()["done_reason"] == "unload"


@pytest.mark.parametrize(
    ("keep_alive", "error"),
    [
        ("3600", 'time: missing unit in duration "3600"'),
        ("abc", 'time: invalid duration "abc"'),
        ("5 m", 'time: unknown unit " m" in duration "5 m"'),
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
    ],
)
def test_bad_keep_alive(http: httpx.Client, keep_alive: Any, error: str) -> None:
    resp = _load(http, "qwen2.5:0.5b", keep_alive)
    assert (resp.status_code, resp.json()) == (400, {"error": error})


def test_keep_alive_expiry_unloads(http: httpx.Client) -> None:
    pull_lines(http, "smollm2:135m")
    assert _load(http, "smollm2:135m", "400ms").status_code == 200
    assert "smollm2:135m" in _ps(http)
    wait_until(lambda: _ps(http) == {}, timeout=3)
    assert _load(http, "smollm2:135m", 0.3).status_code == 200
    wait_until(lambda: _ps(http) == {}, timeout=3)


def test_env_default_keep_alive(tmp_path: Path) -> None:
    with (
        start_ollama_server(tmp_path, DEFAULT_CATALOGUE, env={"OLLAMA_KEEP_ALIVE": "-1"}) as server,
        httpx.Client(base_url=server.url, trust_env=False) as http,
    ):
        pull_lines(http, "smollm2:135m")
        _load(http, "smollm2:135m")
        assert _expires(_ps(http)["smollm2:135m"]).year >= 2300


def test_embedding_models(http: httpx.Client) -> None:
    pull_lines(http, "all-minilm")
    gen = http.post("/api/generate", json={"model": "all-minilm"})
    assert (gen.status_code, gen.json()) == (
        400,
        {"error": '"all-minilm" does not support generate'},
    )
    chat = http.post("/api/chat", json={"model": "all-minilm", "messages": []})
    assert chat.json() == {"error": '"all-minilm" does not support chat'}
    embed = http.post("/api/embed", json={"model": "all-minilm"})
    assert embed.json() == {"model": "all-minilm", "embeddings": []}
    assert _ps(http)["all-minilm:latest"]["context_length"] == 512
    vectors = http.post("/api/embed", json={"model": "all-minilm", "input": ["a", "b"]}).json()
    assert [len(v) for v in vectors["embeddings"]] == [384, 384]
    missing = http.post("/api/embed", json={"model": "nope"})
    assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}
    assert http.post("/api/generate", json={"model": "nope"}).status_code == 404


def test_runner_shared_by_alias_and_kept_after_delete(http: httpx.Client) -> None:
    pull_lines(http, "qwen2.5:0.5b")
    pull_lines(http, "qwen2.5:latest")
    _load(http, "qwen2.5:0.5b", -1)
    _load(http, "qwen2.5:latest", "10m")
    (entry,) = http.get("/api/ps").json()["models"]
    assert entry["name"] == "qwen2.5:0.5b"
    http.request("DELETE", "/api/delete", json={"model": "qwen2.5:0.5b"})
    http.request("DELETE", "/api/delete", json={"model": "qwen2.5:latest"})
    assert "qwen2.5:0.5b" in _ps(http)


def test_num_ctx_option_and_reload(http: httpx.Client) -> None:
    pull_lines(http, "llama3.2:1b")
    _load(http, "llama3.2:1b", -1, options={"num_ctx": 2048})
    small = _ps(http)["llama3.2:1b"]
    assert small["context_length"] == 2048
    _load(http, "llama3.2:1b", options={"num_ctx": 8192})
    big = _ps(http)["llama3.2:1b"]
    assert big["context_length"] == 8192 and big["size"] > small["size"]
    bad = _load(http, "llama3.2:1b", options={"num_ctx": "big"})
    assert bad.json() == {"error": 'option "num_ctx" must be of type integer'}


def test_stale_runner_after_upstream_update(server: OllamaServer, http: httpx.Client) -> None:
    pull_lines(http, "smollm2:135m")
    _load(http, "smollm2:135m", -1)
    old = _ps(http)["smollm2:135m"]["digest"]
    server.bump_upstream("smollm2:135m")
    _, lines = pull_lines(http, "smollm2:135m")
    assert "removing unused layers" in statuses(lines)
    new = http.get("/api/tags").json()["models"][0]["digest"]
    assert new != old and _ps(http)["smollm2:135m"]["digest"] == old
    _load(http, "smollm2:135m", "1m")
    digests = sorted(m["digest"] for m in http.get("/api/ps").json()["models"])
    assert digests == sorted([old, new])


@pytest.fixture
def small_gpu(tmp_path: Path) -> Iterator[tuple[OllamaServer, httpx.Client]]:
    with (
        start_ollama_server(tmp_path, DEFAULT_CATALOGUE, vram_bytes=250 * MIB) as server,
        httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        for model in ("llama3.2:1b", "qwen2.5:0.5b", "smollm2:135m"):
            pull_lines(http, model)
        yield server, http


def test_eviction_takes_shortest_duration_first(
    small_gpu: tuple[OllamaServer, httpx.Client],
) -> None:
    _, http = small_gpu
    _load(http, "llama3.2:1b", "10m")  # 4096 ctx on a small GPU: ~128 MiB
    _load(http, "qwen2.5:0.5b", "1m")  # ~48 MiB: fits in 80 % of what is free
    assert set(_ps(http)) == {"llama3.2:1b", "qwen2.5:0.5b"}
    _load(http, "smollm2:135m", "5m")  # ~90 MiB: qwen (shortest) must go
    assert set(_ps(http)) == {"llama3.2:1b", "smollm2:135m"}
    _load(http, "qwen2.5:0.5b", -1)  # pinned is only a sort key: smollm (5m) goes first
    assert set(_ps(http)) == {"llama3.2:1b", "qwen2.5:0.5b"}
    _load(http, "smollm2:135m", "20m")  # now llama (10m) is the shortest that frees enough
    assert set(_ps(http)) == {"qwen2.5:0.5b", "smollm2:135m"}


def test_spill_and_evict_endpoint(small_gpu: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = small_gpu
    _load(http, "llama3.2:1b", -1, options={"num_ctx": 16384})  # ~512 MiB alone: spills
    entry = _ps(http)["llama3.2:1b"]
    assert entry["size_vram"] == 250 * MIB < entry["size"]
    assert server.evict("llama3.2:1b") is True
    assert _ps(http) == {}
    assert server.evict("llama3.2:1b") is False


def test_max_loaded_runners(http: httpx.Client) -> None:
    durations = {"llama3.2:1b": "4m", "qwen2.5:0.5b": "3m", "smollm2:135m": "2m"}
    for model, keep_alive in [*durations.items(), ("llama3.2:1b-instruct-q8_0", "1m")]:
        pull_lines(http, model)
        _load(http, model, keep_alive)
    assert set(_ps(http)) == {"llama3.2:1b", "qwen2.5:0.5b", "llama3.2:1b-instruct-q8_0"}
    names = [m["name"] for m in http.get("/api/ps").json()["models"]]
    assert names == ["llama3.2:1b", "qwen2.5:0.5b", "llama3.2:1b-instruct-q8_0"]


def test_official_client_inference_calls(http: httpx.Client, client: ollama.Client) -> None:
    pull_lines(http, "all-minilm")
    pull_lines(http, "qwen2.5:0.5b")
    assert client.embed("all-minilm").embeddings == []
    assert [len(v) for v in client.embed("all-minilm", input=["hi"]).embeddings] == [384]
    assert client.chat("qwen2.5:0.5b", keep_alive="10m").done_reason == "load"
    assert client.chat("qwen2.5:0.5b", keep_alive=0).done_reason == "unload"
    chunks = list(client.generate("qwen2.5:0.5b", prompt="hi", stream=True))
    assert "".join(c.response for c in chunks) == "ok" and chunks[-1].done
    reply = client.chat("qwen2.5:0.5b", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "You said: hi That is all."
    assert client.delete("all-minilm").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("all-minilm")
    assert (err.value.status_code, err.value.error) == (404, "model 'all-minilm' not found")
