"""`mailfence ban / unban / bans / allow / explain`: the operator's hand on the defense.

These write the database and work with the server stopped; a running server applies them
within a second (it watches the tables' signature every second).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from mailfence.cli.common import ConfigOption, database, fail, out, server_answer, tell_server
from mailfence.config import Config, parse_duration
from mailfence.defense.bans import Ban, BanSource
from mailfence.defense.net import IPAddress, IPNetwork, parse_ip, prefix_network
from mailfence.observe import control
from mailfence.store import defense as table

bans_app = typer.Typer(
    help="List and clear bans.\n\nExample: mailfence bans --auto",
    invoke_without_command=True,
)
allow_app = typer.Typer(
    help="Networks that are never refused.\n\nExample: mailfence allow add 203.0.113.0/24",
    no_args_is_help=True,
)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        fail(f"{text!r} is not an address or network (write 203.0.113.7 or 203.0.113.0/24)")


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never (permanent)"
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _as_dict(ban: Ban) -> dict[str, Any]:
    return {
        "network": str(ban.network),
        "source": ban.source,
        "reason": ban.reason,
        "created": ban.created,
        "until": ban.until,
        "permanent": ban.permanent,
        "level": ban.level,
        "evidence": ban.evidence,
    }


def ban(
    network: Annotated[str, typer.Argument(help="Address or CIDR network to ban.")],
    duration: Annotated[
        str, typer.Option("--for", help="How long: 30m, 2h, 7d.", show_default=True)
    ] = "2h",
    permanent: Annotated[
        bool, typer.Option("--permanent", help="Until unbanned; refused with 554, not 421.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, for the ledger.")] = "banned by an operator",
    config: ConfigOption = None,
) -> None:
    """Ban an address or network. A running relay refuses it within a second.

    A timed ban is answered 421 (temporary); a --permanent one 554. The allowlist still wins.

    Example: mailfence ban 198.51.100.0/24 --for 12h --reason "spray from a VPS range"
    """
    target = _network(network)
    try:
        seconds = parse_duration(duration)
    except ValueError:
        fail(f"--for {duration!r} is not a duration (write 30m, 2h or 7d)")
    now = time.time()
    record = Ban(target, None if permanent else now + seconds, reason, "manual", now)
    with database(config) as (settings, conn):
        conn.execute("BEGIN IMMEDIATE")
        table.lift(conn, target, now)  # a new ban replaces whatever stood on this network
        table.insert_ban(conn, record)
        conn.execute("COMMIT")
    until = "permanently" if permanent else f"until {_when(record.until)}"
    ban_record = {"network": str(target), "reason": reason, "until": record.until}
    applied = tell_server(settings, "defense-changed", bans=[ban_record])
    out.print(f"banned {target} {until}{_applied(applied)}", markup=False)


def unban(
    network: Annotated[str, typer.Argument(help="Exactly the address or network banned.")],
    config: ConfigOption = None,
) -> None:
    """Lift the bans on an address or network (automatic and manual alike).

    Example: mailfence unban 198.51.100.7
    """
    target = _network(network)
    with database(config) as (settings, conn):
        conn.execute("BEGIN IMMEDIATE")
        lifted = table.lift(conn, target, time.time())
        conn.execute("COMMIT")
    if not lifted:
        # Not in the database, but a running server may hold it in memory only (an
        # automatic ban whose write failed): it can lift that itself.
        answer = server_answer(settings, "unban", network=str(target))
        if answer is not None and answer.get("ok") is True:
            out.print(f"unbanned {target} (it was held only by the running server)", markup=False)
            return
        if answer is not None and not str(answer.get("error", "")).startswith("no ban in force"):
            fail(f"the running server could not lift the ban on {target}: {answer.get('error')}")
        fail(f"no ban in force on exactly {target} (see 'mailfence bans'; 'mailfence explain IP')")
    applied = tell_server(settings, "defense-changed")
    out.print(f"unbanned {target}{_applied(applied)}", markup=False)


@bans_app.callback()
def bans(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    auto: Annotated[bool, typer.Option("--auto", help="Only automatic bans.")] = False,
    manual: Annotated[bool, typer.Option("--manual", help="Only manual bans.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the bans in force, newest last, with why and until when.

    Example: mailfence bans --json
    """
    if ctx.invoked_subcommand is not None:
        return
    source: BanSource | None = None
    if auto != manual:
        source = "auto" if auto else "manual"
    with database(config) as (_, conn):
        found = table.active_bans(conn, time.time(), source)
    if as_json:
        out.print(json.dumps([_as_dict(b) for b in found], indent=2), markup=False)
        return
    view = Table("network", "source", "until", "level", "reason")
    for b in found:
        view.add_row(str(b.network), b.source, _when(b.until), str(b.level), b.reason)
    out.print(view)
    out.print(f"{len(found)} ban(s) in force", markup=False)


@bans_app.command("clear")
def clear(
    auto: Annotated[bool, typer.Option("--auto", help="Lift every automatic ban.")] = False,
    config: ConfigOption = None,
) -> None:
    """Lift every automatic ban at once (manual bans stay).

    Example: mailfence bans clear --auto
    """
    if not auto:
        fail("say what to clear: --auto (manual bans are lifted one by one with 'unban')")
    with database(config) as (settings, conn):
        conn.execute("BEGIN IMMEDIATE")
        lifted = table.lift_auto(conn, time.time())
        conn.execute("COMMIT")
    answer = server_answer(settings, "defense-changed", cleared_auto=True)
    applied = answer is not None and answer.get("ok") is True
    if applied and answer is not None:  # and those the server held only in memory
        lifted += int(answer.get("forgotten", 0))
    out.print(f"lifted {lifted} automatic ban(s){_applied(applied)}", markup=False)


@allow_app.command("add")
def allow_add(
    network: str,
    note: Annotated[str, typer.Option(help="Who this is, for the next operator.")] = "",
    config: ConfigOption = None,
) -> None:
    """Never refuse this address or network: it wins over every ban and limit.

    Example: mailfence allow add 203.0.113.0/24 --note "customer: Example Ltd office"
    """
    target = _network(network)
    with database(config) as (settings, conn):
        conn.execute("BEGIN IMMEDIATE")
        added = table.allow(conn, target, note, time.time())
        conn.execute("COMMIT")
    applied = tell_server(settings, "defense-changed")
    out.print(
        f"{'allowed' if added else 'already allowed:'} {target}{_applied(applied)}", markup=False
    )


@allow_app.command("remove")
def allow_remove(network: str, config: ConfigOption = None) -> None:
    """Take an address or network off the allowlist.

    Example: mailfence allow remove 203.0.113.0/24
    """
    target = _network(network)
    with database(config) as (settings, conn):
        conn.execute("BEGIN IMMEDIATE")
        removed = table.disallow(conn, target)
        conn.execute("COMMIT")
    if not removed:
        fail(f"{target} is not on the allowlist (see 'mailfence allow list')")
    applied = tell_server(settings, "defense-changed")
    out.print(f"removed {target} from the allowlist{_applied(applied)}", markup=False)


@allow_app.command("list")
def allow_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the allowlist (the database's entries and those in [defense] allowlist).

    Example: mailfence allow list
    """
    with database(config) as (settings, conn):
        stored = table.allowlist(conn)
    entries = [{"network": str(n), "from": "database"} for n in stored]
    entries += [{"network": str(n), "from": "config"} for n in settings.defense.allowlist]
    if as_json:
        out.print(json.dumps(entries, indent=2), markup=False)
        return
    for entry in entries:
        out.print(f"{entry['network']}  ({entry['from']})", markup=False)


def _applied(applied: bool) -> str:
    return "; applied by the running server" if applied else ""


def _live_counters(settings: Config, ip: IPAddress) -> dict[str, Any] | None:
    try:
        answer = control.request(settings.control_socket, "explain", {"ip": str(ip)})
    except (control.NotRunning, OSError, ValueError):
        return None
    live = answer.get("live")
    return live if isinstance(live, dict) else None


def explain(
    address: Annotated[str, typer.Argument(help="The address to explain.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Say what the relay thinks of an address: allowlisted, banned (why, until when)?

    Also its ban history and the users known to log in from its network.

    With a server running, also its live counters: open connections, recent connection
    rate, distinct wrong passwords in the window, user names tried.

    Example: mailfence explain 198.51.100.7
    """
    try:
        ip = parse_ip(address)
    except ValueError:
        fail(f"{address!r} is not an IP address")
    now = time.time()
    with database(config) as (settings, conn):
        d = settings.defense
        prefix = prefix_network(ip, d.ipv4_prefix, d.ipv6_prefix)
        allowed = [n for n in [*table.allowlist(conn), *d.allowlist] if ip in n]
        in_force = [b for b in table.active_bans(conn, now) if ip in b.network]
        history = [b for b in table.ban_history_for(conn, ip) if b not in in_force]
        pairs = [
            (u, p, w)
            for u, p, w in table.known_good(conn, now - d.known_good_window)
            if p == prefix
        ]
    verdict = (
        "allowed (allowlist wins over every ban and limit)"
        if allowed
        else "refused: banned"
        if in_force
        else "not banned"
    )
    report = {
        "address": str(ip),
        "prefix": str(prefix),
        "verdict": verdict,
        "allowlisted_by": [str(n) for n in allowed],
        "bans_in_force": [_as_dict(b) for b in in_force],
        "ban_history": [_as_dict(b) for b in history],
        "known_good_users_from_prefix": [
            {"user": u, "last_success": w} for u, _, w in sorted(pairs)
        ],
        "live": _live_counters(settings, ip),
    }
    if as_json:
        out.print(json.dumps(report, indent=2), markup=False)
        return
    out.print(f"{ip} (network {prefix}): {verdict}", markup=False)
    for b in in_force:
        out.print(
            f"  banned: {b.network} ({b.source}) until {_when(b.until)}: {b.reason}", markup=False
        )
        if b.evidence:
            out.print(f"    evidence: {json.dumps(b.evidence)}", markup=False)
    for b in history:
        out.print(f"  earlier ban: {b.network} {_when(b.created)}: {b.reason}", markup=False)
    for u, _, w in sorted(pairs):
        out.print(f"  known-good: {u} last logged in {_when(w)}", markup=False)
    if not pairs:
        out.print(
            "  no user has logged in from this network in the known-good window", markup=False
        )
    live = report["live"]
    if not isinstance(live, dict):
        out.print("  live counters: no server running", markup=False)
        return
    rate = live["connections_in_rate_window"]
    out.print(
        f"  live: {live['open_connections_from_source']} open connection(s) from it, "
        f"{live['open_connections_from_prefix']} from its network; "
        f"{rate['source']} connection(s) in the last {rate['window_seconds']:.0f} s, "
        f"refused {live['refused_connections_in_window']} time(s) in that window "
        f"(ban at {live['ban_after_refused_connections'] or 'never'})",
        markup=False,
    )
    out.print(
        f"  live: {live['distinct_wrong_passwords']} distinct wrong password(s) in the last "
        f"{live['failure_window_seconds']:.0f} s (ban at {live['ban_after_failures']}); "
        f"user names tried: {', '.join(live['usernames_tried']) or 'none'}",
        markup=False,
    )
    if live["usernames_under_attack"]:
        names = ", ".join(live["usernames_under_attack"])
        out.print(f"  live: under attack (strangers refused): {names}", markup=False)
