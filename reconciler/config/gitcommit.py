"""Which git commit a config file comes from, read from ``.git`` without spawning git.

A GitOps node wants ``plan`` and heartbeats to say "deployed from commit X", but only when that
is true: the file must be tracked and identical to what the index holds. Spawning ``git`` costs
tens of milliseconds on every ``infernet plan``, so we read ``.git`` directly: ``HEAD``, loose
refs, ``packed-refs`` and the index (versions 2–4).

Limitation, on purpose: the file is compared with the index, not with HEAD's tree (that needs
the pack format). An edit staged but not committed is therefore reported as HEAD's commit.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_ENTRY_FIXED = 62  # ctime, mtime, dev, ino, mode, uid, gid, size (40) + sha1 (20) + flags (2)
_EXTENDED = 0x4000


def commit_of(path: Path, data: bytes) -> str | None:
    """HEAD's commit when ``path`` (whose bytes are ``data``) is tracked and clean, else None."""
    try:
        found = _repository(path.resolve())
        if found is None:
            return None
        worktree, gitdir = found
        relative = path.resolve().relative_to(worktree).as_posix()
        staged = _index_sha(gitdir / "index", relative)
        if staged is None or staged != _blob_sha1(data):
            return None
        return _head(gitdir)
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        # An unreadable or unfamiliar repository just means "we can't say".
        return None


def _repository(path: Path) -> tuple[Path, Path] | None:
    """(work tree, git dir) of the repository containing ``path``."""
    for directory in path.parents:
        dotgit = directory / ".git"
        if dotgit.is_dir():
            return directory, dotgit
        if dotgit.is_file():  # worktrees and submodules: "gitdir: <path>"
            text = dotgit.read_text(encoding="utf-8").strip()
            if text.startswith("gitdir:"):
                return directory, (directory / text.removeprefix("gitdir:").strip()).resolve()
            return None
    return None


def _head(gitdir: Path) -> str | None:
    head = (gitdir / "HEAD").read_text(encoding="utf-8").strip()
    if not head.startswith("ref:"):
        return head if _SHA.match(head) else None
    ref = head.removeprefix("ref:").strip()
    # A linked worktree keeps HEAD and index in its own git dir but refs in the common one.
    common = gitdir
    if (gitdir / "commondir").is_file():
        common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in dict.fromkeys((gitdir, common)):
        loose = base / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8").strip()
            return sha if _SHA.match(sha) else None
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and _SHA.match(sha):
                return sha
    return None  # an unborn branch: nothing committed yet


def _blob_sha1(data: bytes) -> bytes:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).digest()


def _index_sha(index: Path, wanted: str) -> bytes | None:
    """The staged blob id of ``wanted`` in a git index (format 2, 3 or 4), else None."""
    data = index.read_bytes()
    signature, version, count = struct.unpack_from(">4sII", data, 0)
    if signature != b"DIRC" or version not in (2, 3, 4):
        return None
    target = wanted.encode("utf-8")
    offset, previous = 12, b""
    for _ in range(count):
        sha = data[offset + 40 : offset + 60]
        (flags,) = struct.unpack_from(">H", data, offset + 60)
        offset += _ENTRY_FIXED + (2 if version >= 3 and flags & _EXTENDED else 0)
        if version == 4:
            # Path compression: drop N bytes of the previous path, then a NUL-ended suffix.
            strip, offset = _varint(data, offset)
            end = data.index(b"\0", offset)
            name = previous[: len(previous) - strip] + data[offset:end]
            offset = end + 1
        else:
            end = data.index(b"\0", offset)
            name = data[offset:end]
            entry_start = offset - _ENTRY_FIXED - (2 if version >= 3 and flags & _EXTENDED else 0)
            # Entries are NUL-padded to a multiple of 8 bytes (1 to 8 NULs).
            offset = entry_start + ((end - entry_start) // 8 + 1) * 8
        previous = name
        if name == target and (flags >> 12) & 0x3 == 0:  # stage 0: not mid-merge
            return sha
    return None


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """Git's offset varint (index v4, pack files)."""
    byte = data[offset]
    value = byte & 0x7F
    offset += 1
    while byte & 0x80:
        byte = data[offset]
        offset += 1
        value = ((value + 1) << 7) | (byte & 0x7F)
    return value, offset
