"""The stand-in's HTTP surface: routes, bodies, status codes and inventory endpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import ollama
import pytest

from tests.servers.harness import OllamaServer, start_ollama_server
from tests.servers_test._support import model_spec, pull_lines, statuses


def test_root_version_and_empty_inventory(http: httpx.Client, client: ollama.Client) -> None:
    root = http.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["content-type"].startswith("text/plain")
    assert http.head("/").status_code == 200
    assert http.get("/api/version").json() == {"version": "0.33.0-rc2"}
    assert http.head("/api/version").status_code == 200
    assert http.get("/api/tags").json() == {"models": []}
    assert http.head("/api/tags").status_code == 200
    assert http.get("/api/ps").json() == {"models": []}
    assert client.list().models == []
    assert client.ps().models == []


def test_gin_style_404_405_and_redirect(http: httpx.Client) -> None:
    missing = http.get("/api/nope")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert missing.headers["content-type"].startswith("text/plain")
    assert http.get("/_test").status_code == 404
    for method, path in [("GET", "/api/pull"), ("POST", "/api/tags"), ("HEAD", "/api/ps")]:
        resp = http.request(method, path)
        assert resp.status_code == 405, (method, path)
        if method != "HEAD":
            assert resp.text == "405 method not allowed"
    moved = http.get("/api/tags/")
    assert (moved.status_code, moved.headers["location"]) == (301, "/api/tags")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/show"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("POST", "/api/embed"),
    ],
)
def test_missing_request_body(http: httpx.Client, method: str, path: str) -> None:
    resp = http.request(method, path)
    assert resp.status_code == 400
    assert resp.json() == {"error": "missing request body"}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"  \n", "missing request body"),
        (b'{"model":', "unexpected EOF"),
        (b'{"model" 1}', "invalid character '1' after object key"),
        (b'{"model":"a",}', "invalid character '}' looking for beginning of object key string"),
        (b"{'model':1}", "invalid character '\\'' looking for beginning of object key string"),
        (b"nope", "invalid character 'o' in literal null (expecting 'u')"),
        (
            b'{"model": 5}',
            "json: cannot unmarshal number into Go struct field PullRequest.model of type string",
        ),
        (
            b'{"model": "x", "stream": "no"}',
            "json: cannot unmarshal string into Go struct field PullRequest.stream of type bool",
        ),
        (b"[1]", "json: cannot unmarshal array into Go value of type api.PullRequest"),
    ],
)
def test_decoder_errors(http: httpx.Client, body: bytes, error: str) -> None:
    resp = http.post("/api/pull", content=body)
    assert resp.status_code == 400
    assert resp.json() == {"error": error}


@pytest.mark.parametrize("name", ["", "bad name", "a/b/c/d", "x@y", "m:", ":t", "-x", "a" * 81])
def test_invalid_names(http: httpx.Client, name: str) -> None:
    resp = http.post("/api/pull", json={"model": name})
    assert (resp.status_code, resp.json()) == (400, {"error": "invalid model name"})
    if name:
        show = http.post("/api/show", json={"model": name})
        assert (show.status_code, show.json()) == (400, {"error": "invalid model name"})
        delete = http.request("DELETE", "/api/delete", json={"model": name})
        assert delete.json() == {"error": f"name {json.dumps(name)} is invalid"}
        copy = http.post("/api/copy", json={"source": name, "destination": "ok"})
        assert copy.json() == {"error": f"source {json.dumps(name)} is invalid"}


def test_pull_list_show_and_fields(
    server: OllamaServer, http: httpx.Client, client: ollama.Client
) -> None:
    status, lines = pull_lines(http, "qwen2.5:0.5b")
    assert status == 200
    assert statuses(lines)[0] == "pulling manifest"
    assert statuses(lines)[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    for line in lines:
        assert set(line) <= {"status", "digest", "total", "completed"}
        assert all(line[k] for k in ("digest", "total", "completed") if k in line)

    raw = httpx.get(f"{server.registry_url}/v2/library/qwen2.5/manifests/0.5b", trust_env=False)
    assert raw.headers["content-type"].startswith("text/plain")
    assert "content-length" not in raw.headers
    manifest = raw.json()
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    kinds = [la["mediaType"].rsplit(".", 1)[1] for la in manifest["layers"]]
    assert kinds == ["model", "license", "template", "params"]

    (entry,) = http.get("/api/tags").json()["models"]
    assert entry["name"] == entry["model"] == "qwen2.5:0.5b"
    assert entry["digest"] == hashlib.sha256(raw.content).hexdigest()
    assert entry["size"] == manifest["config"]["size"] + sum(
        la["size"] for la in manifest["layers"]
    )
    assert entry["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "qwen2",
        "families": ["qwen2"],
        "parameter_size": "494.03M",
        "quantization_level": "Q4_K_M",
        "context_length": 32768,
        "embedding_length": 896,
    }
    stored = server.models_dir / "manifests/registry.ollama.ai/library/qwen2.5/0.5b"
    assert stored.read_bytes() == raw.content
    for layer in [*manifest["layers"], manifest["config"]]:
        blob = server.models_dir / "blobs" / layer["digest"].replace(":", "-")
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == layer["digest"]

    (model,) = client.list().models
    assert model.model == "qwen2.5:0.5b" and model.size == entry["size"]
    shown = client.show("qwen2.5:0.5b")
    weights = manifest["layers"][0]["digest"].replace(":", "-")
    assert f"FROM {server.models_dir}/blobs/{weights}\n" in (shown.modelfile or "")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "qwen2"
    assert shown.modelinfo["qwen2.attention.head_count_kv"] == 2
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None
    verbose = http.post("/api/show", json={"name": "qwen2.5:0.5b", "verbose": True}).json()
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 8
    assert 'stop                           "<|end|>"' in verbose["parameters"]


def test_show_errors_and_embedding_capabilities(http: httpx.Client) -> None:
    assert http.post("/api/show", json={}).json() == {"error": "model is required"}
    missing = http.post("/api/show", json={"model": "foo"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'foo:latest' not found"})
    pull_lines(http, "all-minilm")
    shown = http.post("/api/show", json={"model": "all-minilm"}).json()
    assert shown["capabilities"] == ["embedding"]
    assert shown["details"]["parameter_size"] == "23M"
    assert "template" not in shown
    assert shown["model_info"]["bert.pooling_type"] == 1


def test_repull_is_all_cache_hits(server: OllamaServer, http: httpx.Client) -> None:
    pull_lines(http, "llama3.2:1b")
    before = http.get("/api/tags").json()["models"][0]
    server.reset_requests()
    status, lines = pull_lines(http, "llama3.2:1b")
    assert status == 200
    layer_lines = [ln for ln in lines if "digest" in ln]
    assert len(layer_lines) == 5
    assert all(ln["completed"] == ln["total"] for ln in layer_lines)
    assert [r["method"] for r in server.registry_requests()] == ["GET"]
    after = http.get("/api/tags").json()["models"][0]
    assert after["digest"] == before["digest"]
    assert after["modified_at"] != before["modified_at"]


def test_alias_shares_manifest_and_downloads_nothing(
    server: OllamaServer, http: httpx.Client
) -> None:
    pull_lines(http, "qwen2.5:0.5b")
    server.reset_requests()
    status, lines = pull_lines(http, "qwen2.5")
    assert status == 200 and statuses(lines)[-1] == "success"
    assert not [r for r in server.registry_requests() if "/blobs/" in r["path"]]
    models = {m["name"]: m for m in http.get("/api/tags").json()["models"]}
    assert set(models) == {"qwen2.5:0.5b", "qwen2.5:latest"}
    assert models["qwen2.5:0.5b"]["digest"] == models["qwen2.5:latest"]["digest"]


def test_delete_refcounts_blobs(server: OllamaServer, http: httpx.Client) -> None:
    pull_lines(http, "qwen2.5:0.5b")
    pull_lines(http, "qwen2.5:latest")
    blobs = server.models_dir / "blobs"
    count = len(list(blobs.iterdir()))
    first = http.request("DELETE", "/api/delete", json={"model": "qwen2.5:latest"})
    assert (first.status_code, first.content) == (200, b"")
    assert len(list(blobs.iterdir())) == count
    again = http.request("DELETE", "/api/delete", json={"model": "qwen2.5:latest"})
    assert (again.status_code, again.json()) == (404, {"error": "model 'qwen2.5:latest' not found"})
    gone = http.request("DELETE", "/api/delete", json={"name": "Qwen2.5:0.5B"})
    assert gone.status_code == 200
    assert list(blobs.iterdir()) == []
    assert list((server.models_dir / "manifests").iterdir()) == []
    assert http.request("DELETE", "/api/delete", json={}).json() == {"error": "model is required"}


def test_copy(http: httpx.Client, client: ollama.Client) -> None:
    pull_lines(http, "smollm2:135m")
    ok = http.post("/api/copy", json={"source": "smollm2:135m", "destination": "mine/small:v1"})
    assert (ok.status_code, ok.content) == (200, b"")
    digests = {m.model: m.digest for m in client.list().models}
    assert digests["mine/small:v1"] == digests["smollm2:135m"]
    assert client.copy("smollm2:135m", "smollm2:135m").status == "success"
    missing = http.post("/api/copy", json={"source": "nope", "destination": "x"})
    assert (missing.status_code, missing.json()) == (404, {"error": 'model "nope" not found'})
    bad = http.post("/api/copy", json={"source": "smollm2:135m", "destination": "a/b/c/d"})
    assert bad.json() == {"error": 'destination "a/b/c/d" is invalid'}


def test_names_are_case_insensitive_and_keep_their_casing(http: httpx.Client) -> None:
    pull_lines(http, "Qwen2.5:0.5B")
    assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["Qwen2.5:0.5B"]
    pull_lines(http, "qwen2.5:0.5b")
    assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["Qwen2.5:0.5B"]
    assert http.post("/api/show", json={"model": "QWEN2.5:0.5b"}).status_code == 200


def test_hf_names_and_head_blobs(server: OllamaServer, http: httpx.Client) -> None:
    name = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    pull_lines(http, name)
    assert [m["name"] for m in http.get("/api/tags").json()["models"]] == [name]
    path = "manifests/hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF/Q4_K_M"
    manifest = json.loads((server.models_dir / path).read_bytes())
    digest = manifest["layers"][0]["digest"]
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert http.head(f"/api/blobs/sha256:{'0' * 64}").status_code == 404
    assert http.head("/api/blobs/sha256:xyz").status_code == 400


def test_unknown_model_errors_after_first_line(http: httpx.Client, client: ollama.Client) -> None:
    status, lines = pull_lines(http, "nope:1b")
    assert status == 200
    assert lines == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull("nope:1b", stream=True))
    assert streamed.value.status_code == -1
    with pytest.raises(ollama.ResponseError) as blocking:
        client.pull("nope:1b")
    assert blocking.value.status_code == 500
    assert blocking.value.error == "pull model manifest: file does not exist"
    ok = http.post("/api/pull", json={"model": "smollm2:135m", "stream": False})
    assert (ok.status_code, ok.json()) == (200, {"status": "success"})


def test_request_log(server: OllamaServer, http: httpx.Client) -> None:
    http.get("/api/tags")
    http.post("/api/show", json={"model": "x"})
    log = server.requests()
    assert [{k: r[k] for k in ("method", "path", "body")} for r in log] == [
        {"method": "GET", "path": "/api/tags", "body": None},
        {"method": "POST", "path": "/api/show", "body": {"model": "x"}},
    ]
    assert log[0]["time"] <= log[1]["time"]  # ordering across servers is by wall clock
    server.reset_requests()
    assert server.requests() == []


def test_requires_gate_and_upstream_changes(tmp_path: Path) -> None:
    catalogue = {"models": {"future:1b": model_spec(requires="0.40.0"), "plain:1b": model_spec()}}
    with (
        start_ollama_server(tmp_path, catalogue) as server,
        httpx.Client(base_url=server.url, trust_env=False) as http,
    ):
        _, lines = pull_lines(http, "future:1b")
        assert lines[-1]["error"].startswith(
            "pull model manifest: 412: \nThe model you are attempting to pull requires a newer"
        )
        server.remove_upstream("plain:1b")
        assert pull_lines(http, "plain:1b")[1][-1] == {
            "error": "pull model manifest: file does not exist"
        }
        server.add_upstream("new/model:2", model_spec(weights_size=5000))
        assert pull_lines(http, "new/model:2")[1][-1] == {"status": "success"}


def test_host_header_check(http: httpx.Client) -> None:
    assert http.get("/api/version", headers={"Host": "evil.example.com"}).status_code == 403
    assert http.get("/api/version", headers={"Host": "localhost:11434"}).status_code == 200
    assert http.get("/api/version", headers={"Host": "10.1.2.3:11434"}).status_code == 200
    assert http.get("/api/version", headers={"Host": "box.internal"}).status_code == 200
