"""Where a llama.cpp GGUF file comes from, what it weighs, and how it is fetched.

Sources are ``hf://org/repo[@revision]/path/file.gguf``, ``https://…``/``http://…`` and
``file://…``. Before a download, ``probe`` answers the size (HEAD / hub metadata) and the GGUF
metadata (a ranged read of the first bytes), so the budget is checked before a byte lands.

``fetch`` writes to a hidden temporary name that does not end in ``.gguf`` (the llama.cpp
router lists every ``*.gguf`` on a reload, so it must never see half a file), resumes an
interrupted download with an HTTP range when the server still has the same file, checks the
SHA-256 (the file's ``sha256:`` and, for the hub, the LFS checksum) and the GGUF header, and
only then renames it into place.

For the hub, ``huggingface_hub`` does what it is best at: the URL for a revision
(``hf_hub_url``), the metadata call with its redirects, errors and commit (``get_hf_file_metadata``)
and the auth headers (``HF_TOKEN``). The bytes are streamed here rather than through
``hf_hub_download``: its cache and ``local_dir`` layouts put symlinks or ``.gguf`` names inside
the served folder and report progress through tqdm, while the rules above and the executor's
progress callback need the one code path shared with https:// sources.

A source is a peer: what it announces (HEAD, the hub's metadata) is what the plan budgeted,
so a download stops at that size, and any mismatch (more bytes, fewer, or a GET announcing
another length) deletes the partial file. While bytes land, free space is checked against
``budget.disk_reserve``: a download that would eat into it is stopped and deleted. Only a cut
connection keeps the partial file, for a ranged resume. The answer must start, and keep
coming, within the stall timeout (``reconciler.httpsafe``: at least 64 KiB per period), so a
trickle fails like a stall. URLs are shown without credentials or query string
(``httpsafe.redact``): a signed URL's signature is a password.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from reconciler import httpsafe, limits
from reconciler.backends import hub, ranged
from reconciler.backends.gguf import meta as ggufmeta
from reconciler.errors import BackendError, ModelNotFound, PullFailed, TransientBackendError
from reconciler.model import ModelFacts
from reconciler.units import format_size

Progress = Callable[[str, int | None, int | None], None]
CHUNK = 1 << 20
DISK_CHECK_BYTES = 1 << 20  # free space is checked again after this much is written
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    """A parsed source URL."""

    url: str  # as the file writes it
    scheme: str  # hf | https | http | file
    repo: str | None = None  # hf: org/repo
    revision: str | None = None  # hf: branch, tag or commit
    path: str = ""  # hf: path in the repo; file: local path; http(s): the URL

    @property
    def filename(self) -> str:
        """The last path component (what the file is called upstream)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def shown(self) -> str:
        """The URL as it may be logged, stored, shown or sent: no credentials, no query."""
        return httpsafe.redact(self.url)


@dataclass(frozen=True)
class Remote:
    """What a source holds right now."""

    size: int | None
    sha256: str | None  # known checksum (hub LFS), lower-case hex
    validator: str  # changes when the upstream file changes (ETag, commit, size+mtime)
    url: str  # what is actually fetched (hub resolve URL, the https URL, or a path)
    headers: dict[str, str]
    facts: ModelFacts


def parse(url: str) -> Source:
    """Split a source URL; ``BackendError`` naming the URL when it can't be used."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise BackendError(
                f"source {httpsafe.redact(url)}: use an absolute local path, file:///path/x.gguf"
            )
        return Source(url, "file", path=path)
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise BackendError(f"source {httpsafe.redact(url)}: the URL has no host")
        return Source(url, scheme, path=url)
    if scheme == "hf":
        # hf://org/repo[@revision]/path — HfFileSystem's form; a revision with '/' is %2F-quoted
        rest = (parts.netloc + parts.path).strip("/")
        bits = rest.split("/")
        if len(bits) < 3 or bits[0] in ("datasets", "spaces"):
            raise BackendError(
                f"source {httpsafe.redact(url)}: use hf://org/repo/file.gguf or "
                "hf://org/repo@revision/file.gguf (model repositories only)"
            )
        repo_name, _, revision = bits[1].partition("@")
        path = "/".join(bits[2:])
        if ".." in bits or not repo_name:
            raise BackendError(
                f"source {httpsafe.redact(url)}: '..' and empty parts are not allowed"
            )
        return Source(
            url, "hf", repo=f"{bits[0]}/{repo_name}", revision=unquote(revision) or None, path=path
        )
    raise BackendError(
        f"source {httpsafe.redact(url)}: only hf://, https://, http:// and file:// are supported"
    )


def _hub_remote(source: Source, http: httpx.Client) -> tuple[int | None, str | None, str, str]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    assert source.repo is not None
    url = hf_hub_url(source.repo, source.path, revision=source.revision, endpoint=hub.endpoint())
    try:
        meta = get_hf_file_metadata(url, endpoint=hub.endpoint())
    except hub.http_errors() as exc:
        what = f"source {source.shown}"
        raise hub.error(what, source.repo, source.revision, source.path, exc) from exc
    except (httpx.TransportError, OSError) as exc:
        raise TransientBackendError(
            f"source {source.shown}: can't reach the hub ({httpsafe.redact(str(exc))})"
        ) from exc
    etag = (meta.etag or "").strip('"').lower()
    sha = etag if _SHA256.match(etag) else None  # LFS files: the ETag is their SHA-256
    return meta.size, sha, f"{meta.commit_hash}:{etag}", url


def _http_remote(source: Source, http: httpx.Client) -> tuple[int | None, str]:
    shown = source.shown
    try:
        resp = http.head(source.url, follow_redirects=True)
    except httpx.TimeoutException as exc:
        raise TransientBackendError(f"source {shown}: no answer in time ({exc})") from exc
    except httpx.TransportError as exc:
        raise TransientBackendError(
            f"source {shown}: can't reach it ({httpsafe.redact(str(exc))})"
        ) from exc
    if resp.status_code == 404:
        raise ModelNotFound(f"source {shown}: 404 Not Found; check the URL")
    if resp.status_code >= 500:
        raise TransientBackendError(f"source {shown}: the server answered {resp.status_code}")
    if resp.status_code >= 400:
        raise BackendError(f"source {shown}: the server answered {resp.status_code}")
    length = resp.headers.get("content-length")
    size = int(length) if length and length.isdigit() else None
    validator = resp.headers.get("etag") or resp.headers.get("last-modified") or f"size:{size}"
    return size, validator


def probe(source: Source, http: httpx.Client, *, metadata: bool = True) -> Remote:
    """Size, checksum and (with ``metadata``) GGUF metadata of ``source``, not downloading it."""
    if source.scheme == "file":
        path = Path(source.path)
        if not path.is_file():
            raise ModelNotFound(f"source {source.shown}: no such file")
        st = path.stat()
        facts = ggufmeta.read_file(path) if metadata else ModelFacts(size=st.st_size)
        return Remote(st.st_size, None, f"{st.st_size}:{st.st_mtime_ns}", str(path), {}, facts)
    headers: dict[str, str] = {}
    if source.scheme == "hf":
        size, sha, validator, url = _hub_remote(source, http)
        headers = hub.headers()
    else:
        size, validator = _http_remote(source, http)
        sha, url = None, source.url
    meta: dict[str, Any] = {}
    if metadata:
        try:
            meta = ranged.fetch_gguf_metadata(http, url, size=size, headers=headers)
        except (httpx.HTTPError, ValueError):
            meta = {}  # the estimate falls back to a rougher layer
    facts = ggufmeta.facts_from_metadata(meta, size=size, digest=f"sha256:{sha}" if sha else None)
    return Remote(size, sha, validator, url, headers, facts)


# --------------------------------------------------------------------------- download


def partial_path(dest: Path) -> Path:
    """The temporary name of a download of ``dest`` (hidden, not ``*.gguf``)."""
    return dest.with_name(f".{dest.name}.part")


def _sidecar(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part.json")


def partial_bytes(dest: Path, validator: str) -> int:
    """Bytes of an earlier download of the same upstream file that a resume can keep."""
    part, side = partial_path(dest), _sidecar(dest)
    try:
        if json.loads(side.read_text()).get("validator") != validator:
            return 0
        return part.stat().st_size
    except (OSError, ValueError):
        return 0


def discard_unfinished(folder: Path, keep: Collection[str]) -> list[str]:
    """Delete the downloads into ``folder`` that infernet began and did not finish (the side
    file it writes first says the partial is ours), but for the file names in ``keep``;
    returns the names deleted."""
    suffix = ".part.json"
    try:
        names = sorted(p.name[1 : -len(suffix)] for p in folder.glob(f".*{suffix}"))
    except OSError:
        return []
    gone = [name for name in names if name not in keep]
    for name in gone:
        discard_partial(folder / name)
    return gone


def discard_partial(dest: Path) -> None:
    """Forget an unfinished download of ``dest``."""
    for path in (partial_path(dest), _sidecar(dest)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _hash_existing(path: Path, digest: Any) -> None:
    with path.open("rb") as existing:
        while block := existing.read(CHUNK):
            digest.update(block)


class _Refused(PullFailed):
    """A download stopped for good reason (a lying size, the disk reserve): its partial file
    is deleted, never resumed."""


def _announced(resp: httpx.Response, start: int, size: int | None, shown: str) -> None:
    """Refuse an answer whose own length contradicts the size the source announced."""
    if size is None:
        return
    got: int | None = None
    if resp.status_code == 206:
        total = resp.headers.get("content-range", "").rpartition("/")[2]
        got = int(total) if total.isdigit() else None
    else:
        length = resp.headers.get("content-length", "")
        got = int(length) if length.isdigit() else None
    if got is not None and got != size:
        raise _Refused(
            f"{shown}: the download is {got} bytes, but the source announced {size} (what the "
            "plan budgeted); the partial download was deleted"
        )


def _stream_http(
    http: httpx.Client,
    remote: Remote,
    offset: int,
    stall_timeout: float,
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(start, chunk)``: ``start`` is where the response begins (0 when the server
    ignored Range), the same for every chunk."""
    headers = dict(remote.headers)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = httpx.Timeout(stall_timeout, connect=10.0)
    shown = httpsafe.redact(remote.url)
    try:
        with http.stream(
            "GET",
            remote.url,
            headers=headers,
            timeout=timeout,
            follow_redirects=True,
            extensions=httpsafe.download(stall_timeout),
        ) as resp:
            if resp.status_code == 404:
                raise ModelNotFound(f"{shown}: 404 Not Found")
            if resp.status_code == 416:  # we already have it all
                return
            if resp.status_code >= 500:
                raise TransientBackendError(f"{shown}: the server answered {resp.status_code}")
            if resp.status_code >= 400:
                raise PullFailed(f"{shown}: the server answered {resp.status_code}")
            start = offset if resp.status_code == 206 else 0
            _announced(resp, start, remote.size, shown)
            for chunk in resp.iter_bytes(CHUNK):
                yield start, chunk
    except httpx.TimeoutException as exc:
        raise TransientBackendError(
            f"{shown}: less than {limits.PROGRESS_BYTES // 1024} KiB in {stall_timeout:.0f}s "
            "(stalled or trickling); the download resumes on retry"
        ) from exc
    except httpx.TransportError as exc:
        raise TransientBackendError(
            f"{shown}: connection lost ({httpsafe.redact(str(exc))}); the download resumes on retry"
        ) from exc


def _stream_file(path: str, offset: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as src:
        src.seek(offset)
        while block := src.read(CHUNK):
            yield offset, block


def _keep_reserve(dest: Path, reserve: int, remaining: int) -> None:
    """Stop before the download eats into ``budget.disk_reserve`` (other writers share the
    disk, so the plan's check alone can't promise it)."""
    if reserve <= 0:
        return
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if free - remaining < reserve:
        raise _Refused(
            f"disk full at {dest.parent}: downloading {dest.name} would leave less than "
            f"budget.disk_reserve ({format_size(reserve)}) free; the partial download "
            "was deleted: free space or lower the models kept"
        )


def fetch(
    source: Source,
    remote: Remote,
    dest: Path,
    *,
    http: httpx.Client,
    expected_sha256: str | None,
    progress: Progress,
    cancel: threading.Event,
    stall_timeout: float = 300.0,
    reserve: int = 0,
) -> str:
    """Download ``source`` to ``dest`` by way of a temporary name; returns the file's SHA-256.

    Transport failures are ``TransientBackendError`` (the executor retries, and the retry
    resumes); a checksum or GGUF failure, a size other than the announced one, or free space
    falling under ``reserve`` bytes discards the download.
    """
    part, side = partial_path(dest), _sidecar(dest)
    offset = partial_bytes(dest, remote.validator)
    if offset == 0:
        discard_partial(dest)
    side.write_text(json.dumps({"source": source.shown, "validator": remote.validator}))
    digest = hashlib.sha256()
    if offset:
        _hash_existing(part, digest)
    total = remote.size
    done = offset
    progress("downloading", done, total)
    chunks = (
        _stream_file(remote.url, offset)
        if source.scheme == "file"
        else _stream_http(http, remote, offset, stall_timeout)
    )
    out = part.open("ab")
    try:
        _keep_reserve(dest, reserve, (total - done) if total is not None else 0)
        first = True
        for start, chunk in chunks:
            if first and start != done:  # the server sent the whole file again: start over
                out.truncate(0)
                out.seek(0)
                digest, done = hashlib.sha256(), 0
            first = False
            if total is not None and done + len(chunk) > total:
                raise _Refused(
                    f"{source.shown}: sent more than the {total} bytes it announced (what the "
                    "plan budgeted); the partial download was deleted"
                )
            _keep_reserve(dest, reserve, (total - done) if total is not None else len(chunk))
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            progress("downloading", done, total)
            if cancel.is_set():
                raise PullFailed(f"download of {dest.name} cancelled; it resumes next time")
        out.flush()
        os.fsync(out.fileno())
    except _Refused:
        out.close()
        discard_partial(dest)
        raise
    except OSError as exc:
        out.close()
        discard_partial(dest)
        if exc.errno == errno.ENOSPC:
            raise PullFailed(
                f"disk full at {dest.parent} while downloading {dest.name}; the partial "
                "download was deleted: free space or lower the models kept"
            ) from exc
        raise PullFailed(f"can't write {part}: {exc.strerror or exc}") from exc
    finally:
        out.close()
    return _finish(dest, digest.hexdigest(), done, remote, expected=expected_sha256, source=source)


def _finish(
    dest: Path, got: str, size: int, remote: Remote, *, expected: str | None, source: Source
) -> str:
    """Checks on the complete temporary file, then the rename that makes it visible."""
    part = partial_path(dest)
    if remote.size is not None and size != remote.size:
        # The answer ended cleanly short of what was announced (a cut connection raises
        # before this and keeps the file for a resume): nothing here can be trusted.
        discard_partial(dest)
        raise PullFailed(
            f"{source.shown}: got {size} bytes, but the source announced {remote.size}; the "
            "partial download was deleted and is fetched again on retry",
            retryable=True,
        )
    for want, whose in ((expected, "the file's sha256"), (remote.sha256, "the hub's checksum")):
        if want and got != want:
            discard_partial(dest)
            raise PullFailed(
                f"{source.shown}: checksum mismatch: downloaded sha256 {got}, {whose} is "
                f"{want}; the download was discarded"
            )
    try:
        ggufmeta.read_file(part)
    except BackendError as exc:
        discard_partial(dest)
        raise PullFailed(
            f"{source.shown}: the downloaded file is not a valid GGUF model ({exc}); discarded"
        ) from exc
    os.replace(part, dest)
    with contextlib.suppress(FileNotFoundError):
        _sidecar(dest).unlink()
    return got
