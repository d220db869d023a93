"""The defense's tables: the ban ledger, the allowlist and known-good (user, prefix) pairs.

Both the server and the command line write these; the server rereads them within a second
when `signature` changes.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
from typing import Any

from mailfence.defense.bans import Ban, BanSource
from mailfence.defense.net import IPAddress, IPNetwork

KEEP_HISTORY = 30 * 86400.0


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


def _ban(row: Any) -> Ban:
    network, until, reason, evidence, source, level, created = row
    return Ban(
        _network(network), until, reason, source, created, level, json.loads(evidence or "{}")
    )


_BAN_COLUMNS = "network, until, reason, evidence, source, level, created"


def insert_ban(conn: sqlite3.Connection, ban: Ban) -> None:
    conn.execute(
        "INSERT INTO bans (network, until, reason, evidence, source, level, created)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            str(ban.network),
            ban.until,
            ban.reason,
            json.dumps(ban.evidence),
            ban.source,
            ban.level,
            ban.created,
        ),
    )


def insert_bans(conn: sqlite3.Connection, bans: list[Ban]) -> None:
    for ban in bans:
        insert_ban(conn, ban)


def active_bans(conn: sqlite3.Connection, now: float, source: BanSource | None = None) -> list[Ban]:
    sql = (
        f"SELECT {_BAN_COLUMNS} FROM bans WHERE lifted IS NULL"  # noqa: S608
        " AND (until IS NULL OR until > ?)"
    )
    args: list[Any] = [now]
    if source is not None:
        sql += " AND source = ?"
        args.append(source)
    return [_ban(row) for row in conn.execute(sql + " ORDER BY created", args)]


def ban_history(conn: sqlite3.Connection, network: IPNetwork) -> list[Ban]:
    rows = conn.execute(
        f"SELECT {_BAN_COLUMNS} FROM bans WHERE network = ? ORDER BY created",  # noqa: S608
        (str(network),),
    )
    return [_ban(row) for row in rows]


def ban_history_for(conn: sqlite3.Connection, address: IPAddress) -> list[Ban]:
    """Every recorded ban whose network contains `address` (newest last)."""
    rows = conn.execute(f"SELECT {_BAN_COLUMNS} FROM bans ORDER BY created")  # noqa: S608
    return [ban for ban in map(_ban, rows) if address in ban.network]


def lift(conn: sqlite3.Connection, network: IPNetwork, now: float) -> int:
    """Ends every ban on exactly this network. Returns how many were in force."""
    cursor = conn.execute(
        "UPDATE bans SET lifted = ? WHERE network = ? AND lifted IS NULL"
        " AND (until IS NULL OR until > ?)",
        (now, str(network), now),
    )
    return cursor.rowcount


def lift_auto(conn: sqlite3.Connection, now: float) -> int:
    cursor = conn.execute(
        "UPDATE bans SET lifted = ? WHERE source = 'auto' AND lifted IS NULL AND until > ?",
        (now, now),
    )
    return cursor.rowcount


def prune(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("DELETE FROM bans WHERE until IS NOT NULL AND until < ?", (now - KEEP_HISTORY,))


def allowlist(conn: sqlite3.Connection) -> list[IPNetwork]:
    return [_network(row[0]) for row in conn.execute("SELECT network FROM allowlist ORDER BY 1")]


def allow(conn: sqlite3.Connection, network: IPNetwork, note: str, now: float) -> bool:
    cursor = conn.execute(
        "INSERT OR IGNORE INTO allowlist (network, note, created) VALUES (?, ?, ?)",
        (str(network), note, now),
    )
    return cursor.rowcount > 0


def disallow(conn: sqlite3.Connection, network: IPNetwork) -> bool:
    return conn.execute("DELETE FROM allowlist WHERE network = ?", (str(network),)).rowcount > 0


def known_good(conn: sqlite3.Connection, since: float) -> list[tuple[str, IPNetwork, float]]:
    rows = conn.execute(
        "SELECT user, prefix, last_success FROM known_good WHERE last_success >= ?", (since,)
    )
    return [(user, _network(prefix), when) for user, prefix, when in rows]


def remember_known_good(
    conn: sqlite3.Connection, user: str, prefix: IPNetwork, when: float
) -> None:
    conn.execute(
        "INSERT INTO known_good (user, prefix, last_success) VALUES (?, ?, ?)"
        " ON CONFLICT (user, prefix)"
        " DO UPDATE SET last_success = max(last_success, excluded.last_success)",
        (user, str(prefix), when),
    )


def signature(conn: sqlite3.Connection) -> tuple[Any, ...]:
    """Changes whenever a ban is added or lifted or the allowlist changes."""
    bans = conn.execute("SELECT count(*), max(id), count(lifted) FROM bans").fetchone()
    allowed = conn.execute("SELECT count(*), group_concat(network) FROM allowlist").fetchone()
    return (*bans, *allowed)
