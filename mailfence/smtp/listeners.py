"""Listening sockets, and the cheap refusal used when a connection must not get a session."""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import errno
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import uvloop
import uvloop.loop as uvloop_loop

from mailfence.config import Config, Listener
from mailfence.defense import Action, ConnectVerdict, Defense
from mailfence.defense.net import IPAddress, parse_ip
from mailfence.smtp import replies
from mailfence.smtp.handler import RelayHandler
from mailfence.smtp.session import RelaySMTP

log = logging.getLogger("mailfence.smtp")


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
        if self.listener.proxy_protocol:
            self._accept_from_proxy(transport, self.address)
            return
        verdict = listeners.admit(self.address)
        if verdict.action is not Action.ALLOW:
            self.address = None
            _refuse(transport, _CONNECT_REPLY[verdict.action])
            return
        self.verdict = verdict
        session = listeners.new_session(self.listener, self.address, verdict)
        self.handed_over = True  # from here on the session releases the connection
        if self.listener.tls == "implicit":
            self._wrap_in_tls(transport, session, self.address)
        else:
            transport.set_protocol(session)
            session.connection_made(transport)

    def _accept_from_proxy(self, transport: asyncio.BaseTransport, proxy: IPAddress) -> None:
        """A PROXY-protocol listener: only trusted proxies may connect, and the client's own
        address (known once the header is read) goes through the gate in `handle_PROXY`.
        The proxy's address is never counted or banned."""
        listeners = self.listeners
        if not any(proxy in net for net in listeners.config.defense.trusted_proxies):
            log.warning("refused %s: not in defense.trusted_proxies", proxy)
            transport.close()
            return
        listeners.open_connections += 1
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
        self.live: dict[RelaySMTP, None] = {}  # insertion order: the oldest first
        self.phases: Counter[str] = Counter()  # live sessions per phase
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

    def release_proxied(self, session: RelaySMTP) -> None:
        self.open_connections -= 1
        if session.proxied_admitted:
            self.defense.on_disconnect(session.address)

    def admit_proxied(self, session: RelaySMTP, client: IPAddress) -> str | None:
        """The gate for a client behind a proxy. Returns the refusal to send, or None."""
        max_total = self.config.smtp.max_connections
        verdict = self.defense.on_connect(client, time.time(), self.open_connections, max_total)
        if verdict.action is not Action.ALLOW:
            return _CONNECT_REPLY[verdict.action]
        session.address = client
        session.proxied_admitted = True
        if self.defense.under_attack and not verdict.known_good:
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
