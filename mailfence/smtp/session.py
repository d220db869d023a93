"""One SMTP connection: aiosmtpd's SMTP protocol with the relay's rules around it.

aiosmtpd does the protocol; this subclass adds what a relay needs per connection: it joins
the live set (a `set`, as uvicorn does, so a snapshot is a copy), knows whether the channel is
encrypted (implicit TLS is invisible to aiosmtpd), allows AUTH without TLS only from
`auth.plaintext_networks`, says which phase it is in so shutdown can tell idle from busy,
gives DATA its own timeout and adds enhanced status codes to aiosmtpd's own replies.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, Session

from mailfence.config import Config
from mailfence.defense.net import IPAddress
from mailfence.smtp import replies


class RelaySession(Session):
    """aiosmtpd's Session, without the deprecation warning it logs on every login.

    aiosmtpd assigns the legacy `login_data` on each successful AUTH, and its property logs a
    warning each time; the relay uses `auth_data` and keeps `login_data` a plain attribute.
    """

    login_data: Any = None


class RelaySMTP(SMTP):
    def __init__(
        self,
        handler: Any,
        *,
        config: Config,
        live: set[RelaySMTP],
        implicit_tls: bool,
        tls_context: Any,
        address: IPAddress,
        on_close: Callable[[IPAddress], None],
    ) -> None:
        super().__init__(
            handler,
            data_size_limit=config.relay.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=config.smtp.hostname,
            ident="mailfence ESMTP",
            tls_context=None if implicit_tls else tls_context,
            timeout=config.smtp.command_timeout,
            auth_required=True,
            auth_require_tls=True,
        )
        self.config = config
        self.live = live
        self.implicit_tls = implicit_tls
        self.address = address  # the client (from the socket, or from a PROXY header)
        self._on_close: Callable[[IPAddress], None] | None = on_close
        self.auth_attempts = 0
        self.started = time.monotonic()
        self.phase = "connect"
        self.busy = False  # a command is being handled (idle sessions may be closed at once)
        self.in_ehlo = False
        # Wrap every command so `busy` is true while it runs; aiosmtpd looks them up here.
        self._smtp_methods = {
            name: self._tracked(method) for name, method in self._smtp_methods.items()
        }

    def _tracked(self, method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Any]:
        @functools.wraps(method)
        async def run(arg: Any) -> None:
            self.busy = True
            try:
                await method(arg)
            finally:
                self.busy = False

        return run

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    # --- connection lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.live.add(self)
            self.phase = "greeting"
            # aiosmtpd only knows about STARTTLS; AUTH is allowed in the clear only on an
            # implicit-TLS listener or from a network the operator listed.
            self._auth_require_tls = not (self.implicit_tls or self._peer_may_auth_in_clear())
        else:
            self.phase = "tls"

    def connection_lost(self, error: Exception | None) -> None:
        self.live.discard(self)
        if self._on_close is not None:  # once: aiosmtpd may see more than one loss
            self._on_close(self.address)
            self._on_close = None
        super().connection_lost(error)

    def set_unauthenticated_timeout(self, seconds: float) -> None:
        self._timeout_duration = seconds

    def authenticated(self) -> None:
        """Called on a successful AUTH: the normal command timeout applies again."""
        self._timeout_duration = self.config.smtp.command_timeout

    def _peer_may_auth_in_clear(self) -> bool:
        return any(self.address in net for net in self.config.auth.plaintext_networks)

    @property
    def peer_address(self) -> str:
        return str(self.address)

    @property
    def encrypted(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: the server may close after its timeout; say why first.
        self.close_with(replies.TIMEOUT)

    def close_with(self, reply: str) -> None:
        """Writes one last reply and closes (timeouts, and idle sessions at shutdown)."""
        # uvloop's transports do not subclass asyncio.WriteTransport, hence the cast.
        transport = cast(asyncio.WriteTransport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode() + b"\r\n")
            transport.close()

    # --- replies and phases --------------------------------------------------------------

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self.in_ehlo:
            status = replies.with_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self.in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self.in_ehlo = False

    async def smtp_HELO(self, hostname: str) -> None:
        self.in_ehlo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self.in_ehlo = False

    async def smtp_DATA(self, arg: str) -> None:
        # One command timeout is too short for a 25 MB message on a slow link, and aiosmtpd
        # does not restart it per line; give the whole transfer its own deadline.
        self._reset_timeout(self.config.smtp.data_timeout)
        self.phase = "data"
        try:
            await super().smtp_DATA(arg)
        finally:
            self.phase = "authenticated" if self.session and self.session.authenticated else "ehlo"
            self._reset_timeout()
