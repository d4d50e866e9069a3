"""Where the state lives: choosing the state directory and making sure it can be used."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.errors import StateError
from state import clock

ENV_VAR = "INFERNET_STATE_DIR"
SYSTEM_DIR = Path("/var/lib/infernet")
# Every file infernet writes in its state directory: the store holds argv, command payloads and
# engine environments, and systemd's StateDirectory= makes the folder 0755 by default.
PRIVATE_MODE = 0o600


def default_state_dir() -> Path:
    """``$INFERNET_STATE_DIR``, else ``/var/lib/infernet`` for root, else the XDG state dir."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    if os.geteuid() == 0:
        return SYSTEM_DIR
    xdg = os.environ.get("XDG_STATE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "infernet"
    return Path.home() / ".local" / "state" / "infernet"


def ensure_state_dir(state_dir: Path) -> Path:
    """Creates ``state_dir`` (mode 0700) if missing and checks that it is writable.

    Raises :class:`StateError` naming the path and what to do; returns the path unchanged.
    """
    hint = f"create it writable for this user, or choose another with --state-dir or ${ENV_VAR}"
    try:
        if not state_dir.is_dir():
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; the store may hold argv and command
            # payloads, so other users should not read it whatever the umask says.
            state_dir.chmod(0o700)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StateError(
            f"state directory {state_dir} cannot be created ({reason}); {hint}"
        ) from exc
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StateError(f"state directory {state_dir} is not writable; {hint}")
    return state_dir


def open_private(path: Path, flags: int, *, follow: bool = True) -> int:
    """``os.open`` of a file in the state directory, created ``PRIVATE_MODE``; an existing one
    (an older version's, or another tool's) is narrowed to it. ``follow=False`` refuses a
    symlink. Raises ``OSError``; the descriptor is not inherited by children."""
    flags |= os.O_CREAT | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        narrow(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def narrow(file: int | Path) -> None:
    """Make an open descriptor's file, or a path's, ``PRIVATE_MODE``; a file we may not chmod
    (another user's) is left alone: opening it is what fails then, with a clear error."""
    try:
        mode = os.fstat(file).st_mode if isinstance(file, int) else os.stat(file).st_mode
        if mode & 0o7777 != PRIVATE_MODE:
            if isinstance(file, int):
                os.fchmod(file, PRIVATE_MODE)
            else:
                os.chmod(file, PRIVATE_MODE)
    except (FileNotFoundError, PermissionError):
        pass


def crash_report(state_dir: Path, text: str) -> Path | None:
    """``text`` (a traceback) in a new ``crash-<UTC time>-<pid>.txt`` of the state directory:
    0600, created exclusively and never through a symlink (a fixed name in the shared temp
    folder let any local user point it at a file of ours, or read it). None when the folder
    or the file can't be made; the caller has printed ``text`` anyway."""
    stamp = clock.compact(clock.now())
    try:
        ensure_state_dir(state_dir)
        target = state_dir / f"crash-{stamp}-{os.getpid()}.txt"
        fd = open_private(target, os.O_WRONLY | os.O_EXCL, follow=False)
    except (OSError, StateError):
        return None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as out:
            out.write(text)
    except OSError:
        return None
    return target
