"""The database layout and its migrations, versioned with ``PRAGMA user_version``.

``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; version 0 is an empty file.
Never edit a shipped migration: append a new one, so every node walks the same path.
"""

from __future__ import annotations

import sqlite3

from reconciler.errors import StateError

_V1 = (
    # Ownership decides what may be pruned; a row exists only for models this tool installed.
    """CREATE TABLE owned (
        backend      TEXT NOT NULL,
        canonical    TEXT NOT NULL,
        name         TEXT NOT NULL,
        digest       TEXT,
        installed_at TEXT NOT NULL,
        PRIMARY KEY (backend, canonical)
    )""",
    # Pins and VRAM measurements are kept apart from ownership: the tool pins and measures
    # models the user installed too, and those must never gain an ownership row.
    """CREATE TABLE pins (
        backend   TEXT NOT NULL,
        canonical TEXT NOT NULL,
        pinned_at TEXT NOT NULL,
        PRIMARY KEY (backend, canonical)
    )""",
    """CREATE TABLE measured_vram (
        backend     TEXT NOT NULL,
        canonical   TEXT NOT NULL,
        digest      TEXT,
        size_vram   INTEGER NOT NULL,
        measured_at TEXT NOT NULL,
        PRIMARY KEY (backend, canonical)
    )""",
    """CREATE TABLE applies (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        at            TEXT NOT NULL,
        config_sha256 TEXT NOT NULL,
        git_commit    TEXT,
        converged     INTEGER NOT NULL,
        actions       INTEGER NOT NULL,
        failed        INTEGER NOT NULL,
        summary       TEXT NOT NULL
    )""",
    """CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        config_sha256 TEXT NOT NULL,
        plan          TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        converged     INTEGER
    )""",
    """CREATE TABLE actions (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        op          TEXT NOT NULL,
        backend     TEXT NOT NULL,
        canonical   TEXT NOT NULL,
        model       TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        finished_at TEXT,
        outcome     TEXT,
        error       TEXT
    )""",
    "CREATE INDEX actions_by_run ON actions (run_id)",
    "CREATE INDEX actions_unfinished ON actions (id) WHERE finished_at IS NULL",
    """CREATE TABLE cache (
        kind      TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        stored_at TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    )""",
    """CREATE TABLE status (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE commands (
        id          TEXT PRIMARY KEY,
        verb        TEXT NOT NULL,
        payload     TEXT NOT NULL,
        state       TEXT NOT NULL,
        result      TEXT,
        error       TEXT,
        received_at TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        reported_at TEXT
    )""",
    """CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        path            TEXT NOT NULL,
        body            TEXT NOT NULL,
        dedupe_key      TEXT UNIQUE,
        created_at      TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT,
        last_attempt_at TEXT
    )""",
)

_V2 = (
    # Version 1's outbox was never used; job answers are kept with their jobs instead.
    "DROP TABLE outbox",
    # Every job taken from the control plane, so none is run twice (a poll returns a job until
    # it is completed) and each answer, written before it is sent, is delivered exactly once.
    """CREATE TABLE jobs (
        id          TEXT PRIMARY KEY,
        model       TEXT,
        state       TEXT NOT NULL,
        answer      TEXT,
        received_at TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        reported_at TEXT
    )""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2)
VERSION = len(MIGRATIONS)

# What a database at VERSION must contain; anything less means the schema went missing.
TABLES = frozenset(
    {
        "owned",
        "pins",
        "measured_vram",
        "applies",
        "runs",
        "actions",
        "cache",
        "status",
        "commands",
        "jobs",
    }
)


class SchemaMissing(Exception):
    """The file is a database but not (or no longer) ours; the store moves it aside."""


def user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def table_names(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {str(row[0]) for row in rows}


def migrate(conn: sqlite3.Connection, *, path: str) -> None:
    """Brings an autocommit connection up to :data:`VERSION`.

    Raises :class:`SchemaMissing` when the file holds someone else's tables or lost ours, and
    :class:`StateError` when a newer infernet wrote it (moving that aside would forget which
    models we own, so the user has to decide).
    """
    # Fast path first: the CLI opens the store on every run and must not take the write lock.
    if user_version(conn) == VERSION:
        _check_tables(conn)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated in the meantime.
        current = user_version(conn)
        if current > VERSION:
            raise StateError(
                f"state database {path} has schema version {current}, newer than this "
                f"infernet understands ({VERSION}); upgrade infernet or point --state-dir "
                "elsewhere"
            )
        if current == 0 and table_names(conn):
            raise SchemaMissing("the file holds tables that are not infernet's")
        for version in range(current, VERSION):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        # PRAGMA takes no parameters; VERSION is our own integer.
        conn.execute(f"PRAGMA user_version = {VERSION}")
        _check_tables(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _check_tables(conn: sqlite3.Connection) -> None:
    missing = TABLES - table_names(conn)
    if missing:
        raise SchemaMissing(f"tables missing: {', '.join(sorted(missing))}")
