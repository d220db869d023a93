"""The `users` table: accounts that may log in and the senders each may use."""

from __future__ import annotations

import fnmatch
import json
import sqlite3
import time
from dataclasses import dataclass


class UserError(Exception):
    """A user operation that cannot be done as asked (the message says why)."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    senders: tuple[str, ...]
    disabled: bool
    updated: float

    def may_send_as(self, address: str) -> bool:
        """Whether this account may use `address` as its envelope sender.

        Patterns are shell-style and case-insensitive (`*@example.com`); an account with none
        may use only its own name, when that name is an address.
        """
        address = address.lower()
        if not self.senders:
            return "@" in self.name and address == self.name.lower()
        return any(fnmatch.fnmatchcase(address, p.lower()) for p in self.senders)


def _row_to_user(row: sqlite3.Row | tuple[str, str, str, int, float]) -> User:
    name, password_hash, senders, disabled, updated = row
    return User(name, password_hash, tuple(json.loads(senders or "[]")), bool(disabled), updated)


_COLUMNS = "name, password_hash, senders, disabled, updated"


def load_all(conn: sqlite3.Connection) -> dict[str, User]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM users").fetchall()  # noqa: S608
    return {row[0]: _row_to_user(row) for row in rows}


def get(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM users WHERE name = ?",  # noqa: S608
        (name,),
    ).fetchone()
    return _row_to_user(row) if row else None


def _validate_name(name: str) -> None:
    if not name or len(name) > 320 or any(c.isspace() or c == "\0" for c in name):
        raise UserError(f"{name!r} is not a valid user name (no spaces, 1-320 characters)")


def add(conn: sqlite3.Connection, name: str, password_hash: str, senders: list[str]) -> None:
    _validate_name(name)
    now = time.time()
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO users (name, password_hash, senders, disabled, created, updated)"
            " VALUES (?, ?, ?, 0, ?, ?)",
            (name, password_hash, json.dumps(senders), now, now),
        )
        conn.execute("COMMIT")
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK")
        raise UserError(f"user {name!r} already exists (use 'users passwd' to change it)") from None


def _update(conn: sqlite3.Connection, name: str, sql: str, args: tuple[object, ...]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    cursor = conn.execute(sql, (*args, time.time(), name))
    conn.execute("COMMIT")
    if cursor.rowcount == 0:
        raise UserError(f"no user {name!r} (see 'mailfence users list')")


def set_password(conn: sqlite3.Connection, name: str, password_hash: str) -> None:
    _update(
        conn,
        name,
        "UPDATE users SET password_hash = ?, updated = ? WHERE name = ?",
        (password_hash,),
    )


def set_disabled(conn: sqlite3.Connection, name: str, disabled: bool) -> None:
    _update(
        conn, name, "UPDATE users SET disabled = ?, updated = ? WHERE name = ?", (int(disabled),)
    )


def set_senders(conn: sqlite3.Connection, name: str, senders: list[str]) -> None:
    _update(
        conn,
        name,
        "UPDATE users SET senders = ?, updated = ? WHERE name = ?",
        (json.dumps(senders),),
    )


def delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    cursor = conn.execute("DELETE FROM users WHERE name = ?", (name,))
    conn.execute("COMMIT")
    if cursor.rowcount == 0:
        raise UserError(f"no user {name!r} (see 'mailfence users list')")
