"""Every bound holds: connections, the verification pool, timeouts, the spool, caches."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import select
import smtplib
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from mailfence.auth import CredentialCache
from mailfence.smtp import replies
from mailfence.store import Writer, open_database
from mailfence.store.users import User
from mailfence.testing import client_tls_context, free_port

from .conftest import ALICE, StartRelay, starttls_client


def greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(1024)


def test_connection_limit_refuses_with_421_and_recovers(start_relay: StartRelay) -> None:
    relay = start_relay(smtp={"max_connections": 3, "hostname": "relay.test"})
    held = [greeting(relay.starttls_port) for _ in range(3)]
    assert all(banner.startswith(b"220 ") for _, banner in held)
    refused, banner = greeting(relay.starttls_port)
    assert banner == replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    assert refused.recv(1024) == b""  # and closed
    refused.close()
    held[0][0].close()
    time.sleep(0.3)
    again, banner = greeting(relay.starttls_port)
    assert banner.startswith(b"220 ")
    for sock, _ in [*held[1:], (again, b"")]:
        sock.close()


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


def tls_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.starttls(context=client_tls_context())
    client.ehlo()
    return client


SLOW_HASH = {
    "argon2_time_cost": 3,
    "argon2_memory_kib": 128 * 1024,
    "verify_threads": 1,
    "verify_queue": 1,
    "failure_reply": "permanent",
}


def test_full_verification_pool_answers_454_at_once(start_relay: StartRelay) -> None:
    relay = start_relay(auth=SLOW_HASH)
    clients = [tls_session(relay.starttls_port) for _ in range(6)]
    for n, client in enumerate(clients):  # distinct guesses: no two share a verification
        client.send(plain(ALICE, f"wrong password {n}"))
    replies_seen = sorted(client.getreply()[0] for client in clients)
    # One verifying, one waiting: those two are checked (535); the other four are told to
    # come back later (454) instead of queueing behind them.
    assert replies_seen == [454, 454, 454, 454, 535, 535]
    for client in clients:
        client.close()


def test_event_loop_answers_while_the_pool_is_saturated(start_relay: StartRelay) -> None:
    relay = start_relay(auth=SLOW_HASH)
    hashing = [tls_session(relay.starttls_port) for _ in range(2)]
    other = tls_session(relay.starttls_port)
    for n, client in enumerate(hashing):
        client.send(plain(ALICE, f"wrong password {n}"))
    time.sleep(0.05)
    assert other.noop()[0] == 250
    # The NOOP was answered while both verifications were still running or queued.
    waiting = [c.sock for c in hashing if c.sock is not None]
    readable, _, _ = select.select(waiting, [], [], 0)
    assert readable == [] or len(readable) < len(hashing)
    assert sorted(c.getreply()[0] for c in hashing) == [535, 535]
    for client in [*hashing, other]:
        client.close()


def test_idle_session_times_out_with_421(start_relay: StartRelay) -> None:
    relay = start_relay(smtp={"command_timeout": 1.0, "hostname": "relay.test"})
    sock, banner = greeting(relay.starttls_port)
    assert banner.startswith(b"220 ")
    sock.settimeout(5)
    assert sock.recv(1024) == replies.TIMEOUT.encode() + b"\r\n"
    assert sock.recv(1024) == b""
    sock.close()


def test_data_has_its_own_deadline(start_relay: StartRelay) -> None:
    relay = start_relay(smtp={"data_timeout": 1.0, "hostname": "relay.test"})
    with starttls_client(relay) as client:
        client.mail(ALICE)
        client.rcpt("bob@example.org")
        client.send(b"DATA\r\n")
        assert client.getreply()[0] == 354
        client.send(b"Subject: slow\r\n")
        assert client.getreply() == (421, replies.TIMEOUT[4:].encode())


def test_full_spool_answers_452(start_relay: StartRelay, tmp_path: Path) -> None:
    relay = start_relay(
        spool={"max_messages": 2},
        relay={"upstream": f"smtp://127.0.0.1:{free_port()}", "connect_timeout": 1.0},
    )
    with starttls_client(relay) as client:
        for _ in range(2):
            client.mail(ALICE)
            client.rcpt("bob@example.org")
            assert client.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
        client.mail(ALICE)
        client.rcpt("bob@example.org")
        assert client.data(b"Subject: x\r\n\r\nx\r\n") == (452, replies.SPOOL_FULL[4:].encode())


def test_credential_cache_is_bounded_and_expires() -> None:
    cache = CredentialCache(ttl=10.0, max_entries=2)
    users = [User(f"u{n}", "hash", (), False, 1.0) for n in range(3)]
    for user in users:
        cache.remember(user, b"pw", now=0.0)
    assert len(cache) == 2
    assert not cache.hit(users[0], b"pw", now=1.0)  # the oldest was dropped
    assert cache.hit(users[2], b"pw", now=1.0)
    assert not cache.hit(users[2], b"other", now=1.0)
    assert not cache.hit(users[2], b"pw", now=11.0)  # expired
    changed = User("u1", "new hash", (), False, 2.0)
    assert not cache.hit(changed, b"pw", now=1.0)  # a changed account no longer matches


def test_writer_queue_is_bounded_and_loses_nothing(tmp_path: Path) -> None:
    conn = open_database(tmp_path)
    writer = Writer(conn, max_pending=2)
    gate = threading.Event()

    def echo(n: int, c: sqlite3.Connection) -> int:
        return n

    def blocked(c: sqlite3.Connection) -> None:
        gate.wait(10)

    async def main() -> list[int]:
        first = asyncio.ensure_future(writer.run(blocked))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(writer.run(functools.partial(echo, n))) for n in range(10)]
        await asyncio.sleep(0.2)
        assert not any(job.done() for job in jobs)  # waiting for room, not dropped
        gate.set()
        await first
        return list(await asyncio.gather(*jobs))

    assert asyncio.run(main()) == list(range(10))
    writer.close()
    conn.close()


def test_a_slow_commit_is_logged_with_where_the_time_went(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every client in a batch waits for its commit: one slower than 100 ms says so, split
    into the wait for the lock, the jobs and the COMMIT with its fsync."""
    conn = open_database(tmp_path)
    writer = Writer(conn)

    def slow(c: sqlite3.Connection) -> None:
        time.sleep(0.15)  # the jobs' share

    async def main() -> None:
        await writer.run(slow)
        await writer.run(lambda c: None)  # a fast one: not logged

    with caplog.at_level(logging.WARNING, logger="mailfence.store"):
        asyncio.run(main())
    writer.close()
    conn.close()
    [record] = [r for r in caplog.records if "slow commit" in r.getMessage()]
    assert "for 1 job(s)" in record.getMessage()
    running = re.search(r"running them (\d+) ms", record.getMessage())
    assert running is not None and int(running.group(1)) >= 150, record.getMessage()


def test_the_wal_is_checkpointed_on_a_timer_not_by_commits(
    start_relay: StartRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mailfence.server as server_module
    from mailfence.store.writer import WAL_PAGES_BOUND, checkpoint

    calls: list[float] = []

    def spy(conn: sqlite3.Connection) -> None:
        calls.append(time.monotonic())
        checkpoint(conn)

    monkeypatch.setattr(server_module, "checkpoint", spy)
    monkeypatch.setattr(server_module, "CHECKPOINT_INTERVAL", 0.5)
    relay = start_relay()
    # The writer checkpoints inside a commit (where a client's 250 would wait for it) only
    # past a far bound, in case the timed checkpoints fail...
    autocheckpoint = relay.server.writer._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    assert autocheckpoint == WAL_PAGES_BOUND >= 10_000
    # ...so the server does, every CHECKPOINT_INTERVAL, keeping the WAL file bounded.
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(calls) >= 3


def test_a_reset_during_the_starttls_handshake_gives_the_slot_back(
    start_relay: StartRelay,
) -> None:
    """uvloop's TLS layer does not pass on a reset that comes mid-handshake: the session
    must end (and free its connection slot) all the same, not wait forever."""
    relay = start_relay()
    listeners = relay.server.listeners
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", relay.starttls_port), timeout=10)
        sock.recv(1024)
        sock.sendall(b"EHLO client.example\r\n")
        time.sleep(0.05)
        sock.recv(4096)
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(1024).startswith(b"220")
        sock.sendall(b"\x16\x03\x01\x00\xff\x01\x00")  # the start of a ClientHello, no more
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    for _ in range(100):  # bounded: 5 s
        if not listeners.live and listeners.open_connections == 0:
            break
        time.sleep(0.05)
    assert not listeners.live
    assert listeners.open_connections == 0
