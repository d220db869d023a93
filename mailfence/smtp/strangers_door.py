"""The strangers' door in a process of its own.

A flood is thousands of connections a second from strangers, nearly all of them refused at
the door. Each refusal is cheap, but on the relay's event loop they add up to most of its
time, and every customer's reply waits behind them (benchmarks/flood.py, distributed mode:
customers' p99 to the AUTH reply 30-32 ms in the flood with the door on the loop, 18-19 ms
with it here; benchmarks/door_cost.py: a refusal here costs what a bare server's does).

Customers' networks already have an accept queue of their own (steering.py), served by the
relay. This child serves the other, common queue: it refuses banned sources and strangers
over their shared rate (defense/strangers.py), and passes every other connection to the
relay over a Unix socket (SCM_RIGHTS), where the full gate runs as before. The relay stays
the authority: the child only sheds what it can decide alone, from the same database the
relay's bans, allowlist and customers' networks are kept in.

Messages on the channel (SOCK_SEQPACKET, one per datagram):
  child -> relay: b"R" ready; b"P<listener> <address>" with a descriptor, a passed
  connection; b"C" + JSON, its counts so far (cumulative), and the addresses it refused most
  for a limit since the last report, with how often (toward a ban for hammering), and the
  seconds since that report. A report comes early (at most once between two regular ones)
  when a tenth of a second's worth of attack_refused_connections_per_second have been
  refused: a connection flood starts under-attack mode in the relay at once.
  relay -> child: b"S<rate>", the strangers' shared rate per second (under-attack mode's,
  or back to normal). The channel closing means the relay is gone, and the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import os
import select
import signal
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from mailfence.config import Config
from mailfence.defense.bans import BanBook
from mailfence.defense.net import IPAddress, IPNetwork, parse_ip, prefix_network
from mailfence.defense.strangers import StrangersDoor
from mailfence.observe.logs import LEVELS, configure_logging
from mailfence.smtp import replies
from mailfence.smtp.door import Door
from mailfence.spawn import spawn_with_channel
from mailfence.store import connect
from mailfence.store import defense as defense_table

log = logging.getLogger("mailfence.smtp")

# The child's CPU priority below the relay's: when the two cores are busy, the customers'
# event loop comes first; the bots wait a little longer in the kernel's queue for their 421.
NICE = 5
ACCEPT_BATCH = 64  # per socket per turn: the child has nothing else to do between batches
RELOAD_INTERVAL = 0.5  # seconds between looks at the bans' and allowlist's signature
KNOWN_GOOD_INTERVAL = 5.0  # seconds between reloads of the customers' networks
REPORT_INTERVAL = 1.0
# Addresses remembered with their parsed form and network: parsing both costs more than the
# rest of a refusal, and a flood repeats the same few thousand addresses.
ADDRESS_CACHE_SIZE = 65_536
# Each report names the sources refused most for a limit since the last one (toward a ban for
# hammering, decided by the relay): at most this many, from at most this many counted.
LIMITED_REPORTED = 64
LIMITED_COUNTED = 65_536
CHANNEL_MESSAGE_BYTES = 8192  # the largest report (LIMITED_REPORTED addresses) fits

_LINES = {
    "banned": replies.BANNED.encode() + b"\r\n",
    "banned_permanent": replies.BANNED_PERMANENTLY.encode() + b"\r\n",
    "limit": replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n",
}

Passed = Callable[[int, socket.socket, str], None]  # (listener index, connection, address)


class StrangersDoorProcess:
    """The relay's handle on the child: start it, take what it passes, watch it, stop it.

    While the child is not running (starting, or dead until the next check), the relay's own
    doors on the common queues accept as before: nothing waits for the child."""

    def __init__(
        self,
        config: Config,
        sockets: list[tuple[int, socket.socket]],
        fallback: list[Door],
        passed: Passed,
        counted: Callable[[Counter[str], int, dict[str, int], float], None],
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.fallback = fallback
        self.passed = passed
        # (refusals by action, connections accepted, refusals for a limit by address) since
        # the last call, and the seconds the child's report covers
        self.counted = counted
        self._process: BaseProcess | None = None
        self._channel: socket.socket | None = None
        self._reported: tuple[Counter[str], int] = (Counter(), 0)
        self.ready = False
        self.restarts = 0
        self.wanted = False
        # The strangers' rate the relay's defense wants, and the one the child was last sent
        # (None: its configuration's, as it started).
        self.strangers_rate: float | None = None
        self._sent_rate: float | None = None

    def start(self) -> None:
        self.wanted = True
        level = logging.getLogger("mailfence").getEffectiveLevel()
        process, parent_end = spawn_with_channel(
            "mailfence-strangers-door",
            _child_main,
            (self.config, [sock for _, sock in self.sockets], level),
            socket.SOCK_SEQPACKET,
        )
        self._channel = parent_end
        self._process = process
        self._reported = (Counter(), 0)
        asyncio.get_running_loop().add_reader(parent_end.fileno(), self._on_channel)

    def _on_channel(self) -> None:
        channel = self._channel
        if channel is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                message, fds, _, _ = socket.recv_fds(channel, CHANNEL_MESSAGE_BYTES, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:
                self._gone()  # the child exited
                return
            if fds:
                self._take(message, fds[0])
            elif message == b"R":
                self.ready = True
                self._sent_rate = None
                self._send_rate()
                for door in self.fallback:  # the child accepts from here on
                    door.hold()
            elif message.startswith(b"C"):
                self._count(message[1:])

    def set_strangers_rate(self, rate: float) -> None:
        """The strangers' shared rate, from the relay's defense (once a second): sent to
        the child when it changes, and again to a child started since."""
        self.strangers_rate = rate
        self._send_rate()

    def _send_rate(self) -> None:
        rate = self.strangers_rate
        if rate is None or rate == self._sent_rate or not self.ready or self._channel is None:
            return
        try:
            self._channel.send(b"S%r" % rate)
        except OSError:
            return  # a full channel: the next second's call sends it
        self._sent_rate = rate

    def _take(self, message: bytes, fd: int) -> None:
        connection = socket.socket(fileno=fd)
        try:
            index_text, address = message[1:].decode().split(" ", 1)
            index = int(index_text)
        except ValueError:
            connection.close()
            return
        connection.setblocking(False)
        self.passed(index, connection, address)

    def _count(self, data: bytes) -> None:
        try:
            report = json.loads(data)
            refused = Counter({str(k): int(v) for k, v in report["refused"].items()})
            accepted = int(report["accepted"])
            limited = {str(k): int(v) for k, v in report.get("limited", {}).items()}
            seconds = float(report.get("seconds", 0.0))
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        before_refused, before_accepted = self._reported
        self._reported = (refused, accepted)
        self.counted(refused - before_refused, accepted - before_accepted, limited, seconds)

    def _gone(self) -> None:
        """The child is gone: the relay's own doors accept again until it is back."""
        self._close_channel()
        for door in self.fallback:
            door.resume()

    def _close_channel(self) -> None:
        self.ready = False
        if self._channel is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None

    def check(self) -> None:
        """From housekeeping, once a second: a child that died is started again."""
        if not self.wanted:
            return
        process = self._process
        if process is not None and process.is_alive():
            return
        if process is not None:
            log.warning(
                "the strangers' door process exited (code %s); starting it again",
                process.exitcode,
            )
            self.restarts += 1
            self._gone()
            process.join(0)
        try:
            self.start()
        except Exception:
            # The relay's own doors go on accepting; the next check tries again.
            log.exception("could not start the strangers' door process")

    def stop(self) -> None:
        """The child stops accepting at once (it keeps nothing worth finishing)."""
        self.wanted = False
        process = self._process
        if process is not None:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            process.join(5)
            self._process = None
        if self._channel is not None:
            self._on_channel()  # its last counts
        self._close_channel()


# --- the child ---------------------------------------------------------------------------


class _Keeper:
    """What the child knows and decides: a subset of the relay's gate, read from the database."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.defense = config.defense
        self.conn = connect(config.database_path)
        self.bans = BanBook()
        self.allowlist: list[IPNetwork] = list(self.defense.allowlist)
        self.known: set[IPNetwork] = set()
        self.strangers = StrangersDoor(self.defense.unknown_connections_per_second)
        self.signature: object = None
        self._addresses: dict[str, tuple[IPAddress, IPNetwork]] = {}
        self.refused: Counter[str] = Counter()
        self.accepted = 0
        # Refusals for a limit by address text since the last report (then cleared).
        self.limited: dict[str, int] = {}
        self.limited_total = 0  # since the last report
        # An early report (a connection flood) once this many are refused between two
        # regular ones: a tenth of a second's worth at attack_refused_connections_per_second.
        self.flood_report_at = max(1, self.defense.attack_refused_connections_per_second // 10)
        self.reported_at = time.monotonic()
        self.next_report = self.reported_at
        self.early_sent = False

    def reload(self, known_good: bool) -> None:
        now = time.time()
        try:
            signature = defense_table.signature(self.conn)
            if signature != self.signature:
                self.signature = signature
                self.bans.replace_all(defense_table.active_bans(self.conn, now))
                allowed = defense_table.allowlist(self.conn)
                self.allowlist = [*self.defense.allowlist, *allowed]
            if known_good:
                since = now - self.defense.known_good_window
                self.known = {prefix for _, prefix, _ in defense_table.known_good(self.conn, since)}
        except sqlite3.Error as error:  # a busy or briefly locked database: next time
            log.warning("strangers' door: could not read the database: %s", error)

    def parse(self, text: str) -> tuple[IPAddress, IPNetwork]:
        """(address, its network) of an address as accept() gives it; raises ValueError."""
        parsed = self._addresses.get(text)
        if parsed is None:
            address = parse_ip(text)
            prefix = prefix_network(address, self.defense.ipv4_prefix, self.defense.ipv6_prefix)
            if len(self._addresses) >= ADDRESS_CACHE_SIZE:
                self._addresses.clear()
            parsed = self._addresses[text] = (address, prefix)
        return parsed

    def report_due(self, now: float) -> bool:
        """Whether to report now: every REPORT_INTERVAL, and once in between as soon as a
        connection flood shows (the relay starts under-attack mode on it)."""
        if now >= self.next_report:
            self.next_report = now + REPORT_INTERVAL
            self.early_sent = False
            return True
        flood = (
            self.defense.attack_refused_connections_per_second > 0
            and self.limited_total >= self.flood_report_at
            and not self.early_sent
        )
        self.early_sent = self.early_sent or flood
        return flood

    def note_limited(self, text: str) -> None:
        """One more refusal for a limit from this address, for the next report."""
        self.limited_total += 1
        limited = self.limited
        if text in limited:
            limited[text] += 1
        elif len(limited) < LIMITED_COUNTED:  # bounded; the report clears it every second
            limited[text] = 1

    def verdict(self, address: IPAddress, prefix: IPNetwork, now: float) -> str | None:
        """The refusal for this connection, or None to pass it to the relay."""
        if any(address in network for network in self.allowlist):
            return None
        ban = self.bans.find(address, now)
        if ban is not None:
            return "banned_permanent" if ban.permanent else "banned"
        if prefix in self.known:
            return None
        return None if self.strangers.admit(address, now) else "limit"


def _child_main(
    config: Config, sockets: list[socket.socket], level: int, channel: socket.socket
) -> None:
    configure_logging(
        config.log.format,
        name if (name := logging.getLevelName(level).lower()) in LEVELS else "info",
        flood_lines=config.log.flood_lines,
        flood_window=config.log.flood_window,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the relay decides when the child stops
    with contextlib.suppress(OSError):
        os.nice(NICE)
    keeper = _Keeper(config)
    keeper.reload(known_good=True)
    # epoll itself rather than selectors: the child wakes for every few connections in a
    # flood, and selectors' bookkeeping per wake cost as much as a refusal's own Python.
    poller = select.epoll()
    acceptors: dict[int, _Acceptor] = {}
    for index, sock in enumerate(sockets):
        sock.setblocking(False)
        acceptors[sock.fileno()] = _Acceptor(sock, index, keeper, channel)
        poller.register(sock.fileno(), select.EPOLLIN)
    channel.setblocking(False)
    poller.register(channel.fileno(), select.EPOLLIN)
    channel.send(b"R")
    next_reload = next_known = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_reload:
            known_good = now >= next_known
            keeper.reload(known_good)
            next_reload = now + RELOAD_INTERVAL
            if known_good:
                next_known = now + KNOWN_GOOD_INTERVAL
        if keeper.report_due(now):
            _report(channel, keeper)
        for fd, _ in poller.poll(RELOAD_INTERVAL):
            acceptor = acceptors.get(fd)
            if acceptor is not None:
                acceptor.accept_batch()
            elif not _from_relay(channel, keeper):
                return


def _from_relay(channel: socket.socket, keeper: _Keeper) -> bool:
    """Reads the relay's messages; False when the relay is gone."""
    for _ in range(16):
        try:
            message = channel.recv(64)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not message:
            return False
        if message.startswith(b"S"):
            try:
                rate = float(message[1:])
            except ValueError:
                continue
            if rate > 0:
                keeper.strangers.set_rate(rate)
    return True


def _report(channel: socket.socket, keeper: _Keeper) -> None:
    limited = keeper.limited
    keeper.limited = {}
    keeper.limited_total = 0
    now = time.monotonic()
    seconds, keeper.reported_at = now - keeper.reported_at, now
    most = heapq.nlargest(LIMITED_REPORTED, limited.items(), key=lambda item: item[1])
    report = json.dumps(
        {
            "refused": keeper.refused,
            "accepted": keeper.accepted,
            "limited": dict(most),
            "seconds": seconds,
        }
    )
    with contextlib.suppress(OSError):  # a full channel: the next report says it all
        channel.send(b"C" + report.encode())


class _Acceptor:
    """One listening socket's accept loop, on bare descriptors.

    A refused connection never becomes a Python socket object: socket._accept() (what
    socket.accept() itself calls) gives the descriptor and the address, and os.write/os.close
    answer and drop it. That object's creation and its close were a quarter of the child's
    Python per refusal."""

    def __init__(
        self, sock: socket.socket, index: int, keeper: _Keeper, channel: socket.socket
    ) -> None:
        self.sock = sock
        self.index = index
        self.keeper = keeper
        self.channel = channel
        self._accept: Callable[[], tuple[int, tuple[str, int]]] = sock._accept  # type: ignore[attr-defined]

    def accept_batch(self) -> None:
        keeper = self.keeper
        now = time.time()  # once a batch: the strangers' rate needs no finer clock than that
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = self._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # one connection lost (reset in the backlog, out of descriptors)
            keeper.accepted += 1
            try:
                address, prefix = keeper.parse(peer[0])
            except (TypeError, ValueError, IndexError):
                os.close(fd)
                continue
            refusal = keeper.verdict(address, prefix, now)
            if refusal is None:
                refusal = self._pass(fd, address)
            elif refusal == "limit":
                keeper.note_limited(peer[0])
            if refusal is not None:
                keeper.refused[refusal] += 1
                # The reply fits any fresh socket's send buffer, so this write cannot block
                # (the accepted descriptor is in blocking mode).
                try:  # noqa: SIM105 (contextlib.suppress costs more than the write, per refusal)
                    os.write(fd, _LINES[refusal])
                except OSError:
                    pass  # the client is already gone: nothing to tell it
            os.close(fd)  # refused, or the relay holds its own descriptor now

    def _pass(self, fd: int, address: IPAddress) -> str | None:
        """Hands the connection to the relay: None, or the refusal when it cannot take it."""
        try:
            socket.send_fds(self.channel, [b"P%d %s" % (self.index, str(address).encode())], [fd])
        except (BrokenPipeError, ConnectionResetError):
            os.close(fd)
            raise SystemExit(0) from None  # the relay is gone
        except OSError:
            # Not keeping up (EAGAIN), or too many descriptors in flight (ETOOMANYREFS): the
            # relay is behind, so shed at once.
            return "limit"
        return None
