"""The state store: what infernet owns, applied, journaled and still has to deliver.

One SQLite database (``state.db``) and one lock file (``lock``) in the state directory. Only
the standard library is imported, so the CLI starts fast.
"""

from __future__ import annotations

from state.keys import StatusKey
from state.location import default_state_dir
from state.lock import NodeLock
from state.records import (
    ApplyRecord,
    CommandRecord,
    JobRecord,
    JournalEntry,
    LockHolder,
    OwnedRecord,
)
from state.store import Store

__all__ = [
    "ApplyRecord",
    "CommandRecord",
    "JobRecord",
    "JournalEntry",
    "LockHolder",
    "NodeLock",
    "OwnedRecord",
    "StatusKey",
    "Store",
    "default_state_dir",
]
