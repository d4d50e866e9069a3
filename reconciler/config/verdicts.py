"""Schema verdicts remembered: a document found valid against a schema is not checked again.

``jsonschema`` (with ``referencing``, ``attrs`` and the format libraries) takes 60-100 ms to
import, a sixth of `infernet plan`'s own start-up, and a node checks the same unchanged file
on every plan, every Ansible run and every reconcile of ``watch``. A verdict is the SHA-256 of
the schema's text and the document in canonical JSON: the same pair always gets the same
answer from ``jsonschema``, so a remembered "valid" saves the check and never changes its
outcome. Only "valid" is remembered: a file with errors is checked, and its errors worded,
every time.

The file is the user's own cache (``$XDG_CACHE_HOME/infernet``), 0600 in a 0700 folder, at
most ``CAPACITY`` digests. Anything else found there (another user's file, a group- or
world-writable one, a line that is not a digest, a file too big) is ignored, and a cache that
cannot be read or written is no cache: the check then simply runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

ENV_VAR = "INFERNET_CACHE_DIR"
FILE_NAME = "schema-verdicts"
CAPACITY = 1024  # one node has one or a few files; a test bench runs 100 "nodes" on one machine
_DIGEST_LEN = 64
_MAX_BYTES = CAPACITY * (_DIGEST_LEN + 1)


def cache_dir() -> Path | None:
    """``$INFERNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/infernet``, else ``~/.cache/infernet``;
    None with no home to put it in."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "infernet"
    try:
        return Path.home() / ".cache" / "infernet"
    except RuntimeError:  # no HOME and no passwd entry (a bare service account)
        return None


def digest(schema_text: str, instance: Any) -> str | None:
    """The verdict's key, or None for a document JSON cannot spell exactly (a YAML date, a
    non-string key that ``json`` would silently turn into a string, NaN)."""
    try:
        if not _plain(instance):
            return None
        canonical = json.dumps(
            instance, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError, RecursionError):
        return None
    hasher = hashlib.sha256(schema_text.encode())
    hasher.update(b"\0")
    hasher.update(canonical.encode())
    return hasher.hexdigest()


def known_valid(key: str) -> bool:
    return key in _read()


def remember(key: str) -> None:
    """Add ``key`` (most recent last, the oldest dropped past ``CAPACITY``); best effort."""
    folder = cache_dir()
    if folder is None:
        return
    kept = [k for k in _read() if k != key][-(CAPACITY - 1) :]
    keys = [*kept, key]
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _ours(folder.stat()):
            return
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{FILE_NAME}.")  # 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write("".join(f"{k}\n" for k in keys))
            os.replace(tmp, folder / FILE_NAME)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _read() -> list[str]:
    folder = cache_dir()
    if folder is None:
        return []
    try:
        fd = os.open(folder / FILE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as handle:
        try:
            if not (_ours(os.fstat(fd)) and _ours(folder.stat())):
                return []
            data = handle.read(_MAX_BYTES + 1)
        except OSError:
            return []
    if len(data) > _MAX_BYTES:
        return []
    return [line for line in data.decode("ascii", "replace").splitlines() if _is_digest(line)]


def _ours(info: os.stat_result) -> bool:
    """Owned by this user and writable by no one else: only then is its word taken."""
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _is_digest(line: str) -> bool:
    return len(line) == _DIGEST_LEN and all(c in "0123456789abcdef" for c in line)


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)
