"""The real ``huggingface_hub`` client against the local Hub (``tests/servers/hub_server.py``).

``huggingface_hub`` reads ``HF_ENDPOINT`` and friends once, at import, so in-process calls pass
``endpoint=``, ``cache_dir=`` and ``token=`` explicitly; one test runs a subprocess with only
the environment (``HubServer.client_env``), as a CLI under test would.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from tests.servers.hub_harness import HubServer, gate_repo, start_hub_server, write_repo_file
from tests.servers.tinygguf import random_bytes

TOKEN = "hf_test_token"
REPO = "acme/tiny-GGUF"
BIG = "acme/big-GGUF"
GATED = "acme/gated-GGUF"
Q4 = b"GGUF" + random_bytes(200_000, 1)
Q8 = b"GGUF" + random_bytes(300_000, 2)
F16 = b"GGUF" + random_bytes(50_000, 3)
OLD_Q4 = b"GGUF" + random_bytes(150_000, 4)
README = b"# tiny\n"
# Larger than the client's 10 MiB read chunk: only whole chunks count as received on a cut.
BIG_DATA = random_bytes(12 << 20, 5)
PLAIN = b"GGUF" + random_bytes(100_000, 6)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub-root")
    write_repo_file(root, REPO, "tiny-Q4_K_M.gguf", Q4)
    write_repo_file(root, REPO, "tiny-Q8_0.gguf", Q8)
    write_repo_file(root, REPO, "extra/tiny-F16.gguf", F16)
    write_repo_file(root, REPO, "README.md", README)
    write_repo_file(root, REPO, "tiny-Q4_K_M.gguf", OLD_Q4, revision="v1")
    write_repo_file(root, BIG, "big.gguf", BIG_DATA)
    write_repo_file(root, GATED, "gated.gguf", Q4)
    gate_repo(root, GATED)
    (root / "_files" / "plain").mkdir(parents=True)
    (root / "_files" / "plain" / "tiny.gguf").write_bytes(PLAIN)
    return root


@pytest.fixture(scope="module")
def module_hub(tmp_path_factory: pytest.TempPathFactory, hub_root: Path) -> Iterator[HubServer]:
    with start_hub_server(tmp_path_factory.mktemp("hub"), hub_root, token=TOKEN) as server:
        yield server


@pytest.fixture
def hub(module_hub: HubServer) -> HubServer:
    module_hub.reset()
    return module_hub


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=False)


def download(hub: HubServer, cache: Path, repo: str, filename: str, **kwargs: Any) -> Path:
    kwargs.setdefault("token", False)
    return Path(hf_hub_download(repo, filename, endpoint=hub.url, cache_dir=cache, **kwargs))


def gets(hub: HubServer, suffix: str) -> list[dict[str, Any]]:
    return [r for r in hub.requests() if r["method"] == "GET" and r["path"].endswith(suffix)]


# downloads ----------------------------------------------------------------------------------------


def test_hf_hub_download_is_byte_identical_over_plain_http(hub: HubServer, tmp_path: Path) -> None:
    path = download(hub, tmp_path, REPO, "tiny-Q4_K_M.gguf")

    assert path.read_bytes() == Q4
    # The cache names the blob after the ETag: the sha256, as for an LFS file on the Hub.
    assert path.resolve().name == sha256(Q4)
    seen = [(r["method"], r["path"], r["status"]) for r in hub.requests()]
    assert seen == [
        ("HEAD", "/acme/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf", 200),
        ("GET", "/acme/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf", 200),
    ]
    # A second call is answered from the cache after one HEAD.
    hub.reset()
    assert download(hub, tmp_path, REPO, "tiny-Q4_K_M.gguf") == path
    assert [r["method"] for r in hub.requests()] == ["HEAD"]


def test_download_resumes_with_a_range_after_the_connection_is_cut(
    hub: HubServer, tmp_path: Path
) -> None:
    hub.fault("*/big.gguf", "cut", after_bytes=11 << 20)

    path = download(hub, tmp_path, BIG, "big.gguf")

    assert sha256(path.read_bytes()) == sha256(BIG_DATA)
    first, second = gets(hub, "/big.gguf")
    assert (first["status"], first["fault"], first["bytes"]) == (200, "cut", 11 << 20)
    # The client keeps the whole 10 MiB chunks it had and asks for the rest.
    assert second["range"] == f"bytes={10 << 20}-"
    assert (second["status"], second["bytes"]) == (206, len(BIG_DATA) - (10 << 20))


def test_a_500_on_head_is_retried(hub: HubServer, tmp_path: Path) -> None:
    hub.fault("*/tiny-Q8_0.gguf", "error", method="HEAD")

    assert download(hub, tmp_path, REPO, "tiny-Q8_0.gguf").read_bytes() == Q8
    heads = [r["status"] for r in hub.requests() if r["method"] == "HEAD"]
    assert heads == [500, 200]


def test_snapshot_download_fetches_only_matching_files(hub: HubServer, tmp_path: Path) -> None:
    folder = Path(
        snapshot_download(
            REPO,
            allow_patterns=["*Q8_0.gguf", "*.md"],
            endpoint=hub.url,
            cache_dir=tmp_path,
            token=False,
        )
    )

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", "tiny-Q8_0.gguf"]
    assert (folder / "tiny-Q8_0.gguf").read_bytes() == Q8
    downloaded = sorted(
        r["path"].rsplit("/", 1)[1]
        for r in hub.requests()
        if "/resolve/" in r["path"] and r["method"] == "GET"
    )
    assert downloaded == ["README.md", "tiny-Q8_0.gguf"]


def test_hf_endpoint_from_the_environment_in_a_subprocess(hub: HubServer, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from huggingface_hub import hf_hub_download\n"
        f"print(hf_hub_download({REPO!r}, 'tiny-Q4_K_M.gguf', revision='v1'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=hub.client_env(tmp_path / "hf-home"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.is_relative_to(tmp_path / "hf-home" / "hub")
    assert path.read_bytes() == OLD_Q4
    assert not any(r["auth"] for r in hub.requests())


# metadata -----------------------------------------------------------------------------------------


def test_model_info_gives_sizes_and_lfs_hashes(api: HfApi) -> None:
    info = api.model_info(REPO, files_metadata=True)

    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {
        "README.md",
        "extra/tiny-F16.gguf",
        "tiny-Q4_K_M.gguf",
        "tiny-Q8_0.gguf",
    }
    q4 = siblings["tiny-Q4_K_M.gguf"]
    assert q4.size == len(Q4)
    assert q4.lfs is not None
    assert (q4.lfs.sha256, q4.lfs.size) == (sha256(Q4), len(Q4))
    assert siblings["README.md"].lfs is None  # a small text file is a git blob
    assert siblings["README.md"].size == len(README)
    assert info.sha is not None and len(info.sha) == 40
    assert info.gated is False

    # Revisions resolve by branch name and by commit sha; another branch has another sha.
    assert api.model_info(REPO, revision="main").sha == info.sha
    assert api.model_info(REPO, revision=info.sha).sha == info.sha
    v1 = api.model_info(REPO, revision="v1", files_metadata=True)
    assert v1.sha != info.sha
    assert [(s.rfilename, s.size) for s in v1.siblings or []] == [("tiny-Q4_K_M.gguf", len(OLD_Q4))]


def test_paths_info_tree_and_file_metadata(api: HfApi, hub: HubServer) -> None:
    infos = api.get_paths_info(REPO, ["tiny-Q8_0.gguf", "extra", "missing.gguf"])
    assert [type(i) for i in infos] == [RepoFile, RepoFolder]
    q8 = infos[0]
    assert isinstance(q8, RepoFile)
    assert q8.size == len(Q8)
    assert q8.lfs is not None and q8.lfs.sha256 == sha256(Q8)

    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(tree) == {
        "README.md",
        "extra",
        "extra/tiny-F16.gguf",
        "tiny-Q4_K_M.gguf",
        "tiny-Q8_0.gguf",
    }
    assert isinstance(tree["extra"], RepoFolder)
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {"README.md", "extra", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"}
    assert [e.path for e in api.list_repo_tree(REPO, "extra")] == ["extra/tiny-F16.gguf"]

    sha = api.model_info(REPO).sha
    meta = get_hf_file_metadata(hf_hub_url(REPO, "tiny-Q8_0.gguf", endpoint=hub.url), token=False)
    assert (meta.size, meta.etag, meta.commit_hash) == (len(Q8), sha256(Q8), sha)
    assert meta.xet_file_data is None


def test_a_changed_file_is_a_new_commit(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    repo = "acme/moving-GGUF"
    write_repo_file(hub.root, repo, "m.gguf", Q4)
    before = api.model_info(repo).sha
    assert before is not None

    write_repo_file(hub.root, repo, "m.gguf", Q8)

    after = api.model_info(repo).sha
    assert after not in (None, before)
    assert download(hub, tmp_path, repo, "m.gguf").read_bytes() == Q8
    # The old commit is gone with its folder's old contents.
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path / "other", repo, "m.gguf", revision=before)


# errors -------------------------------------------------------------------------------------------


def test_missing_repo_revision_and_file_raise_the_clients_errors(
    api: HfApi, hub: HubServer, tmp_path: Path
) -> None:
    with pytest.raises(RepositoryNotFoundError) as missing_repo:
        download(hub, tmp_path, "acme/nope", "x.gguf")
    assert not isinstance(missing_repo.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("acme/nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, REPO, "tiny-Q4_K_M.gguf", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        download(hub, tmp_path, REPO, "missing.gguf")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "missing"))

    codes = {(r["status"], r["path"].split("?")[0]) for r in hub.requests()}
    assert (404, "/acme/tiny-GGUF/resolve/main/missing.gguf") in codes


def test_gated_repo_needs_the_token(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(GatedRepoError):
        download(hub, tmp_path, GATED, "gated.gguf")
    with pytest.raises(HfHubHTTPError) as wrong:
        download(hub, tmp_path, GATED, "gated.gguf", token="hf_wrong")
    assert wrong.value.response.status_code == 401
    assert not isinstance(wrong.value, GatedRepoError)

    path = download(hub, tmp_path, GATED, "gated.gguf", token=TOKEN)

    assert path.read_bytes() == Q4
    assert hub.requests()[-1]["auth"] is True
    # The metadata of a gated repository stays public, as on the Hub.
    assert HfApi(endpoint=hub.url, token=False).model_info(GATED).gated == "auto"


def test_gated_snapshot_download_without_token(hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(GatedRepoError):
        snapshot_download(GATED, endpoint=hub.url, cache_dir=tmp_path, token=False)


# plain files and faults ---------------------------------------------------------------------------


def test_plain_files_honour_range_and_404(hub: HubServer) -> None:
    url = hub.file_url("plain/tiny.gguf")
    with httpx.Client(trust_env=False, timeout=10) as http:
        head = http.head(url)
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == len(PLAIN)
        assert head.headers["Accept-Ranges"] == "bytes"
        assert head.content == b""

        whole = http.get(url)
        assert (whole.status_code, whole.content) == (200, PLAIN)

        part = http.get(url, headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, PLAIN[10:20])
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(PLAIN)}"
        assert http.get(url, headers={"Range": "bytes=-5"}).content == PLAIN[-5:]
        assert http.get(url, headers={"Range": f"bytes={len(PLAIN) - 3}-"}).content == PLAIN[-3:]

        beyond = http.get(url, headers={"Range": f"bytes={len(PLAIN)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["Content-Range"] == f"bytes */{len(PLAIN)}"

        assert http.get(hub.file_url("plain/missing.gguf")).status_code == 404
        assert http.head(hub.file_url("plain/missing.gguf")).status_code == 404
        assert http.get(hub.url + "/files/..%2F..%2Fetc%2Fpasswd").status_code == 404

    logged = [(r["method"], r["range"], r["status"]) for r in hub.requests()][:4]
    assert logged == [
        ("HEAD", None, 200),
        ("GET", None, 200),
        ("GET", "bytes=10-19", 206),
        ("GET", "bytes=-5", 206),
    ]


def test_plain_file_cut_and_500_once(hub: HubServer) -> None:
    url = hub.file_url("plain/tiny.gguf")
    hub.fault("/files/plain/*", "cut", after_bytes=1000)
    hub.fault("/files/plain/*", "error", status=503, times=1)
    with httpx.Client(trust_env=False, timeout=10) as http:
        assert http.get(url).status_code == 503
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(url)
        assert http.get(url).content == PLAIN  # each fault applied once

    assert [(r["status"], r["fault"], r["bytes"]) for r in hub.requests()] == [
        (503, "error", 0),
        (200, "cut", 1000),
        (200, None, len(PLAIN)),
    ]


def test_bandwidth_limit_and_stall(hub: HubServer) -> None:
    url = hub.file_url("plain/tiny.gguf")
    hub.fault("/files/plain/*", "slow", rate=400_000)
    with httpx.Client(trust_env=False, timeout=10) as http:
        began = time.monotonic()
        assert http.get(url).content == PLAIN
        assert time.monotonic() - began >= 0.2  # 100 KB at 400 KB/s

        hub.clear_faults()
        hub.fault("/files/plain/*", "stall", after_bytes=5000)
        clearer = threading.Timer(0.3, hub.clear_faults)
        clearer.start()
        try:
            began = time.monotonic()
            assert http.get(url).content == PLAIN
            assert time.monotonic() - began >= 0.25
        finally:
            clearer.cancel()
    assert [r["fault"] for r in hub.requests()] == ["slow", "stall"]
