"""The keys of the store's status table: one name for each thing a status row remembers."""

from __future__ import annotations

from enum import StrEnum


class StatusKey(StrEnum):
    """What each status row holds (its value is the JSON the writer put there)."""

    PROTECTED = "protected"  # model keys declared protect: true, until the model is gone
    LAST_VALID = "last_valid_config"  # the text of the last valid file the daemon used
    LAST_HEARTBEAT = "last_heartbeat"  # the last heartbeat's outcome (status shows it)
    LAST_WITHDRAWAL = "last_withdrawal"  # a withdrawal before deletes the control plane missed
    DAEMON = "daemon"  # what `infernet status` shows about `infernet watch`
    COMMAND_UNDO = "command_undo"  # per command id, what takes an install's file edit back
    JOBS = "jobs"  # the running daemon's job figures (load, bench) for other heartbeats
    CANARIES = "canaries"  # per model key, the digest whose one-token test answered (or not)
