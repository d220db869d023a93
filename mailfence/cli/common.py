"""What every command shares: the --config option, opening things, and errors at the edge."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from mailfence import config as config_module
from mailfence.config import Config, ConfigError
from mailfence.observe import control
from mailfence.store import StoreError, open_database

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Settings file (TOML). Default: ./mailfence.toml, else "
        "/etc/mailfence/mailfence.toml, if present; else built-in defaults.",
        show_default=False,
    ),
]

out = Console(highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    # Plain text on one line: it is read by people and by scripts that grep for it.
    typer.echo(f"mailfence: {message}", err=True)
    raise typer.Exit(code)


def load_config(path: Path | None) -> Config:
    try:
        return config_module.load(path)
    except ConfigError as error:
        fail(str(error), EXIT_CONFIG)


@contextmanager
def database(path: Path | None) -> Iterator[tuple[Config, sqlite3.Connection]]:
    """The configured database, created and migrated if needed; closed afterwards."""
    config = load_config(path)
    try:
        conn = open_database(config.state_dir)
    except StoreError as error:
        fail(str(error))
    try:
        yield config, conn
    finally:
        conn.close()


def read_password(from_stdin: bool) -> str:
    """One line from standard input, or a hidden prompt asked twice.

    Never an argument: an argument would show in the process list and shell history.
    """
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        fail("the password is empty")
    return password


def ask_server(config: Config, command: str, **arguments: object) -> dict[str, object]:
    """One request to the running server. Exits 1 with one line when none runs."""
    try:
        answer = control.request(config.control_socket, command, arguments)
    except control.NotRunning as error:
        fail(str(error))
    except (OSError, ValueError) as error:
        fail(f"the server's control socket did not answer properly: {error}")
    if not answer.get("ok"):
        fail(str(answer.get("error", "the server refused the request")))
    return answer


def tell_server(config: Config, command: str, **arguments: object) -> bool:
    """Best effort: True when a running server took the request (none running is fine)."""
    answer = server_answer(config, command, **arguments)
    return answer is not None and answer.get("ok") is True


def server_answer(config: Config, command: str, **arguments: object) -> dict[str, Any] | None:
    """The running server's answer ({"ok": ..., ...}), or None when none answers."""
    try:
        return control.request(config.control_socket, command, arguments)
    except (control.NotRunning, OSError, ValueError):
        return None
