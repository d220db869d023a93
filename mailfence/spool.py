"""The durable queue: a message is answered 250 only after `Spool.enqueue` returns.

Rows live in SQLite (`spool`, `spool_recipients`). Writes go through the one writer thread and
its group commit; reads go through one reader thread with its own connection. Nothing here
touches SQLite on the event loop thread. The same tables are read and changed by
`mailfence queue ...` with the server stopped or running; the server notices within a second.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailfence.store import Writer, connect

RecipientState = Literal["pending", "delivered", "failed"]


class SpoolFull(Exception):
    """The spool holds its configured maximum; the client is told 452 and retries."""


@dataclass
class Recipient:
    address: str
    state: RecipientState = "pending"
    code: int = 0
    reply: str = ""


@dataclass
class Message:
    id: str
    created: float
    mail_from: str
    auth_user: str
    size: int
    is_bounce: bool
    attempts: int
    next_attempt: float
    last_error: str
    recipients: list[Recipient] = field(default_factory=list)
    content: bytes = b""

    @property
    def pending(self) -> list[str]:
        return [r.address for r in self.recipients if r.state == "pending"]


def new_id() -> str:
    """Sortable by arrival (ms, hex), unique by a random suffix: '18C1F2A3B4C.9F2E1D0A'."""
    return f"{int(time.time() * 1000):X}.{secrets.token_hex(4).upper()}"


# --- synchronous table operations: used by the writer thread and by the CLI -----------------


def insert(
    conn: sqlite3.Connection,
    msg_id: str,
    mail_from: str,
    recipients: Iterable[str],
    content: bytes,
    auth_user: str,
    is_bounce: bool,
    now: float,
) -> None:
    conn.execute(
        "INSERT INTO spool (id, created, mail_from, auth_user, size, is_bounce, attempts,"
        " next_attempt, last_error, message) VALUES (?, ?, ?, ?, ?, ?, 0, ?, '', ?)",
        (msg_id, now, mail_from, auth_user, len(content), int(is_bounce), now, content),
    )
    conn.executemany(
        "INSERT OR IGNORE INTO spool_recipients (msg_id, rcpt, state, code, reply, updated)"
        " VALUES (?, ?, 'pending', 0, '', ?)",
        [(msg_id, rcpt, now) for rcpt in recipients],
    )


def remove(conn: sqlite3.Connection, msg_id: str) -> bool:
    conn.execute("DELETE FROM spool_recipients WHERE msg_id = ?", (msg_id,))
    return conn.execute("DELETE FROM spool WHERE id = ?", (msg_id,)).rowcount > 0


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])


def count_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    """Queued messages by state: "new" (not tried yet) and "deferred" (tried, retrying)."""
    queued = int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])
    deferred = int(conn.execute("SELECT count(*) FROM spool WHERE attempts > 0").fetchone()[0])
    return {"new": queued - deferred, "deferred": deferred}


_META = "id, created, mail_from, auth_user, size, is_bounce, attempts, next_attempt, last_error"


def _message(row: Any) -> Message:
    return Message(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7], row[8])


def _attach_recipients(conn: sqlite3.Connection, messages: list[Message]) -> None:
    by_id = {m.id: m for m in messages}
    if not by_id:
        return
    marks = ",".join("?" * len(by_id))
    rows = conn.execute(
        f"SELECT msg_id, rcpt, state, code, reply FROM spool_recipients"  # noqa: S608
        f" WHERE msg_id IN ({marks}) ORDER BY rowid",
        list(by_id),
    )
    for msg_id, rcpt, state, code, reply in rows:
        by_id[msg_id].recipients.append(Recipient(rcpt, state, code, reply))


def list_messages(conn: sqlite3.Connection, limit: int = 1000) -> list[Message]:
    rows = conn.execute(
        f"SELECT {_META} FROM spool ORDER BY created LIMIT ?",  # noqa: S608
        (limit,),
    ).fetchall()
    messages = [_message(row) for row in rows]
    for start in range(0, len(messages), 500):
        _attach_recipients(conn, messages[start : start + 500])
    return messages


def get(conn: sqlite3.Connection, msg_id: str, with_content: bool = False) -> Message | None:
    row = conn.execute(
        f"SELECT {_META}, message FROM spool WHERE id = ?",  # noqa: S608
        (msg_id,),
    ).fetchone()
    if row is None:
        return None
    message = _message(row)
    if with_content:
        message.content = row[9]
    _attach_recipients(conn, [message])
    return message


def due(
    conn: sqlite3.Connection, now: float, exclude: set[str], limit: int, max_bytes: int
) -> list[Message]:
    rows = conn.execute(
        f"SELECT {_META}, message FROM spool WHERE next_attempt <= ?"  # noqa: S608
        " ORDER BY next_attempt LIMIT ?",
        (now, limit + len(exclude)),
    )
    messages: list[Message] = []
    total = 0
    for row in rows:
        if row[0] in exclude:
            continue
        message = _message(row)
        message.content = row[9]
        messages.append(message)
        total += message.size
        if len(messages) >= limit or total >= max_bytes:
            break
    _attach_recipients(conn, messages)
    return messages


def flush(conn: sqlite3.Connection, now: float, msg_id: str | None = None) -> int:
    """Makes queued messages due now. Returns how many."""
    conn.execute("BEGIN IMMEDIATE")
    if msg_id is None:
        cursor = conn.execute("UPDATE spool SET next_attempt = ?", (now,))
    else:
        cursor = conn.execute("UPDATE spool SET next_attempt = ? WHERE id = ?", (now, msg_id))
    conn.execute("COMMIT")
    return cursor.rowcount


def delete(conn: sqlite3.Connection, msg_id: str) -> bool:
    conn.execute("BEGIN IMMEDIATE")
    found = remove(conn, msg_id)
    conn.execute("COMMIT")
    return found


def complete_attempt(
    conn: sqlite3.Connection,
    msg_id: str,
    changed: list[Recipient],
    finished: bool,
    next_attempt: float,
    last_error: str,
    bounce: tuple[str, str, bytes] | None,
    now: float,
) -> bool:
    """Records one delivery attempt in one transaction: the recipients' new states, the
    bounce to send (if any) and either the message's removal or its next attempt time.

    Because it is one transaction, a crash leaves either the old state (the message is
    delivered again: a duplicate, never a loss) or the new one with its bounce queued.
    Returns False when the message is gone (deleted by an operator meanwhile).
    """
    if conn.execute("SELECT 1 FROM spool WHERE id = ?", (msg_id,)).fetchone() is None:
        return False
    if bounce is not None:
        bounce_id, recipient, content = bounce
        insert(conn, bounce_id, "", [recipient], content, "", True, now)
    if finished:
        remove(conn, msg_id)
        return True
    conn.executemany(
        "UPDATE spool_recipients SET state = ?, code = ?, reply = ?, updated = ?"
        " WHERE msg_id = ? AND rcpt = ?",
        [(r.state, r.code, r.reply, now, msg_id, r.address) for r in changed],
    )
    conn.execute(
        "UPDATE spool SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
        (next_attempt, last_error, msg_id),
    )
    return True


# --- the asynchronous face the server uses ------------------------------------------------


class Spool:
    def __init__(self, writer: Writer, database_path: Path, max_messages: int) -> None:
        self._writer = writer
        self._database_path = database_path
        self._reader: sqlite3.Connection | None = None
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="mailfence-spool-read")
        self.max_messages = max_messages
        self.size = 0
        self.by_state: dict[str, int] = {"new": 0, "deferred": 0}  # as of the last refresh
        # Set whenever a message is queued, so delivery starts without waiting for a poll;
        # `on_arrival` tells a delivery process elsewhere the same thing.
        self.arrived = asyncio.Event()
        self.on_arrival: Callable[[], None] | None = None

    def _read(self, fn: Any, *args: Any) -> Any:
        if self._reader is None:
            self._reader = connect(self._database_path)
        return fn(self._reader, *args)

    async def read(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_thread, self._read, fn, *args)

    async def start(self) -> None:
        self.size = await self.read(count)

    async def enqueue(
        self,
        mail_from: str,
        recipients: list[str],
        content: bytes,
        auth_user: str,
        is_bounce: bool = False,
        msg_id: str | None = None,
    ) -> str:
        """Returns the queue id once the message is durable on disk."""
        if self.size >= self.max_messages:
            raise SpoolFull
        msg_id = msg_id or new_id()
        now = time.time()
        queued_id = msg_id
        await self._writer.run(
            lambda conn: insert(
                conn, queued_id, mail_from, recipients, content, auth_user, is_bounce, now
            )
        )
        self.size += 1
        self.arrived.set()
        if self.on_arrival is not None:
            self.on_arrival()
        return msg_id

    async def due(self, exclude: set[str], limit: int, max_bytes: int) -> list[Message]:
        result: list[Message] = await self.read(due, time.time(), exclude, limit, max_bytes)
        return result

    async def complete_attempt(
        self,
        msg_id: str,
        changed: list[Recipient],
        finished: bool,
        next_attempt: float,
        last_error: str,
        bounce: tuple[str, str, bytes] | None,
    ) -> None:
        now = time.time()
        found = await self._writer.run(
            lambda conn: complete_attempt(
                conn, msg_id, changed, finished, next_attempt, last_error, bounce, now
            )
        )
        if found and finished:
            self.size = max(0, self.size - 1)
        if found and bounce is not None:
            self.size += 1
            self.arrived.set()

    async def refresh_size(self) -> None:
        """Picks up changes made by `mailfence queue delete` or the delivery process."""
        self.by_state = await self.read(count_by_state)
        self.size = sum(self.by_state.values())

    def close(self) -> None:
        self._read_thread.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()
