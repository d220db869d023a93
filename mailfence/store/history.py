"""Hourly history of the relay's figures, kept 30 days (`mailfence stats --since`)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from mailfence.observe.figures import quantile

KEEP_SECONDS = 30 * 86400
COLUMNS = (
    "connections",
    "connections_refused",
    "auth_ok",
    "auth_failed",
    "auth_refused",
    "bans",
    "accepted",
    "delivered",
    "deferred",
    "bounced",
)

# Built once from the constant column names above (never from input).
_NAMES = ", ".join(COLUMNS)
_INSERT = f"INSERT INTO stats_hourly (hour, {_NAMES}, t250) VALUES (?, {', '.join('?' * len(COLUMNS))}, ?)"  # noqa: S608, E501
_UPDATE = f"UPDATE stats_hourly SET {', '.join(f'{n} = {n} + ?' for n in COLUMNS)}, t250 = ? WHERE hour = ?"  # noqa: S608, E501
_SELECT = f"SELECT hour, {_NAMES}, t250 FROM stats_hourly WHERE hour >= ? ORDER BY hour"  # noqa: S608


def add_minute(
    conn: sqlite3.Connection, hour: int, figures: dict[str, int], t250: list[int]
) -> None:
    """Adds one minute's changes to its hour's row (inside the caller's transaction)."""
    row = conn.execute("SELECT t250 FROM stats_hourly WHERE hour = ?", (hour,)).fetchone()
    if row is None:
        values = [figures.get(name, 0) for name in COLUMNS]
        conn.execute(_INSERT, (hour, *values, json.dumps(t250)))
        return
    merged = json.loads(row[0] or "[]")
    merged += [0] * (len(t250) - len(merged))
    merged = [a + b for a, b in zip(merged, t250 + [0] * (len(merged) - len(t250)), strict=True)]
    changes = [figures.get(name, 0) for name in COLUMNS]
    conn.execute(_UPDATE, (*changes, json.dumps(merged), hour))


def prune(conn: sqlite3.Connection, now: float) -> None:
    conn.execute("DELETE FROM stats_hourly WHERE hour < ?", (int(now - KEEP_SECONDS),))


def since(conn: sqlite3.Connection, start: float) -> list[dict[str, Any]]:
    """Rows from `start` on, oldest first, with the hour's p99 time to 250 in ms."""
    hour_start = int(start) - int(start) % 3600
    cursor = conn.execute(_SELECT, (hour_start,))
    rows = []
    for record in cursor:
        row: dict[str, Any] = {"hour": record[0]}
        row.update(zip(COLUMNS, record[1:-1], strict=True))
        p99 = quantile(json.loads(record[-1] or "[]"), 0.99)
        row["p99_to_250_ms"] = None if p99 is None or p99 == float("inf") else p99 * 1000
        rows.append(row)
    return rows
