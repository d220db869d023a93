"""The defense end to end: real sockets, clients bound to many 127.x.y.z source addresses."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailfence.auth import RETRY_TICKET_MIN_AGE
from mailfence.observe import control
from mailfence.smtp import replies
from mailfence.testing import RunningRelay, Sink, client_tls_context

from .conftest import ALICE, ALICE_PASSWORD, StartRelay


def banner(relay: RunningRelay, source: str) -> bytes:
    """What a new connection from `source` is told first (before any TLS)."""
    with socket.create_connection(
        ("127.0.0.1", relay.starttls_port), timeout=10, source_address=(source, 0)
    ) as sock:
        return sock.recv(1024)


def session(relay: RunningRelay, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10, source_address=(source, 0))
    try:
        client.starttls(context=client_tls_context())
        client.ehlo()
    except BaseException:
        client.close()  # refused mid-handshake: no socket left for the collector to find
        raise
    return client


def auth(client: smtplib.SMTP, user: str, password: str) -> int:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    code, _ = client.docmd("AUTH", "PLAIN " + blob)
    return code


def guess(relay: RunningRelay, source: str, user: str, password: str) -> int:
    """One connection, one wrong-password AUTH; returns the reply code (421 if refused)."""
    try:
        client = session(relay, source)
    except (smtplib.SMTPException, OSError):
        return 421
    try:
        return auth(client, user, password)
    except smtplib.SMTPServerDisconnected:
        return 421
    finally:
        client.close()


def send_as_alice(relay: RunningRelay, source: str) -> int:
    client = session(relay, source)
    try:
        assert auth(client, ALICE, ALICE_PASSWORD) == 235
        client.mail(ALICE)
        client.rcpt("bob@example.org")
        return client.data(b"Subject: still here\r\n\r\nhello\r\n")[0]
    finally:
        client.close()


def cli(relay: RunningRelay, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{relay.config.state_dir}"\n')
    return subprocess.run(
        [sys.executable, "-m", "mailfence", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_concentrated_attack_is_banned_and_the_customer_keeps_sending(
    relay: RunningRelay, sink: Sink
) -> None:
    assert send_as_alice(relay, "127.10.0.1") == 250  # alice's network is known-good now
    codes = [guess(relay, "127.66.0.5", ALICE, f"guess {n}") for n in range(12)]
    assert codes[:9] == [454] * 9
    assert 421 in codes[9:]  # the tenth distinct guess bans the source and closes
    # A banned source is turned away at the door: 421 before TLS or a greeting.
    assert banner(relay, "127.66.0.5") == replies.BANNED.encode() + b"\r\n"
    assert send_as_alice(relay, "127.10.0.1") == 250
    assert len(sink.wait_for(2)) == 2


def test_bans_survive_a_restart(start_relay: StartRelay) -> None:
    relay = start_relay()
    for n in range(10):
        guess(relay, "127.66.0.6", "nobody@example.com", f"guess {n}")
    assert banner(relay, "127.66.0.6").startswith(b"421 ")
    relay.stop()
    again = RunningRelay(relay.config).start()
    try:
        assert banner(again, "127.66.0.6") == replies.BANNED.encode() + b"\r\n"
        assert banner(again, "127.66.1.6").startswith(b"220 ")
    finally:
        again.stop()


def test_cli_ban_applies_to_a_running_relay_within_a_second(
    relay: RunningRelay, tmp_path: Path
) -> None:
    assert banner(relay, "127.77.0.9").startswith(b"220 ")
    result = cli(relay, tmp_path, "ban", "127.77.0.0/24", "--permanent", "--reason", "test")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 1.5
    while banner(relay, "127.77.0.9").startswith(b"220 ") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert banner(relay, "127.77.0.9") == replies.BANNED_PERMANENTLY.encode() + b"\r\n"
    assert cli(relay, tmp_path, "unban", "127.77.0.0/24").returncode == 0
    time.sleep(1.5)
    assert banner(relay, "127.77.0.9").startswith(b"220 ")


def test_allowlisted_address_is_never_refused(start_relay: StartRelay, tmp_path: Path) -> None:
    relay = start_relay(auth={"failure_reply": "permanent"})
    for n in range(10):
        guess(relay, "127.88.0.1", "nobody@example.com", f"guess {n}")
    assert banner(relay, "127.88.0.1").startswith(b"421 ")
    assert cli(relay, tmp_path, "allow", "add", "127.88.0.0/16").returncode == 0
    time.sleep(1.5)
    # The allowlist wins over the ban in force, and over every later failure.
    codes = [guess(relay, "127.88.0.1", "nobody@example.com", f"more {n}") for n in range(15)]
    assert set(codes) == {535}  # each one checked as a wrong password; none refused
    assert banner(relay, "127.88.0.1").startswith(b"220 ")


def test_honeypot_name_bans_the_source(relay: RunningRelay, tmp_path: Path) -> None:
    assert guess(relay, "127.99.0.3", "admin", "admin") == 454
    assert banner(relay, "127.99.0.3").startswith(b"421 ")
    # Recorded like every automatic ban: listed, with its evidence, and kept over a restart.
    listed: list[dict[str, object]] = []
    for _ in range(50):  # bounded: the write is in the background, 5 s at most
        listed = json.loads(cli(relay, tmp_path, "bans", "--json").stdout)
        if listed:
            break
        time.sleep(0.1)
    assert [(b["network"], b["reason"]) for b in listed] == [
        ("127.99.0.3/32", "honeypot user name tried")
    ]


@contextlib.contextmanager
def bans_cannot_be_written(relay: RunningRelay) -> Iterator[None]:
    """A real SQLite failure on every insert into the bans table, while in this block."""
    with sqlite3.connect(relay.config.database_path, timeout=10) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_bans BEFORE INSERT ON bans"
            " BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END"
        )
    try:
        yield
    finally:
        with sqlite3.connect(relay.config.database_path, timeout=10) as conn:
            conn.execute("DROP TRIGGER refuse_bans")


def test_a_ban_the_database_refused_can_still_be_lifted(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """An automatic ban whose write fails holds in the running relay's memory; `mailfence
    unban` must lift it all the same (it finds no row, and asks the relay). The failure is a
    real SQLite error: a trigger that aborts every insert into the bans table."""
    with bans_cannot_be_written(relay):
        assert guess(relay, "127.98.0.4", "admin", "admin") == 454  # honeypot: banned
        assert banner(relay, "127.98.0.4").startswith(b"421 ")
        time.sleep(1.5)  # a reload or two: the ban holds although no row exists
        assert banner(relay, "127.98.0.4").startswith(b"421 ")
    result = cli(relay, tmp_path, "unban", "127.98.0.4")
    assert result.returncode == 0, result.stderr
    assert "held only by the running server" in result.stdout
    assert banner(relay, "127.98.0.4").startswith(b"220 ")  # at once, not within a second
    # `bans clear --auto` lifts such bans too.
    with bans_cannot_be_written(relay):
        assert guess(relay, "127.98.0.5", "admin", "admin") == 454
        assert banner(relay, "127.98.0.5").startswith(b"421 ")
    result = cli(relay, tmp_path, "bans", "clear", "--auto")
    assert result.returncode == 0, result.stderr
    assert "lifted 1 automatic ban(s)" in result.stdout  # the one held only in memory
    assert banner(relay, "127.98.0.5").startswith(b"220 ")


def test_unban_does_not_claim_an_unwritten_ban_that_has_expired(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    """An unwritten ban that ran out is no ban: `unban` says so and exits 1, as it does for
    an expired row, instead of claiming to have lifted it."""
    relay = start_relay(defense={"ban_time": 1.0})
    with bans_cannot_be_written(relay):
        assert guess(relay, "127.98.0.6", "admin", "admin") == 454
        assert banner(relay, "127.98.0.6").startswith(b"421 ")
        time.sleep(1.5)
        assert banner(relay, "127.98.0.6").startswith(b"220 ")  # ran out
        result = cli(relay, tmp_path, "unban", "127.98.0.6")
    assert result.returncode == 1, result.stdout
    assert "no ban in force on exactly 127.98.0.6/32" in result.stderr


def test_clearing_auto_bans_also_ends_one_still_queued_for_writing(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """`bans clear --auto` lifts the rows, then tells the relay. A ban the relay made just
    before, whose write was still waiting for the database (another process held the write
    lock), is written after that lift: it must end too, in the database and in memory alike,
    not linger as a row in force that the relay has forgotten (or come back at a restart)."""
    holder = sqlite3.connect(relay.config.database_path, timeout=10, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the relay's writer now waits for the lock
    try:
        assert guess(relay, "127.98.0.8", "admin", "admin") == 454  # honeypot: banned
        assert banner(relay, "127.98.0.8").startswith(b"421 ")
        answers: list[dict[str, object]] = []
        clearing = threading.Thread(  # what `bans clear --auto` sends after its own lift
            target=lambda: answers.append(
                control.request(
                    relay.config.control_socket, "defense-changed", {"cleared_auto": True}
                )
            )
        )
        clearing.start()
        time.sleep(0.5)
        # A ban made while the command is under way: whether it is lifted too depends on
        # whether its insert lands before the lift; either way, memory and rows must agree.
        assert guess(relay, "127.98.0.9", "admin", "admin") == 454
    finally:
        holder.execute("ROLLBACK")  # the lock is free: the bans' inserts go ahead
        holder.close()
    clearing.join(15)
    assert answers and answers[0]["ok"] is True, answers
    seen = []
    for _ in range(2):  # now, and after a housekeeping round or two
        in_force = [
            ban["network"] for ban in json.loads(cli(relay, tmp_path, "bans", "--json").stdout)
        ]
        assert "127.98.0.8/32" not in in_force
        assert banner(relay, "127.98.0.8").startswith(b"220 ")
        later_banned = "127.98.0.9/32" in in_force
        assert banner(relay, "127.98.0.9").startswith(b"421 " if later_banned else b"220 ")
        seen.append(later_banned)
        time.sleep(1.5)
    assert seen[0] == seen[1]
    assert answers[0]["forgotten"] == (1 if seen[0] else 2)  # each lifted ban counted once


def test_control_unban_counts_a_fresh_ban_once(relay: RunningRelay, tmp_path: Path) -> None:
    """A ban the relay just made is both queued for the database and held in memory; lifting
    it through the control socket lifts one ban, not two."""
    assert guess(relay, "127.98.0.7", "admin", "admin") == 454
    answer = control.request(relay.config.control_socket, "unban", {"network": "127.98.0.7"})
    assert answer == {"ok": True, "network": "127.98.0.7/32", "lifted": 1}
    assert banner(relay, "127.98.0.7").startswith(b"220 ")
    assert json.loads(cli(relay, tmp_path, "bans", "--json").stdout) == []


def test_the_relays_own_bans_do_not_reload_the_ban_list(
    relay: RunningRelay, tmp_path: Path
) -> None:
    """A ban the relay made is in its memory already: writing it must not make housekeeping
    reload every ban (under a flood that was once a second, on the event loop). A CLI ban is
    still applied within a second."""
    loads = relay.server.defense_loads
    assert guess(relay, "127.97.0.1", "admin", "admin") == 454  # honeypot: banned
    for _ in range(50):  # bounded: the write is in the background, 5 s at most
        if json.loads(cli(relay, tmp_path, "bans", "--json").stdout):
            break
        time.sleep(0.1)
    time.sleep(2.5)  # two housekeeping rounds and more
    assert relay.server.defense_loads == loads
    assert banner(relay, "127.97.0.1").startswith(b"421 ")
    with sqlite3.connect(relay.config.database_path, timeout=10) as conn:  # as another
        conn.execute(  # process would (not through the relay): found by the signature
            "INSERT INTO bans (network, until, reason, evidence, source, level, created)"
            " VALUES ('127.97.0.2/32', NULL, 'test', '{}', 'manual', 1, 0)"
        )
    time.sleep(1.5)
    assert relay.server.defense_loads == loads + 1
    assert banner(relay, "127.97.0.2") == replies.BANNED_PERMANENTLY.encode() + b"\r\n"


def test_session_auth_budget_closes_with_421(relay: RunningRelay) -> None:
    client = session(relay, "127.55.0.1")
    assert [auth(client, "nobody@example.com", f"p{n}") for n in range(3)] == [454] * 3
    client.send(b"AUTH PLAIN " + base64.b64encode(b"\0x\0y") + b"\r\n")
    assert client.getreply() == (421, replies.TOO_MANY_AUTH_ATTEMPTS[4:].encode())
    client.close()


def test_spray_against_a_real_name_spares_the_real_user(
    start_relay: StartRelay, sink: Sink
) -> None:
    # "permanent": a checked wrong password is 535, a refusal before hashing stays 454.
    relay = start_relay(auth={"failure_reply": "permanent"})
    assert send_as_alice(relay, "127.10.0.2") == 250
    # Strangers from many networks each try alice's name once: the first few are checked...
    codes = [guess(relay, f"127.{120 + n}.0.1", ALICE, f"spray {n}") for n in range(8)]
    assert codes == [535] * 5 + [454] * 3
    # ...then her name is under attack: strangers are refused before any hashing, and a bot
    # guessing anew from the same place is refused again...
    assert guess(relay, "127.127.0.1", ALICE, "spray again") == 454
    # ...while the same credentials retried from the same place (a mail server's retry)
    # are checked: a first-time customer gets in this way.
    time.sleep(RETRY_TICKET_MIN_AGE)
    assert guess(relay, "127.127.0.1", ALICE, "spray 7") == 535
    # Alice, from the network she always uses, logs in and sends as ever.
    assert send_as_alice(relay, "127.10.0.2") == 250
    assert len(sink.wait_for(2)) == 2


def test_monitor_mode_enforces_nothing(start_relay: StartRelay) -> None:
    relay = start_relay(defense={"mode": "monitor"}, auth={"failure_reply": "permanent"})
    codes = [guess(relay, "127.66.0.8", "nobody@example.com", f"g{n}") for n in range(15)]
    assert set(codes) == {535}  # every guess checked, none refused
    assert guess(relay, "127.66.0.8", "admin", "admin") == 535
    assert banner(relay, "127.66.0.8").startswith(b"220 ")
    assert relay.server.defense.counters.would_have["ban"] >= 1


def test_monitor_mode_under_attack_keeps_strangers_idle_timeout(start_relay: StartRelay) -> None:
    relay = start_relay(
        defense={"mode": "monitor", "attack_failing_sources": 2, "attack_session_timeout": 1},
        auth={"failure_reply": "permanent"},
    )
    assert guess(relay, "127.67.0.1", "a@example.com", "x") == 535
    assert guess(relay, "127.67.1.1", "b@example.com", "x") == 535
    assert relay.server.defense.under_attack  # the mode is reported...
    client = session(relay, "127.67.2.1")
    try:
        time.sleep(2.0)  # ...but not enforced: past the mode's 1 s idle timeout, still open
        assert client.noop()[0] == 250
    finally:
        client.close()


@pytest.mark.parametrize("limit", [2])
def test_per_address_connection_limit(start_relay: StartRelay, limit: int) -> None:
    relay = start_relay(defense={"max_connections_per_ip": limit})
    held = [
        socket.create_connection(
            ("127.0.0.1", relay.starttls_port), source_address=("127.44.0.1", 0)
        )
        for _ in range(limit)
    ]
    try:
        assert all(sock.recv(1024).startswith(b"220 ") for sock in held)
        assert banner(relay, "127.44.0.1") == replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
        assert banner(relay, "127.44.0.2").startswith(b"220 ")  # another address is fine
    finally:
        for sock in held:
            sock.close()


def proxied(relay: RunningRelay, header: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", relay.server.ports[2]), timeout=10, source_address=(source, 0)
    )
    sock.sendall(header)
    return sock


@pytest.fixture
def proxy_relay(start_relay: StartRelay) -> RunningRelay:
    import dataclasses
    import ipaddress

    from mailfence.config import Listener

    relay = start_relay()
    relay.stop()
    config = relay.config
    listeners = (*config.listen, Listener("127.0.0.1:0", "127.0.0.1", 0, "starttls", True))
    defense = dataclasses.replace(
        config.defense, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),)
    )
    return start_relay(dataclasses.replace(config, listen=listeners, defense=defense))


def test_proxy_protocol_takes_the_client_address_from_a_trusted_proxy(
    proxy_relay: RunningRelay, sink: Sink
) -> None:
    relay = proxy_relay
    # A customer behind the proxy: the header names it, and it is served as itself.
    sock = proxied(relay, b"PROXY TCP4 127.30.0.7 127.0.0.1 40000 587\r\n")
    assert sock.recv(1024).startswith(b"220 ")
    sock.close()
    # Its guesses count against its own address, which gets banned, not the proxy's.
    for n in range(10):
        sock = proxied(relay, b"PROXY TCP4 127.31.0.9 127.0.0.1 40000 587\r\n")
        client = smtplib.SMTP()
        client.sock, client.file = sock, None
        client._host = "relay.test"  # type: ignore[attr-defined]  # starttls's SNI name
        assert client.getreply()[0] == 220
        client.starttls(context=client_tls_context())
        client.ehlo()
        auth(client, "nobody@example.com", f"g{n}")
        client.close()
    refused = proxied(relay, b"PROXY TCP4 127.31.0.9 127.0.0.1 40001 587\r\n")
    assert refused.recv(1024) == replies.BANNED.encode() + b"\r\n"
    refused.close()
    other = proxied(relay, b"PROXY TCP4 127.30.0.8 127.0.0.1 40002 587\r\n")
    assert other.recv(1024).startswith(b"220 ")  # the proxy itself is not banned
    other.close()


def test_proxy_protocol_only_from_trusted_proxies(proxy_relay: RunningRelay) -> None:
    sock = proxied(proxy_relay, b"PROXY TCP4 127.30.0.7 127.0.0.1 40000 587\r\n", "127.0.0.2")
    assert closed_without_greeting(sock)  # 127.0.0.2 is no trusted proxy
    garbage = proxied(proxy_relay, b"HELO not a proxy header\r\n")
    assert closed_without_greeting(garbage)


def closed_without_greeting(sock: socket.socket) -> bool:
    try:
        data = sock.recv(1024)
    except ConnectionResetError:
        data = b""
    finally:
        sock.close()
    return data == b""


def test_first_time_customer_told_454_in_a_flood_gets_through_on_retry(
    start_relay: StartRelay, sink: Sink
) -> None:
    # Slow hashing (hundreds of ms) and no waiting room for strangers: while one bot is being
    # verified, every other stranger is told 454 at once.
    relay = start_relay(
        auth={
            "argon2_time_cost": 8,
            "argon2_memory_kib": 65536,
            "verify_threads": 2,
            "verify_threads_unknown": 1,
            "verify_queue": 0,
        },
        defense={
            "unknown_connections_per_second": 10_000,
            "connection_rate_per_prefix": 10_000,
            # The verification pool's own retry lane, out of under-attack mode (in it, no
            # stranger reaches a hash on a first try: the test below).
            "attack_failures_per_minute": 10**6,
            "attack_failing_sources": 10**6,
        },
    )
    pool = relay.server.pool
    stop = threading.Event()

    def bot(n: int) -> None:
        # Password spraying against the real name, a new source and a new guess every time.
        for i in range(2_000):
            if stop.is_set():
                return
            guess(relay, f"127.70.{n}.{i % 250 + 1}", ALICE, f"bot {n} guess {i}")

    def a_bot_is_hashing() -> None:
        deadline = time.monotonic() + 10
        while pool.busy_by_lane["unknown"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pool.busy_by_lane["unknown"] == 1

    def try_login(source: str) -> int:
        client = session(relay, source)
        try:
            a_bot_is_hashing()
            return auth(client, ALICE, ALICE_PASSWORD)
        finally:
            client.close()

    bots = [threading.Thread(target=bot, args=(n,), daemon=True) for n in range(4)]
    for thread in bots:
        thread.start()
    try:
        # A network alice has never used: the strangers' thread is taken, so she is told 454
        # (a bot finishing in the instant between the check and her AUTH would let her in at
        # once; then a second new network is tried).
        first_tries = {}
        for n in range(5):
            source = f"127.31.{n}.1"
            first_tries[source] = try_login(source)
            if first_tries[source] == 454:
                break
        assert 454 in first_tries.values(), first_tries
        # Her server retries with the same password from the same address: she waits for the
        # strangers' thread ahead of every bot, and gets in although the flood goes on.
        time.sleep(RETRY_TICKET_MIN_AGE)
        assert try_login(source) == 235
        assert pool.busy_by_lane["unknown"] + len(pool.waiting["unknown"]) <= 1
    finally:
        stop.set()
        for thread in bots:
            thread.join(timeout=30)
    assert send_as_alice(relay, source) == 250  # and her network is known-good from now on
    assert relay.server.defense.lane(ALICE, ipaddress.ip_address(source), time.time()) == "known"
    assert sink.wait_for(1)


def test_under_attack_a_first_time_customer_gets_in_on_its_retry(
    start_relay: StartRelay, sink: Sink
) -> None:
    relay = start_relay(
        auth={"failure_reply": "permanent"},
        # The strangers' connection rate in the mode is another test's (test_strangers_door).
        defense={"attack_failing_sources": 3, "attack_unknown_connections_per_second": 1000},
    )
    # Three strangers fail (made-up names, each checked): the third starts under-attack mode.
    names = [f"bot{n}@example.com" for n in range(3)]
    assert [guess(relay, f"127.121.{n}.1", name, "guess") for n, name in enumerate(names)] == [
        535
    ] * 3
    assert relay.server.defense.under_attack
    # From then on a stranger's first try is refused before any hashing, for a real name as
    # for a made-up one...
    assert guess(relay, "127.122.0.1", ALICE, "a guess") == 454
    assert guess(relay, "127.122.0.2", "nobody@example.com", "a guess") == 454
    # ...so alice's server, from a network it has never used, is told 454 too...
    client = session(relay, "127.123.0.1")
    try:
        assert auth(client, ALICE, ALICE_PASSWORD) == 454
    finally:
        client.close()
    # ...and gets in on its retry: the same password from the same address.
    time.sleep(RETRY_TICKET_MIN_AGE)
    assert send_as_alice(relay, "127.123.0.1") == 250
    assert sink.wait_for(1)


def test_a_new_customers_connections_at_once_all_get_in(start_relay: StartRelay) -> None:
    """A customer's server, new to the relay, opens four connections and logs in on all of
    them at the same instant: one verification answers the four (the strangers' lane has no
    queue, so three would otherwise be told 454)."""
    relay = start_relay(auth={"argon2_time_cost": 8, "argon2_memory_kib": 65536})
    copies = 4
    ready = threading.Barrier(copies, timeout=30)
    codes: list[int] = []

    def log_in() -> None:
        client = session(relay, "127.32.0.1")
        try:
            ready.wait()  # every session past STARTTLS: the four AUTH commands go together
            codes.append(auth(client, ALICE, ALICE_PASSWORD))
        finally:
            client.close()

    threads = [threading.Thread(target=log_in) for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert codes == [235] * copies
    assert len(relay.server.pool.recent_seconds) == 1  # one argon2 run for the four


def test_an_automatic_ban_made_while_the_ban_list_is_reloading_holds(relay: RunningRelay) -> None:
    """A reload whose read began before an automatic ban was committed must not drop that
    ban from memory. The read is made slow for real: SQLite crawling under a handler."""
    import asyncio

    from mailfence.defense import Ban

    server = relay.server
    slow = threading.Event()

    def crawl() -> int:
        if slow.is_set():
            time.sleep(0.1)
        return 0

    server.watch_conn.set_progress_handler(crawl, 10)
    bot = ipaddress.ip_address("127.54.0.9")
    outcome: list[object] = []

    async def scenario() -> None:
        slow.set()
        loading = asyncio.create_task(server._load_defense_state(initial=False))
        await asyncio.sleep(0.05)  # the reload has its snapshot and is crawling through it
        now = time.time()
        ban = Ban(ipaddress.ip_network("127.54.0.9/32"), now + 3600, "test", "auto", now)
        server.defense.bans.put(ban)  # as the defense does when it bans
        server._persist_bans([ban])
        await asyncio.wait(list(server.background))  # the ban is committed
        slow.clear()
        await loading
        outcome.append(server.defense.bans.find(bot, time.time()))

    def start() -> None:
        task = asyncio.get_running_loop().create_task(scenario())
        task.add_done_callback(lambda t: outcome.append(t.exception()) if t.exception() else None)

    relay.call(start)
    deadline = time.monotonic() + 20
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome and isinstance(outcome[0], Ban), outcome
    assert banner(relay, "127.54.0.9").startswith(b"421 ")
