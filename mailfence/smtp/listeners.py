"""The gate at accept time: refuse a connection on the spot, or give it a session."""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import uvloop
import uvloop.loop as uvloop_loop

from mailfence.config import Config, Listener
from mailfence.defense import Action, ConnectVerdict, Defense
from mailfence.defense.net import IPAddress, IPNetwork, parse_ip
from mailfence.smtp import replies, steering
from mailfence.smtp.door import Door, open_listening_sockets, refuse
from mailfence.smtp.handler import RelayHandler
from mailfence.smtp.session import RelaySMTP
from mailfence.smtp.strangers_door import StrangersDoorProcess

log = logging.getLogger("mailfence.smtp")


OPENING_GRACE = 5.0  # seconds close() waits for transports still being made
DOOR_PROCESS_START = 10.0  # seconds start() waits for the strangers' door process


class ListenError(Exception):
    """A listener could not be opened; the message names the key and the fix."""


class GateProtocol(asyncio.Protocol):
    """The first protocol of an admitted connection: hands it to a `RelaySMTP` session.

    The gate's decision was taken when the connection was accepted (`Listeners.accepted`),
    before any transport existed; a refused connection never gets here. On an implicit-TLS
    listener the session starts behind a TLS layer.
    """

    def __init__(
        self,
        listeners: Listeners,
        listener: Listener,
        address: IPAddress,
        verdict: ConnectVerdict | None,
    ) -> None:
        self.listeners = listeners
        self.listener = listener
        self.address: IPAddress | None = address  # None once the slot is released
        self.handed_over = False
        self.verdict = verdict  # None: a trusted proxy, whose client is judged later

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listeners = self.listeners
        address = self.address
        if address is None:  # abandoned before the transport existed
            transport.close()
            return
        if listeners.draining:
            transport.write(_SHUTTING_DOWN)  # type: ignore[attr-defined]
            transport.close()
            return
        if self.verdict is None:
            self._accept_from_proxy(transport, address)
            return
        session = listeners.new_session(self.listener, address, self.verdict)
        self.handed_over = True  # from here on the session releases the connection
        if self.listener.tls == "implicit":
            self._wrap_in_tls(transport, session, address)
        else:
            transport.set_protocol(session)
            session.connection_made(transport)

    def abandon(self) -> None:
        """The transport could not be made: give the slot back."""
        if not self.handed_over and self.address is not None:
            self._release()

    def _accept_from_proxy(self, transport: asyncio.BaseTransport, proxy: IPAddress) -> None:
        """A trusted proxy (checked at accept time): the client's own address, known once the
        header is read, goes through the gate in `handle_PROXY`. The proxy's address is never
        counted or banned."""
        listeners = self.listeners
        session = listeners.new_proxied_session(self.listener, proxy)
        self.handed_over = True
        transport.set_protocol(session)
        session.connection_made(transport)

    def _wrap_in_tls(
        self, transport: asyncio.BaseTransport, session: RelaySMTP, address: IPAddress
    ) -> None:
        """Puts a TLS layer between the socket and the session, synchronously.

        `loop.start_tls` is a coroutine: by the time it ran, the event loop would already
        have read the client's first TLS bytes and handed them to this gate. Installing the
        TLS protocol before `connection_made` returns means no byte goes astray.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def handshake_done(future: asyncio.Future[None]) -> None:
            # A failed handshake never reaches the session, so release its slot here.
            if future.cancelled() or future.exception() is not None:
                self.listeners.release(address)

        waiter.add_done_callback(handshake_done)
        # uvloop's own TLS protocol (in C) on a uvloop loop, asyncio's anywhere else.
        protocol_class: Any = getattr(uvloop_loop, "SSLProtocol", None)
        if protocol_class is None or not isinstance(loop, uvloop.Loop):
            protocol_class = sslproto.SSLProtocol
        tls_protocol = protocol_class(
            loop,
            session,
            self.listeners.tls,
            waiter,
            server_side=True,
            call_connection_made=True,
            ssl_handshake_timeout=self.listeners.config.smtp.tls_handshake_timeout,
        )
        transport.set_protocol(tls_protocol)
        tls_protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handed_over and self.address is not None:
            self._release()

    def _release(self) -> None:
        if self.verdict is None:
            self.listeners.open_connections -= 1  # a proxy: counted, never judged
        elif self.address is not None:
            self.listeners.release(self.address)
        self.address = None


def _line(reply: str) -> bytes:
    return reply.encode("ascii") + b"\r\n"


_CONNECT_REPLY = {
    Action.BANNED: replies.BANNED,
    Action.BANNED_PERMANENT: replies.BANNED_PERMANENTLY,
    Action.LIMIT: replies.TOO_MANY_CONNECTIONS,
}
_CONNECT_LINE = {action: _line(reply) for action, reply in _CONNECT_REPLY.items()}
_SHUTTING_DOWN = _line(replies.SHUTTING_DOWN)


class Listeners:
    """All listeners of one server, their admitted connections and live sessions."""

    def __init__(
        self, config: Config, handler: RelayHandler, tls: ssl.SSLContext, defense: Defense
    ) -> None:
        self.config = config
        self.handler = handler
        self.tls = tls
        self.defense = defense
        self.live: dict[RelaySMTP, None] = {}  # insertion order: the oldest first
        self.phases: Counter[str] = Counter()  # live sessions per phase
        self.open_connections = 0  # admitted, including those still in a TLS handshake
        self.doors: list[Door] = []
        self.accepted_from: Counter[str] = Counter()  # connections accepted per queue
        self.steered: list[socket.socket] = []  # the customers' queues (steering.py)
        self.steered_networks: list[IPNetwork] = []
        self._steering_reports: dict[socket.socket, str] = {}  # the last warning, per queue
        self._first_doors: list[Door] = []  # per listener, in config order
        # The common queues' sockets, their listeners and doors, for the strangers' door
        # process (strangers_door.py); the doors accept while it is not running.
        self._common: list[tuple[Listener, socket.socket, Door]] = []
        self.strangers_door: StrangersDoorProcess | None = None
        self.draining = False
        # Admitted connections whose transport is being made (bounded by max_connections).
        self._opening: set[asyncio.Task[None]] = set()

    def accepted(
        self,
        listener: Listener,
        connection: socket.socket,
        peer: Any,
        strangers_checked: bool = False,
    ) -> None:
        """A door's callback: refuse on the spot (a send and a close, no transport) or make
        a transport for the admitted connection, in a task so the door's batch goes on.
        `strangers_checked`: passed on by the strangers' door process, which took it out of
        the strangers' shared rate already."""
        if self.draining:
            refuse(connection, _SHUTTING_DOWN)
            return
        try:
            address = parse_ip(str(peer[0]))
        except (TypeError, ValueError, IndexError):
            connection.close()
            return
        verdict: ConnectVerdict | None = None
        if listener.proxy_protocol:
            if not any(address in net for net in self.config.defense.trusted_proxies):
                log.warning("refused %s: not in defense.trusted_proxies", address)
                connection.close()
                return
            self.open_connections += 1
        else:
            verdict = self.admit(address, strangers_checked)
            if verdict.action is not Action.ALLOW:
                refuse(connection, _CONNECT_LINE[verdict.action])
                return
        gate = GateProtocol(self, listener, address, verdict)
        task = asyncio.get_running_loop().create_task(self._open(connection, gate))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, connection: socket.socket, gate: GateProtocol) -> None:
        loop = asyncio.get_running_loop()
        address = gate.address
        try:
            await loop.connect_accepted_socket(lambda: gate, connection)
        except (KeyboardInterrupt, SystemExit):
            raise  # the loop is going down; the transport may still own the socket
        except BaseException as error:
            gate.abandon()
            connection.close()
            if isinstance(error, asyncio.CancelledError):
                raise
            if not isinstance(error, OSError):
                log.exception("could not open a transport for %s", address)

    def admit(self, address: IPAddress, strangers_checked: bool = False) -> ConnectVerdict:
        """The gate: allowlist, bans, the global limit, then the defense's own limits."""
        max_total = self.config.smtp.max_connections
        if self.open_connections >= max_total and not self.defense.allowed(address):
            self.defense.counters.connections_refused["global limit"] += 1
            return ConnectVerdict(Action.LIMIT, "global connection limit")
        verdict = self.defense.on_connect(
            address, time.time(), self.open_connections, max_total, strangers_checked
        )
        if verdict.action is Action.ALLOW:
            self.open_connections += 1
        elif verdict.bans:
            self.handler.banned(list(verdict.bans))
        return verdict

    def release(self, address: IPAddress) -> None:
        self.open_connections -= 1
        self.defense.on_disconnect(address)

    def release_proxied(self, session: RelaySMTP) -> None:
        self.open_connections -= 1
        if session.proxied_admitted:
            self.defense.on_disconnect(session.address)

    def admit_proxied(self, session: RelaySMTP, client: IPAddress) -> str | None:
        """The gate for a client behind a proxy. Returns the refusal to send, or None."""
        max_total = self.config.smtp.max_connections
        verdict = self.defense.on_connect(client, time.time(), self.open_connections, max_total)
        if verdict.action is not Action.ALLOW:
            if verdict.bans:
                self.handler.banned(list(verdict.bans))
            return _CONNECT_REPLY[verdict.action]
        session.address = client
        session.proxied_admitted = True
        if self.defense.under_attack and not verdict.known_good and not self.defense.monitor:
            session.set_unauthenticated_timeout(self.config.defense.attack_session_timeout)
        return None

    def new_proxied_session(self, listener: Listener, proxy: IPAddress) -> RelaySMTP:
        session = RelaySMTP(
            self.handler,
            config=self.config,
            live=self.live,
            phases=self.phases,
            implicit_tls=False,
            tls_context=self.tls if listener.tls == "starttls" else None,
            address=proxy,
            on_close=lambda _: self.release_proxied(session),
            proxy_protocol_timeout=self.config.smtp.tls_handshake_timeout,
        )
        session.admit_proxied = self.admit_proxied
        return session

    def new_session(
        self, listener: Listener, address: IPAddress, verdict: ConnectVerdict
    ) -> RelaySMTP:
        session = RelaySMTP(
            self.handler,
            config=self.config,
            live=self.live,
            phases=self.phases,
            implicit_tls=listener.tls == "implicit",
            tls_context=self.tls if listener.tls == "starttls" else None,
            address=address,
            on_close=self.release,
        )
        if self.defense.under_attack and not verdict.known_good and not self.defense.monitor:
            # Under attack, strangers get a short leash until they log in.
            session.set_unauthenticated_timeout(self.config.defense.attack_session_timeout)
        return session

    async def start(self) -> None:
        for index, listener in enumerate(self.config.listen):
            try:
                pairs = open_listening_sockets(
                    listener.host,
                    listener.port,
                    backlog=1024,
                    # Behind a proxy the kernel sees only the proxy's address.
                    customers_queue=not listener.proxy_protocol,
                )
            except OSError as error:
                await self.close()
                reason = (
                    "is already in use"
                    if error.errno == errno.EADDRINUSE
                    else f"cannot be opened ({error.strerror or error})"
                )
                raise ListenError(
                    f"{self.config.source}: listen[{index}].address: {listener.address} {reason};"
                    " fix: stop the other process or choose another address"
                ) from None
            doors = [Door(common, self._accepted_on(listener, "common")) for common, _ in pairs]
            for door, (common, customers) in zip(list(doors), pairs, strict=True):
                if customers is not None:
                    doors.append(Door(customers, self._accepted_on(listener, "customers")))
                    self.steered.append(customers)
                    self._common.append((listener, common, door))
            for door in doors:
                door.open()
            self.doors.extend(doors)
            self._first_doors.append(doors[0])
        self.door_process_wanted(self.config)
        # Ready means every part running: the door process's start (a new interpreter, about
        # a second of CPU) is over before the first logins, whose verification times the
        # decoys for unknown names are drawn from. Its own doors accept meanwhile anyway.
        deadline = time.monotonic() + DOOR_PROCESS_START
        while self.strangers_door is not None and not self.strangers_door.ready:
            if time.monotonic() >= deadline:
                log.warning("the strangers' door process is slow to start; going on without")
                break
            await asyncio.sleep(0.02)

    # --- the strangers' door process (strangers_door.py) ------------------------------------

    def door_process_wanted(self, config: Config) -> None:
        """Starts, stops or restarts the strangers' door process for `config`: it runs when
        the defense enforces (in monitor mode the relay's gate logs what it would do) and
        a listener has a customers' queue; a new defense configuration restarts it."""
        wanted = (
            config.defense.door_process
            and config.defense.mode == "enforce"
            and bool(self._common)
            and not self.draining
        )
        running = self.strangers_door
        if running is not None and (not wanted or running.config.defense != config.defense):
            running.stop()
            for _, _, door in self._common:
                door.resume()
            self.strangers_door = running = None
        if wanted and running is None:
            self.strangers_door = StrangersDoorProcess(
                config,
                [(index, sock) for index, (_, sock, _) in enumerate(self._common)],
                [door for _, _, door in self._common],
                self._passed,
                self._counted,
            )
            # Under attack already (a reload restarts the child): its rate from the start.
            self.strangers_door.set_strangers_rate(self.defense.strangers.rate)
            self.strangers_door.start()

    def _passed(self, index: int, connection: socket.socket, address: str) -> None:
        listener = self._common[index][0]
        self.accepted(listener, connection, (address, 0), strangers_checked=True)

    def _counted(
        self, refused: Counter[str], accepted: int, limited: dict[str, int], seconds: float
    ) -> None:
        """What the strangers' door process did since its last report (`seconds` ago), into
        the figures the relay shows (`stats`, `top`, metrics), as if its own door had done
        it; its refusals for the strangers' rate, toward under-attack mode (a connection
        flood); and the sources it refused most, toward a ban for hammering."""
        self.accepted_from["common"] += accepted
        self.defense.counters.connections_refused.update(refused)
        now = time.time()
        self.defense.on_strangers_refused(refused["limit"], seconds, now)
        for text, count in limited.items():
            try:
                address = parse_ip(text)
            except ValueError:
                continue
            bans = self.defense.on_connections_refused(address, count, now)
            if bans:
                self.handler.banned(bans)

    def check_door_process(self) -> None:
        """Once a second: a child that died is started again, and it is told the strangers'
        rate of the defense's mode (again: a child started since, or a message lost on a
        full channel; a change of mode is sent as it happens, strangers_rate_changed)."""
        if self.strangers_door is not None:
            self.strangers_door.check()
            self.strangers_door.set_strangers_rate(self.defense.strangers.rate)

    def strangers_rate_changed(self, per_second: float) -> None:
        """The defense's mode changed the strangers' rate: the door process follows at once,
        not at the next second's check. A flood's first second is when the customers feel
        the strangers let in, each a TLS handshake on their event loop."""
        if self.strangers_door is not None:
            self.strangers_door.set_strangers_rate(per_second)

    def _accepted_on(self, listener: Listener, queue: str) -> Callable[[socket.socket, Any], None]:
        accepted_from = self.accepted_from

        def accepted(connection: socket.socket, peer: Any) -> None:
            accepted_from[queue] += 1
            self.accepted(listener, connection, peer)

        return accepted

    def steer(self, networks: list[IPNetwork]) -> None:
        """Sends connections from `networks` to the customers' queues (steering.py). It
        builds and attaches the programs: run it in a thread, not on the event loop."""
        self.steered_networks = networks
        for sock in self.steered:
            name = sock.getsockname()[0]
            try:
                held = steering.install(sock, networks)
            except OSError as error:
                report = (
                    f"customers' queue on {name}: the kernel refused its program ({error});"
                    " it keeps the one it had (at start: none, and connections are spread"
                    " over both queues)"
                )
            else:
                version = 6 if sock.family == socket.AF_INET6 else 4
                wanted = len({n for n in networks if n.version == version})
                report = (
                    f"customers' queue on {name}: {held} of {wanted} known networks fit its"
                    " program; the rest wait in the common queue (and are let in all the same)"
                    if held < wanted
                    else ""
                )
            if report and report != self._steering_reports.get(sock):
                log.warning("%s", report)
            self._steering_reports[sock] = report

    def bound_ports(self) -> list[int]:
        """The ports actually bound, in listener order (useful when the config says port 0).
        A listener whose host resolves to several addresses reports its first socket's."""
        return [door.port for door in self._first_doors]

    async def stop_accepting(self) -> None:
        self.draining = True
        if self.strangers_door is not None:
            self.strangers_door.stop()  # before the doors: no connection accepted after
            self.strangers_door = None
        for door in self.doors:
            door.close()

    async def close(self) -> None:
        await self.stop_accepting()
        if self._opening:
            # Transports being made for connections admitted just before: they turn into
            # sessions (which see `draining`) within a turn or two; let them, never cancel.
            await asyncio.wait(set(self._opening), timeout=OPENING_GRACE)
        self.doors.clear()
        self._first_doors.clear()
        self._common.clear()
        self.steered.clear()
