"""Pure parts of the llama.cpp backend: source URLs, the router's model list, file types."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from reconciler.backends import sources
from reconciler.backends.gguf.header import file_type_name
from reconciler.backends.llamacpp.router import parse_models
from reconciler.errors import BackendError, PullFailed
from reconciler.model import ModelFacts


@pytest.mark.parametrize(
    ("url", "scheme", "repo", "revision", "path"),
    [
        (
            "hf://Qwen/Qwen2.5-7B-Instruct-GGUF/q4.gguf",
            "hf",
            "Qwen/Qwen2.5-7B-Instruct-GGUF",
            None,
            "q4.gguf",
        ),
        ("hf://org/repo@v1.0/sub/dir/m.gguf", "hf", "org/repo", "v1.0", "sub/dir/m.gguf"),
        ("hf://org/repo@refs%2Fpr%2F3/m.gguf", "hf", "org/repo", "refs/pr/3", "m.gguf"),
        ("https://cdn.example/m.gguf?x=1", "https", None, None, "https://cdn.example/m.gguf?x=1"),
        ("file:///srv/models/m%20x.gguf", "file", None, None, "/srv/models/m x.gguf"),
    ],
)
def test_sources_parse(url: str, scheme: str, repo: str, revision: str, path: str) -> None:
    got = sources.parse(url)
    assert (got.scheme, got.repo, got.revision, got.path) == (scheme, repo, revision, path)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("hf://org/../etc/passwd.gguf", "'..'"),
        ("hf://org/repo", "use hf://org/repo/file.gguf"),
        ("hf://datasets/org/repo/x.gguf", "model repositories only"),
        ("file://relative/x.gguf", "absolute local path"),
        ("ftp://example.com/x.gguf", "only hf://, https://"),
        ("https:///x.gguf", "no host"),
    ],
)
def test_sources_refuse_bad_urls_in_one_line(url: str, message: str) -> None:
    with pytest.raises(BackendError) as err:
        sources.parse(url)
    assert message in str(err.value)
    assert url in str(err.value)
    assert "\n" not in str(err.value)


def test_router_model_list_parses_loaded_failed_and_args() -> None:
    raw = {
        "data": [
            {
                "id": "tiny-a",
                "status": {
                    "value": "loaded",
                    "args": [
                        "llama-server",
                        "--port",
                        "41234",
                        "--alias",
                        "tiny-a",
                        "--ctx-size",
                        "256",
                        "--model",
                        "/m/tiny-a.gguf",
                        "--parallel",
                        "2",
                    ],
                },
                "meta": {"n_ctx": 256, "size": 362496},
            },
            {
                "id": "trunc",
                "status": {
                    "value": "unloaded",
                    "failed": True,
                    "exit_code": 1,
                    "args": ["llama-server", "--port", "0", "-c", "512"],
                },
            },
        ]
    }
    a, b = parse_models(raw)
    assert (a.status, a.port, a.ctx, a.parallel, a.weights, a.path) == (
        "loaded",
        41234,
        256,
        2,
        362496,
        "/m/tiny-a.gguf",
    )
    assert (b.failed, b.exit_code, b.port, b.ctx) == (True, 1, None, 512)


@pytest.mark.parametrize(
    ("file_type", "name"), [(0, "F32"), (1, "F16"), (15, "Q4_K_M"), (7, "Q8_0"), (32, "BF16")]
)
def test_file_type_names_the_quantization(file_type: int, name: str) -> None:
    assert file_type_name(file_type) == name


def test_unknown_file_type_is_not_a_guess() -> None:
    assert file_type_name(9999) is None
    assert file_type_name(None) is None


def _file_source(tmp_path: Path, data: bytes) -> tuple[sources.Source, sources.Remote]:
    src_path = tmp_path / "upstream.gguf"
    src_path.write_bytes(data)
    source = sources.parse(src_path.as_uri())
    remote = sources.Remote(len(data), None, "v1", str(src_path), {}, ModelFacts())
    return source, remote


def test_fetch_discards_a_non_gguf_download(tmp_path: Path) -> None:
    source, remote = _file_source(tmp_path, b"not a model at all" * 100)
    dest = tmp_path / "models" / "x.gguf"
    dest.parent.mkdir()
    with pytest.raises(PullFailed, match="not a valid GGUF"):
        sources.fetch(
            source,
            remote,
            dest,
            http=None,
            expected_sha256=None,  # type: ignore[arg-type]
            progress=lambda *_: None,
            cancel=threading.Event(),
        )
    assert list(dest.parent.iterdir()) == []


def test_fetch_checks_the_expected_checksum_before_the_rename(tmp_path: Path) -> None:
    data = b"GGUF" + bytes(200)
    source, remote = _file_source(tmp_path, data)
    dest = tmp_path / "models" / "x.gguf"
    dest.parent.mkdir()
    with pytest.raises(PullFailed, match="checksum mismatch") as err:
        sources.fetch(
            source,
            remote,
            dest,
            http=None,
            expected_sha256="00" * 32,  # type: ignore[arg-type]
            progress=lambda *_: None,
            cancel=threading.Event(),
        )
    assert hashlib.sha256(data).hexdigest() in str(err.value)
    assert list(dest.parent.iterdir()) == []
