"""`mailfence top`, `stats` and `status`: the running server's state, read through its
control socket (history from SQLite, which works with the server stopped)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mailfence.cli.common import ConfigOption, ask_server, database, fail, load_config, out
from mailfence.config import parse_duration
from mailfence.observe import control
from mailfence.observe.health import EXIT_CODES
from mailfence.store import history

SPARKS = "▁▂▃▄▅▆▇█"
STATE_STYLE = {"ok": "bold green", "degraded": "bold yellow", "under_attack": "bold red"}
RATE_ROWS = (
    ("connections", "connections"),
    ("connections_refused", "refused at the door"),
    ("auth_ok", "AUTH ok"),
    ("auth_failed", "AUTH failed"),
    ("auth_refused", "AUTH refused before hash"),
    ("auth_cached", "AUTH from cache"),
    ("accepted", "messages accepted"),
    ("delivered", "delivered"),
    ("deferred", "deferred"),
    ("bounced", "bounced"),
    ("bans", "bans made"),
)
# Lines `top` needs besides the session list: header, rates, pool, the three small tables.
TOP_FIXED_LINES = 34
NOT_RUNNING_EXIT = 3  # `status` only: 1 and 2 already mean degraded and under attack


# --- rendering (pure: a snapshot in, rich renderables out) ---------------------------------


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, v * (len(SPARKS) - 1) // top)] for v in values)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def header(snapshot: dict[str, Any]) -> Text:
    health = snapshot["health"]
    conns = snapshot["connections"]
    text = Text()
    text.append("mailfence  ")
    text.append(health["state"].upper(), style=STATE_STYLE.get(health["state"], "bold"))
    text.append(f" ({health['reason']})")
    text.append(f"  up {_duration(snapshot['uptime'])}")
    text.append(f"  connections {conns['open']}/{conns['limit']}")
    if snapshot["under_attack"]:
        text.append("  UNDER-ATTACK MODE", style="bold red")
    door = conns.get("door_process")  # absent from an older server's snapshot
    if door is not None and not door["running"]:
        # The relay's own doors stand in: nothing is lost, but the flood is on its loop.
        text.append(f"  DOOR PROCESS DOWN (restarts {door['restarts']})", style="bold yellow")
    return text


def rates_table(snapshot: dict[str, Any]) -> Table:
    table = Table("per second", "last 10 s", "last 5 min", "last 5 min, 10 s a point")
    table.title = "rates"
    for key, label in RATE_ROWS:
        table.add_row(
            label,
            f"{snapshot['rates']['10s'][key]:.1f}",
            f"{snapshot['rates']['5m'][key]:.2f}",
            sparkline(snapshot["series"][key]),
        )
    return table


def pool_line(snapshot: dict[str, Any]) -> Text:
    pool = snapshot["pool"]
    waits = pool["wait_p99_ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f} ms"

    return Text(
        f"verification pool: {pool['busy']}/{pool['threads']} threads busy "
        f"(strangers may hold {pool['unknown_threads']}); "
        f"queued known {pool['queued']['known']}, retry {pool['queued']['retry']}, "
        f"unknown {pool['queued']['unknown']}; wait p99 known {ms(waits['known'])}, "
        f"retry {ms(waits['retry'])}, unknown {ms(waits['unknown'])}   "
        f"queue {snapshot['spool']['size']}/{snapshot['spool']['max']} messages"
    )


def _small(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> Table:
    table = Table(*columns, title=title)
    for row in rows or [tuple("-" for _ in columns)]:
        table.add_row(*row)
    return table


def attack_tables(snapshot: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    sources = [(s["source"], str(s["failures"])) for s in snapshot["top_sources"][:8]]
    users = [(u["user"], str(u["failures"])) for u in snapshot["top_users"][:8]]
    bans = [
        (
            b["network"],
            "permanent" if b["until"] is None else _clock(b["until"]),
            str(b["reason"])[:40],
        )
        for b in snapshot["recent_bans"][:8]
    ]
    grid.add_row(
        _small("top sources by failures", ("source", "failures"), sources),
        _small("top user names by failures", ("user", "failures"), users),
        _small("recent bans", ("network", "until", "reason"), bans),
    )
    return grid


def sessions_table(snapshot: dict[str, Any], limit: int) -> Table:
    conns = snapshot["connections"]
    shown = snapshot["sessions"][: max(0, limit)]
    table = Table(
        "source",
        "user",
        "state",
        "tls",
        "age",
        "bytes",
        title=f"live connections: {conns['sessions']} sessions, showing the {len(shown)} oldest",
    )
    for s in shown:
        table.add_row(
            s["source"],
            s["user"] or "-",
            s["state"],
            "yes" if s["tls"] else "no",
            _duration(s["age"]),
            str(s["bytes"]),
        )
    return table


def frame(snapshot: dict[str, Any], height: int) -> RenderableType:
    return Group(
        header(snapshot),
        rates_table(snapshot),
        pool_line(snapshot),
        attack_tables(snapshot),
        sessions_table(snapshot, height - TOP_FIXED_LINES),
    )


def _clock(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- top ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keys() -> Iterator[bool]:
    """Single key presses from the terminal (cbreak), restored on the way out."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_key(seconds: float, interactive: bool) -> str:
    if not interactive:
        time.sleep(seconds)
        return ""
    ready, _, _ = select.select([sys.stdin], [], [], seconds)
    return os.read(sys.stdin.fileno(), 16).decode(errors="replace") if ready else ""


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    config: ConfigOption = None,
) -> None:
    """A live view of the running relay: health, rates, the pool, attackers, connections.

    Press q (or Ctrl-C) to leave. --once prints one frame, for scripts.

    Example: mailfence top
    """
    settings = load_config(config)
    height = shutil.get_terminal_size((120, 60)).lines

    def fetch() -> dict[str, Any]:
        sessions = max(0, height - TOP_FIXED_LINES)
        answer = ask_server(settings, "snapshot", sessions=sessions)
        snapshot: dict[str, Any] = answer["snapshot"]  # type: ignore[assignment]
        return snapshot

    if once:
        out.print(frame(fetch(), height))
        return
    console = Console()
    with _keys() as interactive, Live(console=console, screen=True, auto_refresh=False) as live:
        try:
            while True:
                # The terminal's real size each time (it may be resized); LINES and COLUMNS
                # in the environment are often stale copies, and rich would believe them.
                with contextlib.suppress(OSError):
                    size = os.get_terminal_size(sys.stdout.fileno())
                    console.size = (size.columns, size.lines)
                height = console.size.height
                live.update(frame(fetch(), height), refresh=True)
                if _wait_for_key(interval, interactive).lower().startswith("q"):
                    break
        except KeyboardInterrupt:
            pass


# --- stats ----------------------------------------------------------------------------------


def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (schema in README).")] = False,
    since: Annotated[
        str | None,
        typer.Option(help="Also hourly history for this long back: 24h, 7d (kept 30 days)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """The running relay's figures once, and with --since its hourly history.

    The history is read from the database, so --since works with the server stopped.

    Example: mailfence stats --since 24h
    """
    settings = load_config(config)
    rows: list[dict[str, Any]] | None = None
    if since is not None:
        try:
            back = parse_duration(since)
        except ValueError:
            fail(f"--since {since!r} is not a duration (write 24h or 7d)")
        with database(config) as (_, conn):
            rows = history.since(conn, time.time() - back)
    live: dict[str, Any] | None
    try:
        answer = control.request(settings.control_socket, "snapshot", {"sessions": 0})
        live = answer.get("snapshot") if answer.get("ok") else None
    except (control.NotRunning, OSError, ValueError):
        live = None
    if live is None and rows is None:
        fail(f"no mailfence server is running (no answer on {settings.control_socket})")
    if as_json:
        if live is not None:
            live.pop("sessions", None)
        document = {"version": 1, "live": live, "history": rows}
        out.print(json.dumps(document, indent=2), markup=False)
        return
    if live is None:
        out.print("no server running: history only", markup=False)
    else:
        out.print(header(live))
        out.print(rates_table(live))
        out.print(pool_line(live))
        totals = Table("since start", "count", title="totals")
        for key, label in RATE_ROWS:
            totals.add_row(label, str(live["totals"][key]))
        out.print(totals)
        out.print(attack_tables(live))
    if rows is not None:
        out.print(history_table(rows))


def history_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "hour (UTC)",
        "connections",
        "refused",
        "AUTH ok",
        "AUTH failed",
        "AUTH refused",
        "bans",
        "accepted",
        "delivered",
        "bounced",
        "p99 to 250",
        title="hourly history",
    )
    for row in rows:
        p99 = row["p99_to_250_ms"]
        table.add_row(
            _clock(row["hour"]),
            *(
                str(row[key])
                for key in (
                    "connections",
                    "connections_refused",
                    "auth_ok",
                    "auth_failed",
                    "auth_refused",
                    "bans",
                    "accepted",
                    "delivered",
                    "bounced",
                )
            ),
            "-" if p99 is None else f"≤{p99:.0f} ms",
        )
    return table


# --- status ---------------------------------------------------------------------------------


def status(config: ConfigOption = None) -> None:
    """Print the health state and exit 0 (ok), 1 (degraded), 2 (under attack), 3 (not running).

    For monitoring: the exit code alone says it.

    Example: mailfence status || echo "look at mailfence top"
    """
    settings = load_config(config)
    try:
        answer = control.request(settings.control_socket, "health")
    except (control.NotRunning, OSError, ValueError) as error:
        typer.echo(f"mailfence: {error}", err=True)
        raise typer.Exit(NOT_RUNNING_EXIT) from None
    state = str(answer.get("state"))
    out.print(f"{state}: {answer.get('reason')}", markup=False)
    raise typer.Exit(EXIT_CODES.get(state, 1))
