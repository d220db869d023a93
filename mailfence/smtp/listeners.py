"""Listening sockets, and the cheap refusal used when a connection must not get a session."""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import Callable
from typing import cast

from mailfence.config import Config, Listener
from mailfence.smtp import replies
from mailfence.smtp.handler import RelayHandler
from mailfence.smtp.session import RelaySMTP


class ListenError(Exception):
    """A listener could not be opened; the message names the key and the fix."""


class RefusalProtocol(asyncio.Protocol):
    """Writes one reply and closes: no session object, no TLS, no greeting work.

    The same idea as aiosmtpd's `_FakeServer` and uvicorn's `service_unavailable`: over a
    limit, a connection should cost microseconds.
    """

    def __init__(self, reply: str) -> None:
        self.reply = reply.encode("ascii") + b"\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.WriteTransport, hence the cast.
        cast(asyncio.WriteTransport, transport).write(self.reply)
        transport.close()


class Listeners:
    """All listeners of one server and the set of their live sessions."""

    def __init__(self, config: Config, handler: RelayHandler, tls: ssl.SSLContext) -> None:
        self.config = config
        self.handler = handler
        self.tls = tls
        self.live: set[RelaySMTP] = set()
        self.servers: list[asyncio.Server] = []
        self.draining = False
        self.refused_connections = 0

    def _factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        implicit = listener.tls == "implicit"
        starttls = listener.tls == "starttls"

        def build() -> asyncio.Protocol:
            if self.draining:
                return RefusalProtocol(replies.SHUTTING_DOWN)
            if len(self.live) >= self.config.smtp.max_connections:
                self.refused_connections += 1
                return RefusalProtocol(replies.TOO_MANY_CONNECTIONS)
            return RelaySMTP(
                self.handler,
                config=self.config,
                live=self.live,
                implicit_tls=implicit,
                tls_context=self.tls if starttls else None,
            )

        return build

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for index, listener in enumerate(self.config.listen):
            implicit = listener.tls == "implicit"
            try:
                server = await loop.create_server(
                    self._factory(listener),
                    host=listener.host,
                    port=listener.port,
                    ssl=self.tls if implicit else None,
                    ssl_handshake_timeout=(
                        self.config.smtp.tls_handshake_timeout if implicit else None
                    ),
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
