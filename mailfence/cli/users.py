"""`mailfence users ...`: the accounts that may log in and relay."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from mailfence.auth import make_hasher
from mailfence.cli.common import ConfigOption, database, fail, out, read_password, tell_server
from mailfence.store import users as user_table
from mailfence.store.users import UserError

app = typer.Typer(
    help="Manage the accounts that may log in.\n\nExample: mailfence users list",
    no_args_is_help=True,
)

PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from one line of stdin.")
]


@app.command("add")
def add(
    user: Annotated[str, typer.Argument(help="Login name, usually an address.")],
    password_stdin: PasswordStdin = False,
    sender: Annotated[
        list[str] | None,
        typer.Option(
            "--sender",
            help="Envelope sender this account may use (repeatable; '*@example.com').",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Add an account. Without --sender it may send only as its own name (if an address).

    Scripts can pipe the password in with --password-stdin.

    Example: mailfence users add alerts@example.com --sender '*@example.com'
    """
    with database(config) as (settings, conn):
        password = read_password(password_stdin)
        password_hash = make_hasher(settings.auth).hash(password)
        try:
            user_table.add(conn, user, password_hash, sender or [])
        except UserError as error:
            fail(str(error))
    tell_server(settings, "users-changed")  # a running relay knows the account at once
    out.print(f"added {user}", markup=False)


@app.command("list")
def list_users(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List accounts, their allowed senders and whether they are disabled.

    Example: mailfence users list --json
    """
    with database(config) as (_, conn):
        users = sorted(user_table.load_all(conn).values(), key=lambda u: u.name)
    if as_json:
        rows = [{"name": u.name, "senders": list(u.senders), "disabled": u.disabled} for u in users]
        out.print(json.dumps(rows, indent=2), markup=False)
        return
    table = Table("user", "senders", "status")
    for u in users:
        senders = ", ".join(u.senders) or ("(own address)" if "@" in u.name else "(none)")
        table.add_row(u.name, senders, "disabled" if u.disabled else "active")
    out.print(table)


@app.command("passwd")
def passwd(
    user: Annotated[str, typer.Argument(help="Login name.")],
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Change an account's password; a running relay forgets the old one within a second.

    Example: mailfence users passwd alerts@example.com
    """
    with database(config) as (settings, conn):
        if user_table.get(conn, user) is None:
            fail(f"no user {user!r} (see 'mailfence users list')")
        password = read_password(password_stdin)
        try:
            user_table.set_password(conn, user, make_hasher(settings.auth).hash(password))
        except UserError as error:
            fail(str(error))
    tell_server(settings, "users-changed")
    out.print(f"password changed for {user}", markup=False)


def _set_disabled(user: str, disabled: bool, config: ConfigOption) -> None:
    with database(config) as (settings, conn):
        try:
            user_table.set_disabled(conn, user, disabled)
        except UserError as error:
            fail(str(error))
    tell_server(settings, "users-changed")
    out.print(f"{'disabled' if disabled else 'enabled'} {user}", markup=False)


@app.command("disable")
def disable(user: str, config: ConfigOption = None) -> None:
    """Refuse this account's logins (its queued mail is still delivered).

    Example: mailfence users disable alerts@example.com
    """
    _set_disabled(user, True, config)


@app.command("enable")
def enable(user: str, config: ConfigOption = None) -> None:
    """Allow a disabled account to log in again.

    Example: mailfence users enable alerts@example.com
    """
    _set_disabled(user, False, config)


@app.command("delete")
def delete(user: str, config: ConfigOption = None) -> None:
    """Delete an account (its queued mail is still delivered).

    Example: mailfence users delete alerts@example.com
    """
    with database(config) as (settings, conn):
        try:
            user_table.delete(conn, user)
        except UserError as error:
            fail(str(error))
    tell_server(settings, "users-changed")
    out.print(f"deleted {user}", markup=False)
