"""Where the state lives: choosing the state directory and making sure it can be used."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.errors import StateError

ENV_VAR = "INFERNET_STATE_DIR"
SYSTEM_DIR = Path("/var/lib/infernet")


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
