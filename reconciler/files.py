"""Writing a file so that readers see either the old bytes or the new, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_DEFAULT_MODE = 0o644


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file beside it, fsync, rename; mode and owner kept.

    A symlink is followed, so ``/etc/infernet/infernet.yaml -> /srv/repo/infernet.yaml``
    updates the repository's file instead of replacing the link with a copy.
    """
    target = path.resolve()
    try:
        before = target.stat()
        mode, owner = before.st_mode & 0o7777, (before.st_uid, before.st_gid)
    except FileNotFoundError:
        mode, owner = _DEFAULT_MODE & ~_umask(), None
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        if owner is not None:
            # Only root can give a file away; for anyone else the owner is already right.
            with contextlib.suppress(OSError):
                os.chown(temp, *owner)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _sync_directory(target.parent)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable; not every filesystem allows it, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
