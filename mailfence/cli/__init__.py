"""The command line: one Typer app, one sub-app per module (STYLE.md, "Typer")."""

from __future__ import annotations

import multiprocessing
from typing import Annotated

import typer

from mailfence import __version__
from mailfence.cli import config_cmd, defense, install, observe, queue, users
from mailfence.cli.serve import serve

# A traceback must never print local variables: one of them could be a password.
app = typer.Typer(
    name="mailfence",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mailfence {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """An SMTP submission relay that sheds the bots, never the customers.

    Example: mailfence serve
    """


app.command("serve")(serve)
app.add_typer(users.app, name="users")
app.add_typer(queue.app, name="queue")
app.add_typer(config_cmd.app, name="config")
app.command("ban")(defense.ban)
app.command("unban")(defense.unban)
app.add_typer(defense.bans_app, name="bans")
app.add_typer(defense.allow_app, name="allow")
app.command("explain")(defense.explain)
app.command("top")(observe.top)
app.command("stats")(observe.stats)
app.command("status")(observe.status)
app.add_typer(install.app, name="install")


def main() -> None:
    # The delivery process is started with "spawn"; a frozen binary must recognise the child.
    multiprocessing.freeze_support()
    app()
