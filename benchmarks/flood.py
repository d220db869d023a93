"""Bot flood: the incident (shared/incident-postmortem.txt) reproduced against `mailfence serve`.

    .venv/bin/python benchmarks/flood.py [--mode concentrated|distributed|spray|all]
        [--baseline 20] [--flood 20] [--recovery 20] [--floor 20] [--bots 200]
        [--bot-processes 2] [--bot-nice 10] [--bot-warmup 3] [--relay-door]
        [--defense "KEY = VALUE" ...] [--repeat 1]

For each mode, a fresh `mailfence serve` (its own state directory, the [defense] defaults,
`auth.failure_reply = "permanent"` so that 535 means "a password was checked", a generous
`smtp.max_connections`) relays to Postfix's smtp-sink, and four phases run back to back:

  baseline  legitimate traffic only;
  flood     legitimate traffic and the bots;
  recovery  legitimate traffic only again (bans and under-attack mode may still be in force);
  floor     legitimate traffic to mailfence, and the same bots aimed at a null server instead:
            a separate process that answers every connection with a 421 at once and keeps no
            state. mailfence does no work for the bots, so what the customers see here is what
            this machine gives them while it also runs the bots and their connections: the
            floor under any relay's flood figure on this machine. Measured in the same run as
            the other phases, so the flood can be compared with it.

Warm-up, before the baseline: each of the 20 customers logs in once, from its own address, with
the right password. That makes its (user, /24) pair known-good (the relay persists it) and fills
the credential cache, as months of normal traffic would have; the median AUTH round trip of
these 20 first logins is one argon2 verification on this machine ("hash time" below).

Legitimate traffic: 20 accounts, 5 messages/s in total (each account one every 4 s), each from
its own fixed source address 127.10.0.N; every message is one connection: EHLO, STARTTLS, EHLO,
AUTH PLAIN, MAIL, RCPT, DATA, QUIT. Sent open-loop on a fixed schedule and never retried: a
message counts as accepted only if its one attempt got the 250. Times are from the start of the
connect: "auth" to the AUTH reply, "250" to the reply after the final dot.

Bots warm up first: before the baseline, for --bot-warmup seconds, they flood the null server
(below), so that in the flood they are as warm as in the floor phase. Started cold, their own
first second (new connections, Python's first runs of their code) slowed the customers at the
flood's start, on this machine and not in mailfence: of the three slowest messages of nine
floods (three runs of each mode, interleaved), 8 fell in the flood's first 1.5 s with the bots
cold and 4 with them warm. The customers' mean in the first 2 s over the rest (auth / 250, the
three runs averaged) went from +1.3 / +2.5 ms to -0.3 / -0.4 in spray, and from +0.5 / +0.1
to -0.5 / -0.6 in distributed. Concentrated mode's start stayed (+0.9 / +2.1 cold, +1.5 / +2.2
warm): that one is mailfence's own (its ten addresses were not banned at all until
`ban_after_refused_connections`; now they are within two or three seconds).

Bots (flood phase only): --bots concurrent connections in --bot-processes processes, each
reconnecting at once after its connection ends, with random wrong passwords (never the same
twice, so the negative cache cannot answer for the hash):
  concentrated  10 addresses in 127.66.0.0/24, 5 AUTH tries per connection; half the user
                names tried are the 20 real ones, half random names that do not exist;
  distributed   5,000 addresses, 100 in each of 50 /24s (127.70.0-49.x), 1-3 tries per
                connection and then the next address; random names that do not exist;
  spray         like distributed (127.80.0-49.x), but the names are the 20 real accounts.

Every bot attempt is classed by the answer it got (a connection that ends before its first
AUTH is one attempt):
  hashed      535 for an existing user: the password hash was checked (the only class that
              costs argon2; unknown names never hash);
  decoy       535 for a name that does not exist (a sleep as long as a hash, no CPU);
  454         refused before hashing (budget, ban, name under attack, lane full);
  421 auth    421 or close in answer to AUTH (session budget used up, or just banned);
  door        421/554 in place of the greeting, a refused or reset connect, or a close before
              AUTH (bans and connection limits, decided before TLS);
  timeout     no answer within 30 s (not answered);
  client      an error on the bots' side (e.g. no local port), not counted as an attempt.

Each accepted message's time is also split into its steps (p50 / p99 per phase): connect to
the greeting (waiting to be accepted: with the customers' queue, smtp/steering.py, not behind
the bots), the STARTTLS exchange (EHLO, STARTTLS, the handshake, EHLO), AUTH, and MAIL to
the 250 (MAIL, RCPT, DATA, the message and the spool's commit).

Loop lag: one idle session from the known-good address 127.10.0.1 sends NOOP every 20 ms for the
whole run; its round trips are reported per phase.

Bot waits: the flood bots time their own answers, but they run niced in saturated processes, so
their figures include their own loop's lag. What a bot waits for is measured by a sampler: one
more process, not niced and lightly loaded, that opens 20 bot connections a second during the
flood (same mode, same addresses and names) and times the greeting (from the start of the
connect) and each AUTH reply.

Waiting for a CPU: how long the relay's event loop and the customers' client (each process's
main thread) were runnable but on a run queue, from /proc/<pid>/schedstat, per second of each
phase: what the machine's two cores being busy cost them directly, apart from the rest (the
kernel's work for the bots' packets, caches shared with them).

CPU: utime + stime from /proc of the `mailfence serve` process and all its descendants (the
delivery process), sampled at each phase boundary. "per 1,000 refused" is the relay's CPU during
the flood divided by the bot attempts it answered (all of which were refusals), in ms; "net" first
subtracts the baseline phase's CPU rate (the legitimate traffic's share).

Goals (the issue), judged per mode (p99 is the nearest rank: with the default 100 samples a
phase it is the second largest, with 50 it would be the max):
  1. 100% of legitimate messages accepted during the flood, with no retry;
  2. legitimate p99 (auth and 250) in the flood <= 1.5 x baseline;
  3. back to baseline in recovery, taken as recovery p99 <= 1.25 x baseline p99;
  4. a bot is never kept waiting because mailfence is busy: the sampler's p99 wait <= 2 x hash
     time + 50 ms (one verification plus slack: waiting in the verification queue or behind a
     stalled event loop shows up above it); the count over the limit and the max are shown;
  5. mailfence's CPU per 1,000 refused bot attempts: reported;
  6. concentrated mode: < 1% of bot attempts reach the hash (all attempts, door refusals
     included; the share of those that got as far as an AUTH command is shown too);
  7. reported, not a goal of the issue: the floor phase's p99 against the baseline (what the
     machine alone does to the customers), and the flood's p99 against the floor (what
     mailfence's handling of the bots adds on top of that).

One run's p99 of 100 messages is decided by its two slowest, and on a shared 2-core machine a
stall of 10-20 ms now and then is enough: --repeat N runs the modes N times over, interleaved,
each with a fresh relay, counts the runs in which each goal was met, and pools each mode's
runs into one p99 per phase (N x 100 messages).

The flood's first 2 s are also shown apart (customers' mean time against the rest of the
flood): until under-attack mode starts, strangers are let in at the normal rate and their
first logins are checked, which the customers feel; the floor phase has no such start.

The bots run with --bot-nice (default 10) so that on this 2-core machine, where they share the
CPUs with the relay, they take what the relay leaves rather than half of it: real bots run on
other machines. Their CPU is reported.

Everything binds to and connects to 127.x addresses (Linux routes 127.0.0.0/8 to lo); every
loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from common import (
    client_tls_context,
    cpu_between,
    cpu_seconds,
    free_port,
    percentile,
    run_delay_seconds,
    stopping,
    tree_cpu,
    verdict,
    wait_for_port,
)

HOST = "127.0.0.1"
RECIPIENT = "sink@example.net"
CLIENT_HOSTNAME = "client.bench"
CUSTOMERS = 20
LEGIT_RATE = 5.0  # messages per second, all customers together
PROBE_SOURCE = "127.10.0.1"  # a customer's address: known-good after the warm-up
MODES = ("concentrated", "distributed", "spray")
PARTS = ("baseline", "flood", "floor")  # pooled over repeated runs
START_SECONDS = 2.0  # the flood's start, shown apart: before the defense has taken hold
PHASES = ("baseline", "flood", "recovery", "floor")
NULL_DOOR_REPLY = b"421 4.7.0 Too many connections, try again later\r\n"

SMTP_SINK = "/usr/sbin/smtp-sink"
MAILFENCE = Path(sys.executable).with_name("mailfence")
READY_TIMEOUT = 60.0  # client processes importing, the relay starting
COMMAND_TIMEOUT = 30.0  # one SMTP reply
PROBE_INTERVAL = 0.02
MAX_REPLY_LINES = 100
MAX_CONNECTIONS_PER_BOT = 1_000_000  # a count bound on every bot's loop
MAX_SAMPLES = 200_000  # per list, per process
STOP_GRACE = 5.0  # after the flood, in-flight bot connections get this long
SAMPLER_RATE = 20.0  # bot-like connections per second from the (un-niced) sampler
SAMPLER_CONCURRENCY = 100
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux

ATTEMPT_CLASSES = ("hashed", "decoy", "454", "421 auth", "door", "timeout", "other")
ANSWERED = ("hashed", "decoy", "454", "421 auth", "door", "other")


def customer_name(index: int) -> str:
    return f"customer{index + 1:02d}@example.com"


def customer_source(index: int) -> str:
    return f"127.10.0.{index + 1}"


# --- small helpers --------------------------------------------------------------------------


def auth_plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


def build_message(sender: str, serial: int) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{RECIPIENT}>\r\nSubject: flood benchmark {serial}\r\n"
        f"Message-ID: <flood-{serial}-{secrets.token_hex(6)}@client.bench>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + "A customer's message, sent while the bots knock.\r\n"
        * 8
    ).encode("ascii")


# --- a minimal SMTP client (asyncio streams): exact timing and every reply code -------------


class Closed(Exception):
    """The server closed the connection (or sent something that is not an SMTP reply)."""


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, source: str, port: int) -> Conn:
        """A connection to the relay from `source` (a 127.x address)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Let connect() pick the local port per destination: binding first would take one
            # from the source's whole range at bind time.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer)

    async def reply(self) -> int:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            for _ in range(MAX_REPLY_LINES):
                line = await self.reader.readline()
                if not line.endswith(b"\n") or len(line) < 4 or not line[:3].isdigit():
                    raise Closed
                if line[3:4] != b"-":
                    return int(line[:3])
        raise Closed

    async def command(self, line: bytes) -> int:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def starttls(self, tls: ssl.SSLContext) -> None:
        """EHLO, STARTTLS, the handshake, EHLO again (RFC 3207 §4.2)."""
        if await self.command(b"EHLO " + CLIENT_HOSTNAME.encode()) != 250:
            raise Closed
        if await self.command(b"STARTTLS") != 220:
            raise Closed
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await self.writer.start_tls(tls)
        if await self.command(b"EHLO " + CLIENT_HOSTNAME.encode()) != 250:
            raise Closed

    def abort(self) -> None:
        """Close at once with a reset (bots do not say goodbye, and leave no TIME_WAIT)."""
        with contextlib.suppress(OSError):
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        self.writer.transport.abort()

    async def quit(self) -> None:
        with contextlib.suppress(Closed, OSError, TimeoutError):
            await self.command(b"QUIT")
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(5):
                await self.writer.wait_closed()


# --- the legitimate customers (one process) -------------------------------------------------


@dataclass
class Message:
    scheduled: float
    customer: int
    ok: bool = False
    failure: str = ""
    to_greeting: float = 0.0
    to_tls: float = 0.0
    to_auth: float = 0.0
    to_250: float = 0.0


def steps(record: Message) -> tuple[float, float]:
    return record.to_greeting, record.to_tls


async def send_one(
    port: int, customer: int, password: str, serial: int, tls: ssl.SSLContext, record: Message
) -> None:
    """One message on one connection, never retried."""
    user = customer_name(customer)
    stage = "connect"
    conn: Conn | None = None
    started = time.perf_counter()
    try:
        conn = await Conn.open(customer_source(customer), port)
        stage = "greeting"
        if (code := await conn.reply()) != 220:
            record.failure = f"greeting {code}"
            return
        record.to_greeting = time.perf_counter() - started
        stage = "starttls"
        await conn.starttls(tls)
        record.to_tls = time.perf_counter() - started
        stage = "auth"
        code = await conn.command(auth_plain(user, password))
        record.to_auth = time.perf_counter() - started
        if code != 235:
            record.failure = f"auth {code}"
            return
        stage = "mail"
        for line, expected in (
            (f"MAIL FROM:<{user}>".encode(), 250),
            (f"RCPT TO:<{RECIPIENT}>".encode(), 250),
            (b"DATA", 354),
        ):
            if (code := await conn.command(line)) != expected:
                record.failure = f"{line.split(b':')[0].decode()} {code}"
                return
        stage = "data"
        conn.writer.write(build_message(user, serial) + b".\r\n")
        code = await conn.reply()
        record.to_250 = time.perf_counter() - started
        if code != 250:
            record.failure = f"data {code}"
            return
        record.ok = True
    except (Closed, OSError, ssl.SSLError):
        record.failure = f"{stage}: connection closed or refused"
    except TimeoutError:
        record.failure = f"{stage}: timeout"
    finally:
        if conn is not None:
            await conn.quit()


async def probe(port: int, end: float, samples: list[tuple[float, float]]) -> None:
    """NOOP every 20 ms on one idle session: how quickly the relay's loop answers."""
    try:
        conn = await Conn.open(PROBE_SOURCE, port)
    except OSError:
        return
    try:
        if await conn.reply() != 220:
            return
        for _ in range(int((end - time.monotonic()) / PROBE_INTERVAL) + 1):
            if time.monotonic() >= end:
                break
            sent = time.perf_counter()
            if await conn.command(b"NOOP") != 250:
                break
            samples.append((time.monotonic(), time.perf_counter() - sent))
            await asyncio.sleep(PROBE_INTERVAL)
    except (Closed, OSError, TimeoutError):
        pass
    finally:
        await conn.quit()


async def customers(
    port: int, passwords: list[str], start: float, end: float
) -> tuple[list[Message], list[tuple[float, float]]]:
    tls = client_tls_context()
    samples: list[tuple[float, float]] = []
    probing = asyncio.create_task(probe(port, end, samples))
    records: list[Message] = []
    tasks: set[asyncio.Task[None]] = set()
    total = int((end - start) * LEGIT_RATE)
    for serial in range(total):  # open loop: message n starts at start + n / rate
        at = start + serial / LEGIT_RATE
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        customer = serial % CUSTOMERS
        record = Message(scheduled=at, customer=customer)
        records.append(record)
        task = asyncio.create_task(
            send_one(port, customer, passwords[customer], serial, tls, record)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=8 * COMMAND_TIMEOUT)
    await probing
    return records, samples


def customer_process(
    port: int,
    passwords: list[str],
    ready: multiprocessing.Queue[str],
    start_queue: multiprocessing.Queue[tuple[float, float]],
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    ready.put("ready")
    start, end = start_queue.get(timeout=READY_TIMEOUT * 5)
    records, samples = uvloop.run(customers(port, passwords, start, end))
    results.put(
        {
            "messages": [
                (r.scheduled, r.customer, r.ok, r.failure, r.to_auth, r.to_250, *steps(r))
                for r in records
            ],
            "probe": samples,
        }
    )


# --- the bots (--bot-processes processes) ---------------------------------------------------


@dataclass
class BotStats:
    attempts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTEMPT_CLASSES, 0))
    client_errors: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    greeting: list[float] = field(default_factory=list)  # connect start -> greeting
    auth: dict[str, list[float]] = field(default_factory=dict)  # AUTH sent -> reply, by class

    def count(self, kind: str) -> None:
        self.attempts[kind] += 1

    def auth_time(self, kind: str, seconds: float) -> None:
        times = self.auth.setdefault(kind, [])
        if len(times) < MAX_SAMPLES:
            times.append(seconds)


class BotPlan:
    """Which source a connection comes from, which names it tries and how often."""

    def __init__(self, mode: str, process_index: int, processes: int) -> None:
        self.mode = mode
        self.real = [customer_name(i) for i in range(CUSTOMERS)]
        if mode == "concentrated":
            self.sources = [f"127.66.0.{i}" for i in range(1, 11)]
        else:
            second = 70 if mode == "distributed" else 80
            everything = [f"127.{second}.{n}.{h}" for h in range(1, 101) for n in range(50)]
            # Each process walks its own share, interleaved across the /24s.
            self.sources = everything[process_index::processes]
        self.next_source = 0

    def connection(self, rng: random.Random) -> tuple[str, list[str]]:
        if self.mode == "concentrated":
            source = rng.choice(self.sources)
            return source, [self.name(rng) for _ in range(5)]
        source = self.sources[self.next_source % len(self.sources)]
        self.next_source += 1
        return source, [self.name(rng) for _ in range(rng.randint(1, 3))]

    def name(self, rng: random.Random) -> str:
        if self.mode == "spray" or (self.mode == "concentrated" and rng.random() < 0.5):
            return rng.choice(self.real)
        return f"{secrets.token_hex(5)}@example.com"  # no such account


async def bot_connection(
    port: int, source: str, names: list[str], real: set[str], tls: ssl.SSLContext, stats: BotStats
) -> None:
    started = time.perf_counter()
    try:
        conn = await Conn.open(source, port)
    except OSError as error:
        if isinstance(error, ConnectionError):  # refused or reset by the relay: answered
            stats.count("door")
        else:
            key = f"connect: {error.strerror or type(error).__name__}"
            stats.client_errors[key] = stats.client_errors.get(key, 0) + 1
        return
    stats.connections += 1
    try:
        await bot_session(conn, started, names, real, tls, stats)
    finally:
        conn.abort()


async def bot_session(
    conn: Conn,
    started: float,
    names: list[str],
    real: set[str],
    tls: ssl.SSLContext,
    stats: BotStats,
) -> None:
    try:
        code = await conn.reply()
        if len(stats.greeting) < MAX_SAMPLES:
            stats.greeting.append(time.perf_counter() - started)
        if code != 220:
            stats.count("door")
            return
        await conn.starttls(tls)
    except (Closed, OSError, ssl.SSLError):
        stats.count("door")
        return
    except TimeoutError:
        stats.count("timeout")
        return
    for name in names:
        sent = time.perf_counter()
        try:
            code = await conn.command(auth_plain(name, secrets.token_urlsafe(12)))
        except (Closed, OSError, ssl.SSLError):
            stats.auth_time("421 auth", time.perf_counter() - sent)
            stats.count("421 auth")
            return
        except TimeoutError:
            stats.count("timeout")
            return
        if code == 535:
            kind = "hashed" if name in real else "decoy"
        elif code == 454:
            kind = "454"
        elif code == 421:
            kind = "421 auth"
        else:
            kind = "other"
        stats.auth_time(kind, time.perf_counter() - sent)
        stats.count(kind)
        if code == 421:
            return


async def bot(
    port: int, plan: BotPlan, end: float, tls: ssl.SSLContext, stats: BotStats, seed: int
) -> None:
    rng = random.Random(seed)
    real = set(plan.real)
    for _ in range(MAX_CONNECTIONS_PER_BOT):
        if time.monotonic() >= end:
            return
        source, names = plan.connection(rng)
        await bot_connection(port, source, names, real, tls, stats)


async def bots(port: int, plan: BotPlan, count: int, start: float, end: float) -> BotStats:
    tls = client_tls_context()
    stats = BotStats()
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    tasks = [
        asyncio.create_task(bot(port, plan, end, tls, stats, secrets.randbits(64)))
        for _ in range(count)
    ]
    # Past the end and a grace period, whatever is still in flight is abandoned (uncounted).
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, end - time.monotonic()) + STOP_GRACE)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return stats


async def sample_bots(port: int, plan: BotPlan, rate: float, start: float, end: float) -> BotStats:
    """Bot-like connections at a low, fixed rate from a process that is neither niced nor
    busy: what a bot waits for, without the flood bots' own scheduling delays in it."""
    tls = client_tls_context()
    stats = BotStats()
    rng = random.Random(secrets.randbits(64))
    real = set(plan.real)
    plan.next_source = rng.randrange(len(plan.sources))
    tasks: set[asyncio.Task[None]] = set()
    for serial in range(int((end - start) * rate)):
        await asyncio.sleep(max(0.0, start + serial / rate - time.monotonic()))
        if len(tasks) >= SAMPLER_CONCURRENCY:
            stats.client_errors["sampler: too many in flight, skipped"] = (
                stats.client_errors.get("sampler: too many in flight, skipped", 0) + 1
            )
            continue
        source, names = plan.connection(rng)
        task = asyncio.create_task(bot_connection(port, source, names, real, tls, stats))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return stats


def bot_process(
    mode: str,
    index: int,
    processes: int,
    count: int,
    nice: int,
    sampler_rate: float,
    ready: multiprocessing.Queue[str],
    start_queue: multiprocessing.Queue[list[tuple[float, float, int]]],
    results: multiprocessing.Queue[list[dict[str, Any]]],
) -> None:
    """A flood bot process (`count` connections at once), or the sampler (`sampler_rate`).

    It runs once per window (start, end, port) it is given, and reports one result each."""
    if nice:
        os.nice(nice)
    plan = BotPlan(mode, index, processes)
    ready.put("ready")
    parts: list[dict[str, Any]] = []
    for start, end, port in start_queue.get(timeout=READY_TIMEOUT * 5):
        if sampler_rate:
            stats = uvloop.run(sample_bots(port, plan, sampler_rate, start, end))
        else:
            stats = uvloop.run(bots(port, plan, count, start, end))
        parts.append(
            {
                "attempts": stats.attempts,
                "client_errors": stats.client_errors,
                "connections": stats.connections,
                "greeting": stats.greeting,
                "auth": stats.auth,
            }
        )
    results.put(parts)


class NullDoor(asyncio.Protocol):
    """Answers every connection with a 421 and closes it: no decision, no TLS, no state."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(NULL_DOOR_REPLY)  # type: ignore[attr-defined]
        transport.close()


def null_door_process(port_queue: multiprocessing.Queue[int]) -> None:
    """The floor phase's target: the least a server can do for a bot (see the docstring)."""

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(NullDoor, HOST, 0, backlog=1024)
        port_queue.put(server.sockets[0].getsockname()[1])
        await asyncio.sleep(3600)  # terminated by the parent well before this

    uvloop.run(serve())


# --- the sink and the relay -----------------------------------------------------------------


class Sink:
    """smtp-sink (or benchmarks/sink.py) on a loopback port, throwing every message away."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.output = directory / "sink.out"
        if Path(SMTP_SINK).exists():
            # -c: counters on stdout; -m: connections served at once; -u: required as root.
            command = [SMTP_SINK, "-c", "-m", "1024"]
            command += ["-u", "nobody"] if os.geteuid() == 0 else []
            command += [f"{HOST}:{self.port}", "1024"]
            self.description = "smtp-sink (Postfix)"
        else:
            here = Path(__file__).resolve().parent
            command = [sys.executable, str(here / "sink.py"), str(self.port), "--seconds", "900"]
            self.description = "benchmarks/sink.py (aiosmtpd)"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, time.monotonic() + READY_TIMEOUT, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def write_config(path: Path, state_dir: Path, port: int, sink_port: int, extra: str = "") -> None:
    path.write_text(
        f'state_dir = "{state_dir}"\n\n'
        f'[[listen]]\naddress = "{HOST}:{port}"\ntls = "starttls"\n\n'
        '[smtp]\nhostname = "relay.bench"\nmax_connections = 2000\n\n'
        # 535 only when a password was really checked (or an unknown name's decoy): countable.
        '[auth]\nfailure_reply = "permanent"\n\n'
        f'[relay]\nupstream = "smtp://{HOST}:{sink_port}"\n' + extra,
        encoding="utf-8",
    )


def make_accounts(directory: Path, sink_port: int) -> tuple[Path, list[str]]:
    """The 20 customers' accounts, in a state directory each mode starts from a copy of."""
    state_dir = directory / "template-state"
    config = directory / "template.toml"
    write_config(config, state_dir, free_port(), sink_port)
    passwords = [secrets.token_urlsafe(16) for _ in range(CUSTOMERS)]
    for index, password in enumerate(passwords):  # one at a time: one SQLite writer
        subprocess.run(
            [
                str(MAILFENCE),
                "users",
                "add",
                customer_name(index),
                "--password-stdin",
                "--config",
                str(config),
            ],
            input=f"{password}\n".encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
    return state_dir, passwords


class Relay:
    """`mailfence serve` as a subprocess, with a fresh copy of the accounts' state directory."""

    def __init__(self, directory: Path, template: Path, sink_port: int, extra: str = "") -> None:
        self.port = free_port()
        self.config = directory / "mailfence.toml"
        self.state_dir = directory / "state"
        self.log = directory / "mailfence.log"
        self.stop_seconds = 0.0
        shutil.copytree(template, self.state_dir)
        write_config(self.config, self.state_dir, self.port, sink_port, extra)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(MAILFENCE), "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        wait_for_port(self.port, deadline, self.process)
        while b"mailfence ready" not in self.log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_summary(self) -> dict[str, int]:
        """Errors, bans made (addresses and networks) and under-attack mode changes."""
        keys = {
            " ERROR ": "errors",
            " CRITICAL ": "critical",
            "Traceback": "tracebacks",
            "mailfence.smtp: banned ": "bans",
            "under-attack mode": "under-attack changes",
            " slow commit: ": "slow commits",
        }
        counts: dict[str, int] = {}
        for line in self.log.read_text("utf-8", "replace").splitlines():
            for key, name in keys.items():
                if key in line:
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def slow_commits(self) -> list[str]:
        """The writer's own account of its slow commits (where the time went), with times."""
        lines = self.log.read_text("utf-8", "replace").splitlines()
        return [line for line in lines if " slow commit: " in line][:5]

    def stop(self) -> int | None:
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.stop_seconds = time.monotonic() - started
        return self.process.returncode


async def warm_up(port: int, passwords: list[str]) -> list[float]:
    """Each customer logs in once (a real argon2 run each); returns the AUTH round trips."""
    tls = client_tls_context()
    times: list[float] = []
    for index, password in enumerate(passwords):
        conn = await Conn.open(customer_source(index), port)
        try:
            if await conn.reply() != 220:
                raise RuntimeError("warm-up: no greeting")
            await conn.starttls(tls)
            sent = time.perf_counter()
            code = await conn.command(auth_plain(customer_name(index), password))
            times.append(time.perf_counter() - sent)
            if code != 235:
                raise RuntimeError(f"warm-up: {customer_name(index)} got {code} to AUTH")
        finally:
            await conn.quit()
    await asyncio.sleep(1.5)  # the known-good pairs are written in the background
    return times


# --- one mode -------------------------------------------------------------------------------


@dataclass
class BotSummary:
    """The bot processes' figures, added up."""

    attempts: dict[str, int]
    client_errors: dict[str, int]
    connections: int
    greeting: list[float]
    auth: dict[str, list[float]]

    @classmethod
    def merge(cls, parts: list[dict[str, Any]]) -> BotSummary:
        summary = cls(dict.fromkeys(ATTEMPT_CLASSES, 0), {}, 0, [], {})
        for part in parts:
            for key, value in part["attempts"].items():
                summary.attempts[key] += value
            for key, value in part["client_errors"].items():
                summary.client_errors[key] = summary.client_errors.get(key, 0) + value
            summary.connections += part["connections"]
            summary.greeting.extend(part["greeting"])
            for key, values in part["auth"].items():
                summary.auth.setdefault(key, []).extend(values)
        return summary

    @property
    def answered(self) -> int:
        return sum(self.attempts[k] for k in ANSWERED)

    @property
    def auth_commands(self) -> int:
        return sum(self.attempts[k] for k in ("hashed", "decoy", "454", "421 auth", "other"))

    @property
    def auth_times(self) -> list[float]:
        return [x for values in self.auth.values() for x in values]


# (scheduled start, customer, accepted, failure, connect->AUTH reply, connect->250,
#  connect->greeting, connect->end of STARTTLS)
MessageRow = tuple[float, int, bool, str, float, float, float, float]


@dataclass
class ModeResult:
    mode: str
    hash_time: float
    bounds: list[float]  # monotonic: the start of each phase, then the end
    messages: list[MessageRow]
    probe: list[tuple[float, float]]
    cpu: list[float]  # mailfence tree CPU seconds per phase
    # Seconds each phase's event loops spent runnable but waiting for a CPU: the relay's, the
    # customers' client's (each process's main thread, /proc/<pid>/schedstat)
    run_waits: list[tuple[float, float]]
    bot_cpu: float  # in the flood
    bots: BotSummary  # in the flood
    sampler: BotSummary
    floor_bot_cpu: float
    floor_bots: BotSummary
    null_door_cpu: float  # in the floor phase
    log: dict[str, int]
    slow_commits: list[str]
    exit_code: int | None

    def phase_of(self, when: float) -> int:
        for index in range(len(PHASES)):
            if when < self.bounds[index + 1]:
                return index
        return len(PHASES) - 1

    def duration(self, phase: int) -> float:
        return self.bounds[phase + 1] - self.bounds[phase]


def known_good_rows(state_dir: Path) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / "mailfence.sqlite3", timeout=10)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM known_good").fetchone()[0])
        except sqlite3.Error:
            return -1


def run_mode(
    mode: str,
    args: argparse.Namespace,
    directory: Path,
    template: Path,
    sink: Sink,
    passwords: list[str],
) -> ModeResult:
    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[str] = context.Queue()
    start_queue: multiprocessing.Queue[tuple[float, float]] = context.Queue()
    bot_start: multiprocessing.Queue[list[tuple[float, float, int]]] = context.Queue()
    sampler_start: multiprocessing.Queue[list[tuple[float, float, int]]] = context.Queue()
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    bot_results: multiprocessing.Queue[list[dict[str, Any]]] = context.Queue()
    sampler_results: multiprocessing.Queue[list[dict[str, Any]]] = context.Queue()
    null_port: multiprocessing.Queue[int] = context.Queue()
    settings = [*args.defense, *(["door_process = false"] if args.relay_door else [])]
    extra = "\n[defense]\n" + "".join(f"{line}\n" for line in settings) if settings else ""
    relay = Relay(directory / mode, template, sink.port, extra)
    null_door = context.Process(target=null_door_process, args=(null_port,), daemon=True)
    with stopping(relay):
        customers_proc = context.Process(
            target=customer_process,
            args=(relay.port, passwords, ready, start_queue, results),
            daemon=True,
        )
        per_process = [
            args.bots // args.bot_processes + (1 if i < args.bots % args.bot_processes else 0)
            for i in range(args.bot_processes)
        ]
        bot_procs = [
            context.Process(
                target=bot_process,
                args=(
                    *(mode, i, args.bot_processes, count, args.bot_nice, 0.0),
                    *(ready, bot_start, bot_results),
                ),
                daemon=True,
            )
            for i, count in enumerate(per_process)
        ]
        sampler_proc = context.Process(
            target=bot_process,
            args=(mode, 0, 1, 0, 0, SAMPLER_RATE, ready, sampler_start, sampler_results),
            daemon=True,
        )
        processes = [customers_proc, sampler_proc, *bot_procs]
        for process in processes:
            process.start()
        null_door.start()
        try:
            null_door_port = null_port.get(timeout=READY_TIMEOUT)
            warm = asyncio.run(warm_up(relay.port, passwords))
            for _ in processes:
                ready.get(timeout=READY_TIMEOUT)
            print(
                f"  warm-up: {len(warm)} customers logged in once each from their own address"
                f" (known-good pairs in the relay's database: {known_good_rows(relay.state_dir)});"
                " median AUTH round trip (one argon2 verification)"
                f" {percentile(warm, 0.5) * 1000:.1f} ms",
                flush=True,
            )
            warmup_start = time.monotonic() + 1.0
            warmup = (warmup_start, warmup_start + args.bot_warmup)
            bounds = [warmup[1] + (1.0 if args.bot_warmup else 0.0)]
            for seconds in (args.baseline, args.flood, args.recovery, args.floor):
                bounds.append(bounds[-1] + seconds)
            start_queue.put((bounds[0], bounds[4]))
            flood_window = (bounds[1], bounds[2], relay.port)
            for _ in bot_procs:
                bot_start.put(
                    ([(*warmup, null_door_port)] if args.bot_warmup else [])
                    + [flood_window, (bounds[3], bounds[4], null_door_port)]
                )
            sampler_start.put([flood_window])  # the flood only
            bot_pids = [p.pid or 0 for p in bot_procs]
            samples: list[dict[int, float]] = []
            bot_samples: list[float] = []
            null_samples: list[float] = []
            wait_samples: list[tuple[float, float]] = []
            for index, when in enumerate(bounds):
                time.sleep(max(0.0, when - time.monotonic()))
                samples.append(tree_cpu(relay.process.pid))
                bot_samples.append(sum(cpu_seconds(pid) for pid in bot_pids))
                null_samples.append(cpu_seconds(null_door.pid or 0))
                wait_samples.append(
                    (
                        run_delay_seconds(relay.process.pid),
                        run_delay_seconds(customers_proc.pid or 0),
                    )
                )
                if index < len(PHASES):
                    print(f"  {PHASES[index]}: {bounds[index + 1] - when:.0f} s ...", flush=True)
            wait = 8 * COMMAND_TIMEOUT + 30
            # The last two windows: the flood's and the floor's (the warm-up's is not counted).
            bot_parts = [bot_results.get(timeout=wait)[-2:] for _ in bot_procs]
            sampler_part = sampler_results.get(timeout=wait)
            legit = results.get(timeout=wait)
        finally:
            null_door.terminate()
            null_door.join(10)
            for process in processes:
                process.join(10)
                if process.is_alive():
                    process.terminate()
                    process.join(10)
    return ModeResult(
        mode=mode,
        hash_time=percentile(warm, 0.5),
        bounds=bounds,
        messages=[(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]) for m in legit["messages"]],
        probe=[(when, rtt) for when, rtt in legit["probe"]],
        cpu=[cpu_between(samples[i], samples[i + 1]) for i in range(len(PHASES))],
        run_waits=[
            (
                wait_samples[i + 1][0] - wait_samples[i][0],
                wait_samples[i + 1][1] - wait_samples[i][1],
            )
            for i in range(len(PHASES))
        ],
        bot_cpu=bot_samples[2] - bot_samples[1],
        bots=BotSummary.merge([part[0] for part in bot_parts]),
        sampler=BotSummary.merge(sampler_part),
        floor_bot_cpu=bot_samples[4] - bot_samples[3],
        floor_bots=BotSummary.merge([part[1] for part in bot_parts]),
        null_door_cpu=null_samples[4] - null_samples[3],
        log=relay.log_summary(),
        slow_commits=relay.slow_commits(),
        exit_code=relay.process.returncode,
    )


# --- the report -----------------------------------------------------------------------------


def ms3(values: list[float]) -> str:
    if not values:
        return f"{'-':>6} {'-':>6} {'-':>6}"
    return (
        f"{percentile(values, 0.5) * 1000:6.1f} {percentile(values, 0.99) * 1000:6.1f}"
        f" {max(values) * 1000:6.1f}"
    )


MODE_DESCRIPTION = {
    "concentrated": "10 addresses in 127.66.0.0/24, 5 AUTH tries per connection,"
    " half real user names",
    "distributed": "5,000 addresses in 50 /24s, 1-3 tries per address, names that do not exist",
    "spray": "5,000 addresses in 50 /24s, 1-3 tries per address, the 20 real user names",
}


@dataclass
class Verdict:
    """One run of one mode, judged: the goals, and the customers' times they came from."""

    goals: list[tuple[str, bool | None]]
    # The customers' times (s), by reply ("auth", "250") and part of the run ("baseline",
    # "flood", "floor", and the flood split into its START_SECONDS and the rest), to pool
    # over repeated runs.
    times: dict[tuple[str, str], list[float]]


def report(result: ModeResult, args: argparse.Namespace) -> Verdict:
    print()
    print(f"=== {result.mode}: {args.bots} bot connections, {MODE_DESCRIPTION[result.mode]}")
    by_phase: list[list[MessageRow]] = [[] for _ in PHASES]
    for message in result.messages:
        by_phase[result.phase_of(message[0])].append(message)
    lag: list[list[float]] = [[] for _ in PHASES]
    for when, rtt in result.probe:
        if result.bounds[0] <= when:
            lag[result.phase_of(when)].append(rtt)
    bots = result.bots
    answered = bots.answered
    header = (
        f"{'phase':<9} {'legit ok':>13}  {'auth p50/p99/max ms':>20}  {'250 p50/p99/max ms':>20}"
        f"  {'loop lag p50/p99/max':>20}  {'bot/s':>6} {'hashed':>6} {'relay CPU':>9}"
    )
    print(header)
    print("-" * len(header))
    to_auth: list[list[float]] = []
    to_250: list[list[float]] = []
    phase_bots = {1: bots, 3: result.floor_bots}
    for phase in range(len(PHASES)):
        messages = by_phase[phase]
        accepted = sum(1 for m in messages if m[2])
        to_auth.append([m[4] for m in messages if m[4] > 0])
        to_250.append([m[5] for m in messages if m[2]])
        share = accepted / len(messages) * 100 if messages else 0.0
        in_phase = phase_bots.get(phase)
        bot_rate = in_phase.answered / result.duration(phase) if in_phase else 0.0
        hashed = bots.attempts["hashed"] if phase == 1 else 0
        cpu = result.cpu[phase] / result.duration(phase) * 100
        print(
            f"{PHASES[phase]:<9} {accepted:>4}/{len(messages):<4}{share:4.0f}%"
            f"  {ms3(to_auth[phase]):>20}  {ms3(to_250[phase]):>20}  {ms3(lag[phase]):>20}"
            f"  {bot_rate:6.0f} {hashed:6d} {cpu:8.0f}%"
        )
    failures: dict[str, int] = {}
    for phase in range(len(PHASES)):
        for m in by_phase[phase]:
            if not m[2]:
                key = f"{PHASES[phase]}: {m[3]}"
                failures[key] = failures.get(key, 0) + 1
    for key, value in sorted(failures.items()):
        print(f"  legit failure {key} x{value}")
    print("  legit p50 / p99 of each step, accepted messages (ms):")
    for phase in range(len(PHASES)):
        done = [m for m in by_phase[phase] if m[2]]
        steps = {
            "connect->greeting": [m[6] for m in done],
            "STARTTLS (EHLO, STARTTLS, handshake, EHLO)": [m[7] - m[6] for m in done],
            "AUTH": [m[4] - m[7] for m in done],
            "MAIL..250": [m[5] - m[4] for m in done],
        }
        print(
            f"    {PHASES[phase]:<9}"
            + "; ".join(
                f"{name} {percentile(values, 0.5) * 1000:.1f}"
                f" / {percentile(values, 0.99) * 1000:.1f}"
                for name, values in steps.items()
                if values
            )
        )
    print(
        "  waited for a CPU (runnable, on a run queue; ms per second of the phase): "
        + "; ".join(
            f"{PHASES[phase]} relay's loop {relay_wait / result.duration(phase) * 1000:.1f},"
            f" customers' {customers_wait / result.duration(phase) * 1000:.1f}"
            for phase, (relay_wait, customers_wait) in enumerate(result.run_waits)
        )
    )
    start = result.bounds[1] + START_SECONDS
    times: dict[tuple[str, str], list[float]] = {}
    for reply, values in (("auth", to_auth), ("250", to_250)):
        for phase, name in ((0, "baseline"), (1, "flood"), (3, "floor")):
            times[reply, name] = values[phase]
    for part, in_part in (("start", True), ("rest", False)):
        done = [m for m in by_phase[1] if m[2] and (m[0] < start) == in_part]
        times["auth", part] = [m[4] for m in done]
        times["250", part] = [m[5] for m in done]
    print(f"  {start_line(times)}")
    for phase in (1, 2, 3):
        slowest = sorted(by_phase[phase], key=lambda m: -max(m[4], m[5]))[:3]
        print(
            f"  slowest legit messages in the {PHASES[phase]} (seconds into it: auth / 250 ms,"
            " of which to the greeting / to the end of STARTTLS): "
            + ", ".join(
                f"+{m[0] - result.bounds[phase]:.1f} s: {m[4] * 1000:.0f} / {m[5] * 1000:.0f}"
                f" ({m[6] * 1000:.0f} / {m[7] * 1000:.0f})"
                for m in slowest
            )
        )

    flood_seconds = result.duration(1)
    print(
        f"bots (flood, {flood_seconds:.0f} s): {answered} attempts answered"
        f" ({answered / flood_seconds:.0f}/s) on {bots.connections} connections: "
        + ", ".join(f"{k} {bots.attempts[k]}" for k in ATTEMPT_CLASSES)
    )
    if bots.client_errors:
        print(f"  bot-side errors (not attempts): {bots.client_errors}")
    print(
        f"  as the flood bots saw it (ms, p50 p99 max; includes their own loop's lag):"
        f" greeting {ms3(bots.greeting)}; AUTH reply {ms3(bots.auth_times)}"
    )
    sampler = result.sampler
    print(
        f"  sampler bot ({SAMPLER_RATE:g} connections/s, not niced; {sampler.answered} attempts:"
        + ", ".join(f" {k} {sampler.attempts[k]}" for k in ATTEMPT_CLASSES if sampler.attempts[k])
        + f"): greeting {ms3(sampler.greeting)}; AUTH reply {ms3(sampler.auth_times)}"
    )
    print(
        "    its AUTH replies by class: "
        + "; ".join(f"{k} {ms3(v)}" for k, v in sorted(sampler.auth.items()) if v)
    )
    if sampler.client_errors:
        print(f"    sampler-side errors: {sampler.client_errors}")
    net = result.cpu[1] - result.cpu[0] / result.duration(0) * flood_seconds
    per_thousand = result.cpu[1] / max(1, answered) * 1e6
    net_per_thousand = net / max(1, answered) * 1e6
    print(
        f"  relay CPU in the flood: {result.cpu[1]:.1f} s"
        f" ({result.cpu[1] / flood_seconds * 100:.0f}% of one core)"
        f" = {per_thousand:.0f} ms per 1,000 refused bot attempts"
        f" ({net_per_thousand:.0f} ms net of the baseline rate); bot processes"
        f" {result.bot_cpu / flood_seconds * 100:.0f}% of one core (nice {args.bot_nice})"
    )
    print(f"  relay log: {result.log or 'nothing notable'}; SIGTERM -> exit {result.exit_code}")
    for line in result.slow_commits:
        print(f"    {line}")
    floor_seconds = result.duration(3)
    floor_bots = result.floor_bots
    print(
        f"floor ({floor_seconds:.0f} s; the same bots aimed at a null server that answers 421 at"
        f" once, mailfence serving the customers only): {floor_bots.answered} answered"
        f" ({floor_bots.answered / floor_seconds:.0f}/s); null server"
        f" {result.null_door_cpu / floor_seconds * 100:.0f}% of one core"
        f" = {result.null_door_cpu / max(1, floor_bots.answered) * 1e6:.0f} ms per 1,000"
        " refused (the kernel's and uvloop's share of a refusal), bot processes"
        f" {result.floor_bot_cpu / floor_seconds * 100:.0f}%"
    )
    if floor_bots.client_errors:
        print(f"  bot-side errors (not attempts): {floor_bots.client_errors}")

    def p99(values: list[float]) -> float:
        return percentile(values, 0.99) * 1000

    def ratio(values: list[float], base: list[float]) -> str:
        return f"{p99(values) / p99(base):.2f}x" if values and base else "-"

    goals: list[tuple[str, bool | None]] = []
    flood_msgs = by_phase[1]
    goals.append(
        (
            "100% of legitimate messages accepted in the flood, no retry"
            f" ({sum(1 for m in flood_msgs if m[2])}/{len(flood_msgs)})",
            bool(flood_msgs) and all(m[2] for m in flood_msgs),
        )
    )
    goals.append(
        (
            f"legit p99 in the flood <= 1.5x baseline (auth {p99(to_auth[1]):.1f} vs"
            f" {p99(to_auth[0]):.1f} ms, 250 {p99(to_250[1]):.1f} vs {p99(to_250[0]):.1f} ms)",
            all(bool(x[1]) and p99(x[1]) <= 1.5 * p99(x[0]) for x in (to_auth, to_250)),
        )
    )
    goals.append(
        (
            f"legit p99 back to baseline in recovery, <= 1.25x (auth {p99(to_auth[2]):.1f},"
            f" 250 {p99(to_250[2]):.1f} ms)",
            all(bool(x[2]) and p99(x[2]) <= 1.25 * p99(x[0]) for x in (to_auth, to_250)),
        )
    )
    limit = 2 * result.hash_time + 0.050
    waits = sampler.greeting + sampler.auth_times
    over = sum(1 for x in waits if x > limit)
    goals.append(
        (
            f"a bot is never kept waiting (sampler): p99 of its waits {p99(waits):.1f} ms <="
            f" {limit * 1000:.0f} ms (2 x hash + 50 ms); {over} of {len(waits)} over,"
            f" max {max(waits, default=0.0) * 1000:.0f} ms",
            bool(waits) and percentile(waits, 0.99) <= limit,
        )
    )
    goals.append(
        (
            f"relay CPU per 1,000 refused bot attempts: {per_thousand:.0f} ms"
            f" ({net_per_thousand:.0f} ms net)",
            None,
        )
    )
    hashed = bots.attempts["hashed"]
    share_all = hashed / max(1, answered) * 100
    share_auth = hashed / max(1, bots.auth_commands) * 100
    text = (
        f"< 1% of bot attempts reach the hash: {hashed} of {answered} = {share_all:.2f}%"
        f" (of the {bots.auth_commands} that got as far as an AUTH command: {share_auth:.1f}%)"
    )
    if result.mode == "concentrated":
        goals.append((text, answered > 0 and share_all < 1.0))
    else:
        goals.append((text + " [goal set for concentrated mode only]", None))
    goals.append(
        (
            "the machine's floor (the same bots at a null server): legit p99 auth"
            f" {p99(to_auth[3]):.1f} ms ({ratio(to_auth[3], to_auth[0])} baseline), 250"
            f" {p99(to_250[3]):.1f} ms ({ratio(to_250[3], to_250[0])}); mailfence in the flood"
            f" against it: auth {ratio(to_auth[1], to_auth[3])}, 250 {ratio(to_250[1], to_250[3])}",
            None,
        )
    )
    print("goals:")
    for label, met in goals:
        mark = "reported" if met is None else verdict(met)
        print(f"  [{mark}] {label}")
    return Verdict(goals, times)


def p99_ratios(times: dict[tuple[str, str], list[float]], reply: str) -> tuple[float, ...]:
    """p99 of each of PARTS, and of the flood and the floor against the baseline."""
    p99s = [
        percentile(times[reply, part], 0.99) * 1000 if times[reply, part] else 0.0 for part in PARTS
    ]
    base = p99s[0] or 1.0
    return (*p99s, p99s[1] / base, p99s[2] / base)


def start_line(times: dict[tuple[str, str], list[float]]) -> str:
    def mean(values: list[float]) -> str:
        return f"{sum(values) / len(values) * 1000:.1f}" if values else "-"

    return (
        f"customers' mean in the flood's first {START_SECONDS:.0f} s (before the defense has"
        f" taken hold) against the rest of it: auth {mean(times['auth', 'start'])} vs"
        f" {mean(times['auth', 'rest'])} ms, 250 {mean(times['250', 'start'])} vs"
        f" {mean(times['250', 'rest'])} ms"
    )


# --- main -----------------------------------------------------------------------------------


def print_summary(summary: list[tuple[str, Verdict]], modes: tuple[str, ...]) -> None:
    print()
    print("summary (p99 ratios to the baseline: in the flood auth / 250; the floor auth / 250)")
    for mode, judged in summary:
        marks = ", ".join(
            f"{i + 1} {'reported' if ok is None else verdict(ok)}"
            for i, (_, ok) in enumerate(judged.goals)
        )
        auth, t250 = p99_ratios(judged.times, "auth"), p99_ratios(judged.times, "250")
        print(
            f"  {mode:<13} {marks}; flood {auth[3]:.2f}x / {t250[3]:.2f}x,"
            f" floor {auth[4]:.2f}x / {t250[4]:.2f}x"
        )
    if len(summary) == len(modes):
        return
    print("goals met, runs of each mode:")
    for mode in modes:
        runs = [judged.goals for name, judged in summary if name == mode]
        counts = ", ".join(
            f"{i + 1}: {sum(1 for goals in runs if goals[i][1])} of {len(runs)}"
            for i in range(len(runs[0]))
            if runs[0][i][1] is not None
        )
        print(f"  {mode:<13} {counts}")
    print("all runs of each mode pooled (each a fresh relay, so the samples are alike):")
    for mode in modes:
        pooled: dict[tuple[str, str], list[float]] = {}
        for name, judged in summary:
            if name == mode:
                for key, values in judged.times.items():
                    pooled.setdefault(key, []).extend(values)
        figures = []
        for reply in ("auth", "250"):
            *p99s, flood, floor = p99_ratios(pooled, reply)
            figures.append(
                f"{reply} p99 {' / '.join(f'{x:.1f}' for x in p99s)} ms"
                f" (flood {flood:.2f}x, floor {floor:.2f}x)"
            )
        count = len(pooled["auth", "baseline"])
        print(
            f"  {mode:<13} baseline / flood / floor, {count} messages a phase: {'; '.join(figures)}"
        )
        print(f"  {'':<13} {start_line(pooled)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--baseline", type=float, default=20.0, help="seconds")
    parser.add_argument("--flood", type=float, default=20.0, help="seconds")
    parser.add_argument("--recovery", type=float, default=20.0, help="seconds")
    parser.add_argument("--floor", type=float, default=20.0, help="seconds")
    parser.add_argument("--bots", type=int, default=200, help="concurrent bot connections")
    parser.add_argument("--bot-processes", type=int, default=2)
    parser.add_argument("--bot-nice", type=int, default=10, help="os.nice() of the bots")
    parser.add_argument(
        "--bot-warmup",
        type=float,
        default=3.0,
        help="seconds the bots flood the null server before the baseline (0: start them cold)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the modes this many times over (interleaved) and count how often each goal"
        " was met: one run's p99 of 100 messages is the second slowest, so one unlucky"
        " message decides the 1.5x goal",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--relay-door",
        action="store_true",
        help="[defense] door_process = false: the strangers' door on the relay's event loop",
    )
    parser.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [defense] setting for the relay, as a TOML line (repeatable), e.g. "
        "--defense 'unknown_connections_per_second = 10'",
    )
    args = parser.parse_args()
    for name in ("baseline", "flood", "recovery", "floor"):
        if not 1.0 <= getattr(args, name) <= 600.0:
            parser.error(f"--{name} must be from 1 to 600 seconds")
    if not 1 <= args.bots <= 5000 or not 1 <= args.bot_processes <= 16:
        parser.error("--bots must be 1..5000 and --bot-processes 1..16")
    if not 1 <= args.repeat <= 20:
        parser.error("--repeat must be 1..20")
    if not 0.0 <= args.bot_warmup <= 60.0:
        parser.error("--bot-warmup must be from 0 to 60 seconds")
    args.bot_processes = min(args.bot_processes, args.bots)
    modes = MODES if args.mode == "all" else (args.mode,)

    directory = Path(tempfile.mkdtemp(prefix="mailfence-flood-"))
    summary: list[tuple[str, Verdict]] = []
    try:
        sink = Sink(directory)
        with stopping(sink):
            print(f"upstream: {sink.description}; {os.cpu_count()} CPUs", flush=True)
            print(f"creating {CUSTOMERS} accounts ...", flush=True)
            template, passwords = make_accounts(directory, sink.port)
            for run in range(args.repeat):
                for mode in modes:
                    which = f" (run {run + 1} of {args.repeat})" if args.repeat > 1 else ""
                    print(f"mode {mode}{which}: fresh relay state", flush=True)
                    where = directory / f"run-{run + 1}"  # each run's relay state, kept apart
                    result = run_mode(mode, args, where, template, sink, passwords)
                    summary.append((mode, report(result, args)))
        print_summary(summary, modes)
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
