"""Listening sockets, and the cheap refusal used when a connection must not get a session."""

from __future__ import annotations

import asyncio
import errno
import ssl
import time
from collections.abc import Callable
from typing import cast

from mailfence.config import Config, Listener
from mailfence.defense import Action, ConnectVerdict, Defense
from mailfence.defense.net import IPAddress, parse_ip
from mailfence.smtp import replies
from mailfence.smtp.handler import RelayHandler
from mailfence.smtp.session import RelaySMTP


class ListenError(Exception):
    """A listener could not be opened; the message names the key and the fix."""


class GateProtocol(asyncio.Protocol):
    """The first protocol of every connection: decide, then refuse or hand over.

    It runs before TLS and before any session object exists, so a banned or over-limit
    source costs one defense lookup, one write and a close. An allowed connection is handed
    to a `RelaySMTP` session (after the TLS handshake, on an implicit-TLS listener).
    """

    def __init__(self, listeners: Listeners, listener: Listener) -> None:
        self.listeners = listeners
        self.listener = listener
        self.address: IPAddress | None = None
        self.handed_over = False
        self.verdict: ConnectVerdict | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listeners = self.listeners
        if listeners.draining:
            _refuse(transport, replies.SHUTTING_DOWN)
            return
        peer = transport.get_extra_info("peername")
        try:
            self.address = parse_ip(str(peer[0]))
        except (TypeError, ValueError, IndexError):
            transport.close()
            return
        verdict = listeners.admit(self.address)
        if verdict.action is not Action.ALLOW:
            self.address = None
            _refuse(transport, _CONNECT_REPLY[verdict.action])
            return
        self.verdict = verdict
        if self.listener.tls == "implicit":
            cast(asyncio.ReadTransport, transport).pause_reading()
            task = asyncio.get_running_loop().create_task(self._start_tls(transport))
            listeners.handshakes.add(task)
            task.add_done_callback(listeners.handshakes.discard)
        else:
            self._hand_over(transport)

    async def _start_tls(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                cast(asyncio.WriteTransport, transport),
                self,
                self.listeners.tls,
                server_side=True,
                ssl_handshake_timeout=self.listeners.config.smtp.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            transport.close()
            return
        if tls_transport is None or tls_transport.is_closing():
            return
        self._hand_over(tls_transport)

    def _hand_over(self, transport: asyncio.BaseTransport) -> None:
        assert self.address is not None and self.verdict is not None
        session = self.listeners.new_session(self.listener, self.address, self.verdict)
        self.handed_over = True
        transport.set_protocol(session)
        session.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handed_over and self.address is not None:
            self.listeners.release(self.address)
            self.address = None


_CONNECT_REPLY = {
    Action.BANNED: replies.BANNED,
    Action.BANNED_PERMANENT: replies.BANNED_PERMANENTLY,
    Action.LIMIT: replies.TOO_MANY_CONNECTIONS,
}


def _refuse(transport: asyncio.BaseTransport, reply: str) -> None:
    # uvloop's transports do not subclass asyncio.WriteTransport, hence the cast.
    cast(asyncio.WriteTransport, transport).write(reply.encode("ascii") + b"\r\n")
    transport.close()


class Listeners:
    """All listeners of one server, their admitted connections and live sessions."""

    def __init__(
        self, config: Config, handler: RelayHandler, tls: ssl.SSLContext, defense: Defense
    ) -> None:
        self.config = config
        self.handler = handler
        self.tls = tls
        self.defense = defense
        self.live: set[RelaySMTP] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.open_connections = 0  # admitted, including those still in a TLS handshake
        self.servers: list[asyncio.Server] = []
        self.draining = False

    def admit(self, address: IPAddress) -> ConnectVerdict:
        """The gate: allowlist, bans, the global limit, then the defense's own limits."""
        max_total = self.config.smtp.max_connections
        if self.open_connections >= max_total and not self.defense.allowed(address):
            self.defense.counters.connections_refused["global limit"] += 1
            return ConnectVerdict(Action.LIMIT, "global connection limit")
        verdict = self.defense.on_connect(address, time.time(), self.open_connections, max_total)
        if verdict.action is Action.ALLOW:
            self.open_connections += 1
        return verdict

    def release(self, address: IPAddress) -> None:
        self.open_connections -= 1
        self.defense.on_disconnect(address)

    def new_session(
        self, listener: Listener, address: IPAddress, verdict: ConnectVerdict
    ) -> RelaySMTP:
        session = RelaySMTP(
            self.handler,
            config=self.config,
            live=self.live,
            implicit_tls=listener.tls == "implicit",
            tls_context=self.tls if listener.tls == "starttls" else None,
            address=address,
            on_close=self.release,
        )
        if self.defense.under_attack and not verdict.known_good:
            # Under attack, strangers get a short leash until they log in.
            session.set_unauthenticated_timeout(self.config.defense.attack_session_timeout)
        return session

    def _factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        def build() -> asyncio.Protocol:
            return GateProtocol(self, listener)

        return build

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listen):
            try:
                server = await loop.create_server(
                    self._factory(listener),
                    host=listener.host,
                    port=listener.port,
                    reuse_address=True,
                    backlog=1024,
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
            self.servers.append(server)

    def bound_ports(self) -> list[int]:
        """The ports actually bound, in listener order (useful when the config says port 0)."""
        ports = []
        for server in self.servers:
            ports.append(server.sockets[0].getsockname()[1])
        return ports

    async def stop_accepting(self) -> None:
        self.draining = True
        for server in self.servers:
            server.close()

    async def close(self) -> None:
        await self.stop_accepting()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
