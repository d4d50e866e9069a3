"""Downloads: progress, faults, shared downloads, cancellation, resume and restarts."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.servers.harness import OllamaServer, start_ollama_server
from tests.servers_test._support import model_spec, pull_lines, statuses, wait_until

BANDWIDTH = 1_000_000
CATALOGUE = {
    "models": {
        "big:1": model_spec(600_000),
        "small:1": model_spec(50_000, aliases=["small:latest"]),
    }
}


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[OllamaServer, httpx.Client]]:
    with (
        start_ollama_server(tmp_path, CATALOGUE, bandwidth=BANDWIDTH) as server,
        httpx.Client(base_url=server.url, trust_env=False, timeout=30) as http,
    ):
        yield server, http


def _weights(server: OllamaServer, model: str = "big:1") -> str:
    name, tag = model.split(":")
    url = f"{server.registry_url}/v2/library/{name}/manifests/{tag}"
    digest: str = httpx.get(url, trust_env=False).json()["layers"][0]["digest"]
    return digest


def _part(server: OllamaServer, digest: str) -> dict[str, Any] | None:
    path = server.models_dir / "blobs" / (digest.replace(":", "-") + "-partial-0")
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc


def _cdn_ranges(server: OllamaServer, digest: str) -> list[str]:
    return [
        r["range"]
        for r in server.registry_requests()
        if r["method"] == "GET" and r["path"] == f"/_cdn/{digest}"
    ]


def test_progress_omits_zero_fields_and_stall_repeats_lines(
    slow: tuple[OllamaServer, httpx.Client],
) -> None:
    server, http = slow
    digest = _weights(server)
    server.fault("big:1", "stall", after_bytes=0)
    seen: list[dict[str, Any]] = []
    with http.stream("POST", "/api/pull", json={"model": "big:1"}) as resp:
        for raw in resp.iter_lines():
            line = json.loads(raw)
            seen.append(line)
            if len(seen) == 6:
                server.clear_faults()
    assert seen[0] == {"status": "pulling manifest"}
    stalled = seen[1:6]
    assert (
        stalled == [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": 600_000}] * 5
    )
    grown = [ln["completed"] for ln in seen if ln.get("digest") == digest and "completed" in ln]
    assert grown == sorted(grown) and grown
    assert statuses(seen)[-3:] == ["verifying sha256 digest", "writing manifest", "success"]


def test_stall_mid_download_then_cancel_and_resume(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    digest = _weights(server)
    server.fault("big:1", "stall", after_bytes=200_000, times=1)
    repeats = 0
    with http.stream("POST", "/api/pull", json={"model": "big:1"}) as resp:
        for raw in resp.iter_lines():
            repeats += json.loads(raw).get("completed") == 200_000
            if repeats == 4:
                break  # a watchdog giving up: the client disconnects
    wait_until(lambda: (_part(server, digest) or {}).get("Completed") == 200_000)
    assert http.get("/api/tags").json() == {"models": []}
    server.reset_requests()
    status, lines = pull_lines(http, "big:1")  # the fault was for one pull only
    assert status == 200 and lines[-1] == {"status": "success"}
    assert _cdn_ranges(server, digest) == ["bytes=200000-599999"]
    assert next(ln["completed"] for ln in lines if ln.get("digest") == digest) >= 200_000
    assert not list((server.models_dir / "blobs").glob("*partial*"))


def test_error_mid_stream(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    digest = _weights(server)
    server.fault("big:1", "error_mid", after_bytes=150_000)
    status, lines = pull_lines(http, "big:1")
    assert status == 200
    assert lines[-1] == {"error": "max retries exceeded: unexpected EOF"}
    assert all(ln.get("completed", 0) <= 150_000 for ln in lines)
    client = ollama.Client(server.url, trust_env=False)
    with pytest.raises(ollama.ResponseError) as err:
        list(client.pull("big:1", stream=True))
    client.close()
    assert err.value.status_code == -1
    assert err.value.error.startswith("max retries exceeded")
    assert _part(server, digest) == {"N": 0, "Offset": 0, "Size": 600_000, "Completed": 150_000}
    server.clear_faults()
    server.reset_requests()
    assert pull_lines(http, "big:1")[1][-1] == {"status": "success"}
    assert _cdn_ranges(server, digest) == ["bytes=150000-599999"]


def test_digest_mismatch_deletes_the_blob(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    digest = _weights(server, "small:1")
    server.fault("small:1", "digest_mismatch", after_bytes=1000, times=1)
    _, lines = pull_lines(http, "small:1")
    assert statuses(lines)[-2] == "verifying sha256 digest"
    error = lines[-1]["error"]
    assert error.startswith(f"digest mismatch, file must be downloaded again: want {digest}, got ")
    assert not (server.models_dir / "blobs" / digest.replace(":", "-")).exists()
    assert pull_lines(http, "small:1")[1][-1] == {"status": "success"}


def test_manifest_faults_and_times(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    server.fault("small:1", "not_found", times=2)
    for _ in range(2):
        assert pull_lines(http, "small:1")[1] == [
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        ]
    server.fault("small:latest", "requires")
    blocking = http.post("/api/pull", json={"model": "small", "stream": False})
    assert blocking.status_code == 500
    assert blocking.json()["error"].startswith("pull model manifest: 412: \nThe model you are")
    assert pull_lines(http, "small:1")[1][-1] == {"status": "success"}


def test_slow_fault(tmp_path: Path) -> None:
    with (
        start_ollama_server(tmp_path, CATALOGUE) as server,
        httpx.Client(base_url=server.url, trust_env=False) as http,
    ):
        server.fault("small:1", "slow", after_bytes=10_000, rate=100_000)
        started = time.monotonic()
        assert pull_lines(http, "small:1")[1][-1] == {"status": "success"}
        assert time.monotonic() - started >= 0.35


def test_concurrent_pulls_share_one_download(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    digest = _weights(server)
    results: list[list[dict[str, Any]]] = []

    def run() -> None:
        results.append(pull_lines(http, "big:1")[1])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2
    for lines in results:
        assert lines[-1] == {"status": "success"}
        assert any(ln.get("digest") == digest and ln.get("completed") for ln in lines)
    assert len(_cdn_ranges(server, digest)) == 1


def test_client_timeout_cancels_a_blocking_pull(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    digest = _weights(server)
    with pytest.raises(httpx.ReadTimeout):
        http.post("/api/pull", json={"model": "big:1", "stream": False}, timeout=0.25)
    wait_until(lambda: 0 < (_part(server, digest) or {}).get("Completed", 0) < 600_000)
    first = _part(server, digest)
    time.sleep(0.3)
    assert _part(server, digest) == first
    assert http.get("/api/tags").json() == {"models": []}


def test_restart_keeps_inventory_and_partials(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    pull_lines(http, "small:1")
    http.post("/api/generate", json={"model": "small:1", "keep_alive": -1})
    before = http.get("/api/tags").json()
    digest = _weights(server)
    with http.stream("POST", "/api/pull", json={"model": "big:1"}) as resp:
        for raw in resp.iter_lines():
            if json.loads(raw).get("completed", 0) >= 100_000:
                server.restart()  # SIGTERM: the download stops and records its progress
                break
    assert http.get("/api/tags").json() == before
    assert http.get("/api/ps").json() == {"models": []}
    saved = (_part(server, digest) or {}).get("Completed", 0)
    assert saved >= 100_000
    assert pull_lines(http, "big:1")[1][-1] == {"status": "success"}
    assert _cdn_ranges(server, digest)[-1] == f"bytes={saved}-599999"


def test_kill_and_startup_prune(slow: tuple[OllamaServer, httpx.Client]) -> None:
    server, http = slow
    pull_lines(http, "small:1")
    blobs = server.models_dir / "blobs"
    stale, fresh = blobs / ("sha256-" + "a" * 64 + "-partial"), blobs / ("sha256-" + "b" * 64)
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    server.kill()
    server.start()
    assert not stale.exists() and fresh.exists()
    assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["small:1"]


def test_upstream_bump_prunes_only_unshared_layers(
    slow: tuple[OllamaServer, httpx.Client],
) -> None:
    server, http = slow
    pull_lines(http, "small:1")
    pull_lines(http, "small:latest")
    old = _weights(server, "small:1")
    new = server.bump_upstream("small:1")["weights"]
    assert new != old
    _, lines = pull_lines(http, "small:latest")
    assert "removing unused layers" in statuses(lines)
    blobs = server.models_dir / "blobs"
    assert (blobs / old.replace(":", "-")).exists()  # small:1 still uses it
    _, lines = pull_lines(http, "small:1")
    assert "removing unused layers" in statuses(lines)
    assert not (blobs / old.replace(":", "-")).exists()
    assert (blobs / new.replace(":", "-")).exists()


def test_download_continues_while_another_client_waits(
    slow: tuple[OllamaServer, httpx.Client],
) -> None:
    server, http = slow
    digest = _weights(server)
    second: list[list[dict[str, Any]]] = []
    joiner = threading.Thread(target=lambda: second.append(pull_lines(http, "big:1")[1]))
    manifests = "/v2/library/big/manifests/1"
    with http.stream("POST", "/api/pull", json={"model": "big:1"}) as resp:
        for raw in resp.iter_lines():
            if json.loads(raw).get("completed"):
                joiner.start()
                wait_until(
                    lambda: [r["path"] for r in server.registry_requests()].count(manifests) == 2
                )
                time.sleep(0.15)
                break  # the first client leaves; the second still waits on the download
    joiner.join(30)
    assert second and second[0][-1] == {"status": "success"}
    assert len(_cdn_ranges(server, digest)) == 1
