"""Opening the database and bringing its schema up to date.

One file in WAL mode. Readers never block the writer and vice versa; `synchronous=FULL` makes
every commit fsync the WAL, which is what lets the relay answer 250 only after a message is on
disk (DESIGN.md, "Storage").
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import sqlite_utils


class StoreError(Exception):
    """The database cannot be opened or is from a newer mailfence."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every mailfence connection needs.

    `isolation_level=None` leaves transactions to us: writes use BEGIN IMMEDIATE explicitly,
    so a batch of spool inserts is one transaction and one fsync.
    """
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("users").create(
        {
            "name": str,
            "password_hash": str,
            "senders": str,  # JSON list of patterns
            "disabled": int,
            "created": float,
            "updated": float,
        },
        pk="name",
    )
    db.table("spool").create(
        {
            "id": str,
            "created": float,
            "mail_from": str,
            "auth_user": str,
            "size": int,
            "is_bounce": int,
            "attempts": int,
            "next_attempt": float,
            "last_error": str,
            "message": bytes,
        },
        pk="id",
    )
    db.table("spool").create_index(["next_attempt"])
    db.table("spool_recipients").create(
        {
            "msg_id": str,
            "rcpt": str,
            "state": str,  # pending | delivered | failed
            "code": int,
            "reply": str,
            "updated": float,
        },
        pk=("msg_id", "rcpt"),
        foreign_keys=[("msg_id", "spool", "id")],
    )
    # A foreign key with ON DELETE CASCADE is not expressible through create(); the spool
    # deletes recipients explicitly in the same transaction instead.


def _migration_2(db: sqlite_utils.Database) -> None:
    # The ban ledger: one row per ban, kept after it ends (history, escalation, `explain`).
    db.table("bans").create(
        {
            "id": int,
            "network": str,
            "until": float,  # NULL: permanent
            "reason": str,
            "evidence": str,  # JSON
            "source": str,  # auto | manual
            "level": int,
            "created": float,
            "lifted": float,  # set by `unban`; NULL while in force
        },
        pk="id",
    )
    db.table("bans").create_index(["network"])
    db.table("allowlist").create(
        {"network": str, "note": str, "created": float},
        pk="network",
    )
    db.table("known_good").create(
        {"user": str, "prefix": str, "last_success": float},
        pk=("user", "prefix"),
    )


def _migration_3(db: sqlite_utils.Database) -> None:
    # Hourly history for `mailfence stats --since`: the server adds each minute's figures to
    # the hour's row; t250 is a JSON list of counts per latency bucket (observe.figures).
    db.table("stats_hourly").create(
        {
            "hour": int,  # unix time of the hour's start, UTC
            "connections": int,
            "connections_refused": int,
            "auth_ok": int,
            "auth_failed": int,
            "auth_refused": int,
            "bans": int,
            "accepted": int,
            "delivered": int,
            "deferred": int,
            "bounced": int,
            "t250": str,
        },
        pk="hour",
        not_null={"hour"},
    )


def _migration_4(db: sqlite_utils.Database) -> None:
    # Spool size by state is read every few seconds: count(*) uses the next_attempt index and
    # the deferred count this partial one, so neither walks the table's message pages.
    db.execute("CREATE INDEX idx_spool_deferred ON spool(attempts) WHERE attempts > 0")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
]


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreError(
            f"the database is at schema {version}, newer than this mailfence knows "
            f"({len(MIGRATIONS)}); run the newer mailfence or restore a backup"
        )
    db = sqlite_utils.Database(conn, execute_plugins=False)
    for number in range(version + 1, len(MIGRATIONS) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[number - 1](db)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_database(state_dir: Path) -> sqlite3.Connection:
    """Creates the state directory if needed, opens the database, runs migrations."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / "mailfence.sqlite3"
        conn = connect(path)
        # Password hashes and the queue: readable by the relay's user only, whoever made it.
        for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if file.exists() and file.stat().st_uid == os.getuid():
                file.chmod(0o600)
        migrate(conn)
    except (OSError, sqlite3.Error) as error:
        raise StoreError(f"cannot open the database in {state_dir}: {error}") from error
    return conn
