"""`mailfence queue ...`: look at and steer the spool."""

from __future__ import annotations

import datetime
import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from mailfence import spool
from mailfence.cli.common import ConfigOption, database, fail, out

app = typer.Typer(
    help="Inspect and steer queued mail.\n\nExample: mailfence queue list", no_args_is_help=True
)


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _as_dict(message: spool.Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "created": message.created,
        "from": message.mail_from,
        "user": message.auth_user,
        "size": message.size,
        "bounce": message.is_bounce,
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "last_error": message.last_error,
        "recipients": [
            {"address": r.address, "state": r.state, "code": r.code, "reply": r.reply}
            for r in message.recipients
        ],
    }


@app.command("list")
def list_queue(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(help="Show at most this many, oldest first.")] = 1000,
    config: ConfigOption = None,
) -> None:
    """List queued messages, oldest first.

    Example: mailfence queue list --json
    """
    with database(config) as (_, conn):
        messages = spool.list_messages(conn, limit)
        total = spool.count(conn)
    if as_json:
        out.print(json.dumps([_as_dict(m) for m in messages], indent=2), markup=False)
        return
    table = Table("id", "queued", "from", "to", "attempts", "next try", "last error")
    for m in messages:
        pending = [r.address for r in m.recipients if r.state == "pending"]
        table.add_row(
            m.id,
            _when(m.created),
            m.mail_from or "<>",
            ", ".join(pending[:3]) + (f" (+{len(pending) - 3})" if len(pending) > 3 else ""),
            str(m.attempts),
            _when(m.next_attempt),
            m.last_error[:60],
        )
    out.print(table)
    out.print(f"{total} message(s) queued", markup=False)


@app.command("show")
def show(msg_id: str, config: ConfigOption = None) -> None:
    """Show one message's envelope, recipients' states and headers.

    Example: mailfence queue show 18C1F2A3B4C.9F2E1D0A
    """
    with database(config) as (_, conn):
        message = spool.get(conn, msg_id, with_content=True)
    if message is None:
        fail(f"no queued message {msg_id!r} (see 'mailfence queue list')")
    details = _as_dict(message)
    end = message.content.find(b"\r\n\r\n")
    details["headers"] = message.content[: end if end >= 0 else None].decode("utf-8", "replace")
    out.print(json.dumps(details, indent=2), markup=False)


@app.command("flush")
def flush(
    msg_id: Annotated[str | None, typer.Argument(help="Only this message.")] = None,
    config: ConfigOption = None,
) -> None:
    """Retry queued messages now instead of at their next scheduled attempt.

    Example: mailfence queue flush
    """
    with database(config) as (_, conn):
        count = spool.flush(conn, time.time(), msg_id)
    if msg_id is not None and count == 0:
        fail(f"no queued message {msg_id!r}")
    out.print(f"{count} message(s) will be retried now", markup=False)


@app.command("delete")
def delete(msg_id: str, config: ConfigOption = None) -> None:
    """Delete a queued message without delivering or bouncing it.

    Example: mailfence queue delete 18C1F2A3B4C.9F2E1D0A
    """
    with database(config) as (_, conn):
        found = spool.delete(conn, msg_id)
    if not found:
        fail(f"no queued message {msg_id!r} (see 'mailfence queue list')")
    out.print(f"deleted {msg_id}", markup=False)
