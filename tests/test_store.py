"""The database's schema migrations, on real SQLite files."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlite_utils

from mailfence import spool
from mailfence.store import db as store_db
from mailfence.store.db import StoreError, connect, open_database


def test_a_database_from_an_older_release_is_upgraded_and_keeps_its_queue(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mailfence.sqlite3"
    old = connect(path)
    # The schema as the release before the deferred-count index left it.
    for number, migration in enumerate(store_db.MIGRATIONS[:3], start=1):
        migration(sqlite_utils.Database(old))
        old.execute(f"PRAGMA user_version={number}")
    for n in range(5):
        spool.insert(old, f"m{n}", "a@example.com", ["b@example.net"], b"x", "u", False, 1.0)
    old.execute("UPDATE spool SET attempts = 2 WHERE id IN ('m1', 'm3')")
    old.close()

    conn = open_database(tmp_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store_db.MIGRATIONS)
    assert spool.count_by_state(conn) == {"new": 3, "deferred": 2}
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT count(*) FROM spool WHERE attempts > 0")
    assert "idx_spool_deferred" in str(plan.fetchall())  # no walk over the message pages
    conn.close()


def test_a_database_from_a_newer_release_is_refused_untouched(tmp_path: Path) -> None:
    open_database(tmp_path).close()
    path = tmp_path / "mailfence.sqlite3"
    newer = connect(path)
    newer.execute(f"PRAGMA user_version={len(store_db.MIGRATIONS) + 1}")
    newer.close()
    with pytest.raises(StoreError, match="newer than this mailfence knows"):
        open_database(tmp_path)
    check = connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == len(store_db.MIGRATIONS) + 1
    check.close()
