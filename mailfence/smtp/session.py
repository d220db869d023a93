"""One SMTP connection: aiosmtpd's SMTP protocol with the relay's rules around it.

aiosmtpd does the protocol; this subclass adds what a relay needs per connection: it joins
the live sessions (a dict: uvicorn keeps a set, but a dict is ordered, the oldest first),
knows whether the channel is encrypted (implicit TLS is invisible to aiosmtpd), allows AUTH
without TLS only from
`auth.plaintext_networks`, says which phase it is in so shutdown can tell idle from busy,
gives DATA its own timeout and adds enhanced status codes to aiosmtpd's own replies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
import types
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, Session

from mailfence.config import Config
from mailfence.defense.net import IPAddress
from mailfence.observe import logs
from mailfence.smtp import replies

log = logging.getLogger("mailfence.smtp")


_TRACKED: dict[type, dict[str, Callable[..., Awaitable[None]]]] = {}
_NAMES: dict[tuple[type, tuple[str, ...]], list[str]] = {}


def _tracked_commands(cls: type) -> dict[str, Callable[..., Awaitable[None]]]:
    """smtp_* methods wrapped to mark the session busy while they run, keyed as aiosmtpd
    keys its command table. Made once per class."""
    if cls in _TRACKED:
        return _TRACKED[cls]

    def tracked(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(method)  # keeps __smtp_syntax__ and the rest HELP reads
        async def run(self: RelaySMTP, arg: Any) -> None:
            self.busy = True
            try:
                await method(self, arg)
            finally:
                self.busy = False

        return run

    table = {
        name.replace("smtp_", ""): tracked(getattr(cls, name))
        for name in _command_names(cls, ("smtp_",))
    }
    _TRACKED[cls] = table
    return table


def _command_names(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The class's attribute names with these prefixes (methods: the same for every instance)."""
    key = (cls, prefixes)
    if key not in _NAMES:
        names = {name for base in cls.__mro__ for name in vars(base)}
        _NAMES[key] = sorted(name for name in names if name.startswith(prefixes))
    return _NAMES[key]


# "<local@domain>" followed by optional parameters, with nothing a full parser must judge
# (no quotes, comments, routes or spaces inside the brackets).
_PLAIN_ADDRESS = re.compile(r"\s*<([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+)>(.*)\Z", re.S)


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
        live: dict[RelaySMTP, None],
        implicit_tls: bool,
        tls_context: Any,
        address: IPAddress,
        on_close: Callable[[IPAddress], None],
        proxy_protocol_timeout: float | None = None,
        phases: Counter[str] | None = None,
    ) -> None:
        # Sessions per phase, kept as phases change, so `top` never walks 10,000 sessions.
        self._phases: Counter[str] = phases if phases is not None else Counter()
        self._phase = "connect"
        self._counted = False
        self._lost = False
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
            proxy_protocol_timeout=proxy_protocol_timeout,
        )
        self.config = config
        self.live = live
        self.implicit_tls = implicit_tls
        self.address = address  # the client (from the socket, or from a PROXY header)
        self._on_close: Callable[[IPAddress], None] | None = on_close
        self.auth_attempts = 0
        # Behind a PROXY-protocol listener: the gate for the real client, and whether it ran.
        self.admit_proxied: Callable[[RelaySMTP, IPAddress], str | None] | None = None
        self.proxied_admitted = False
        self.started = time.monotonic()
        self.bytes_in = 0
        self.messages: list[str] = []  # ids of the messages queued in this session
        self.auth_result = ""  # the last AUTH's outcome: ok, failed, refused, busy, disabled
        self.auth_lane = ""
        self.phase = "connect"
        self.busy = False  # a command is being handled (idle sessions may be closed at once)
        self.in_ehlo = False
        # Every command wrapped so `busy` is true while it runs; aiosmtpd looks them up here.
        # The wrappers are made once per class and only bound here (wrapping per session
        # cost more than the rest of a session's setup).
        self._smtp_methods = {
            name: types.MethodType(run, self) for name, run in _tracked_commands(type(self)).items()
        }

    def __dir__(self) -> list[str]:
        # aiosmtpd builds its command tables for every session with inspect.getmembers(self)
        # and dir(self), which read every attribute and property: 160 us a session, most of
        # what a flood's admitted connections cost the event loop. It only looks for these.
        return _command_names(type(self), ("smtp_", "auth_"))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's parser defines a class on every call (~50 us, and garbage); the plain
        # "<local@domain>" form, nearly all real traffic, is matched directly.
        match = _PLAIN_ADDRESS.match(arg)
        if match:
            return match.group(1), match.group(2).lstrip()
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    # --- connection lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.live[self] = None  # a dict keeps insertion order: the oldest come first
            self._counted = True
            self._phases[self._phase] += 1
            self.phase = "greeting"
            self.decide_auth_in_clear()
        else:
            self.phase = "tls"

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)

    @property
    def user_name(self) -> str:
        session = self.session
        user = session.auth_data if session is not None and session.authenticated else None
        return str(getattr(user, "name", "")) if user is not None else ""

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if self._counted:
            self._phases[self._phase] -= 1
            self._phases[value] += 1
        self._phase = value

    def _forget(self, task: asyncio.Task[None]) -> None:
        """Breaks the reference cycles a finished session leaves behind (its task's frame
        and this protocol, the streams and this protocol), so that reference counting frees
        it at once. Left to the cycle collector, a flood's sessions piled up and were freed
        thousands at a time, in collections that held the event loop for 5-25 ms."""
        self._handler_coroutine = None
        self._reader = None  # type: ignore[assignment]
        self._writer = None  # type: ignore[assignment]
        # asyncio's StreamReaderProtocol keeps aiosmtpd's bound method (self -> method -> self).
        self._client_connected_cb = None

    def connection_lost(self, error: Exception | None) -> None:
        # Once only: STARTTLS's failure path calls it too (see smtp_STARTTLS), and after
        # _forget aiosmtpd's own connection_lost would trip over the forgotten task.
        if self._lost:
            return
        self._lost = True
        task = self._handler_coroutine
        if task is not None:
            task.add_done_callback(self._forget)
        self.live.pop(self, None)
        if self._counted:
            self._counted = False
            self._phases[self._phase] -= 1
        if self._on_close is not None:  # once: aiosmtpd may see more than one loss
            self._on_close(self.address)
            self._on_close = None
            self._log_outcome()
        super().connection_lost(error)
        # aiosmtpd's tables of bound methods make every session a reference cycle, freed only
        # by a full collection (pauses of 100-200 ms under a flood); break the cycle now.
        self._smtp_methods = {}
        self._auth_methods = {}
        self._handle_hooks = {}

    def _log_outcome(self) -> None:
        """One line per session: who, how, what came of it. Sessions that never logged in
        (a flood's, mostly) are summarised during a flood instead of one line each."""
        user = self.user_name
        fields = {
            "event": "session",
            "peer": str(self.address),
            "user": user,
            "tls": self.encrypted,
            "auth": self.auth_result or "none",
            "lane": self.auth_lane,
            "messages": list(self.messages),
            "seconds": round(time.monotonic() - self.started, 3),
            "bytes": self.bytes_in,
        }
        extra: dict[str, Any] = {"fields": fields}
        if not user:
            extra["flood"] = "session"
            if logs.suppressed("session", fields):
                return
        log.info(
            "session peer=%s user=%r tls=%s auth=%s messages=%s seconds=%.1f bytes=%d",
            self.address,
            user,
            "yes" if self.encrypted else "no",
            fields["auth"],
            ",".join(self.messages) or "-",
            fields["seconds"],
            self.bytes_in,
            extra=extra,
        )

    def set_unauthenticated_timeout(self, seconds: float) -> None:
        self._timeout_duration = seconds

    def authenticated(self) -> None:
        """Called on a successful AUTH: the normal command timeout applies again."""
        self._timeout_duration = self.config.smtp.command_timeout

    def decide_auth_in_clear(self) -> None:
        # aiosmtpd only knows about STARTTLS; AUTH is allowed in the clear only on an
        # implicit-TLS listener or from a network the operator listed.
        self._auth_require_tls = not (self.implicit_tls or self._peer_may_auth_in_clear())

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

    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207, through the loop's own TLS (uvloop's, in C).

        aiosmtpd builds asyncio's pure-Python SSL protocol by hand; on a busy relay that was
        a third of the event loop's time. `loop.start_tls` does the same job natively.
        """
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if self.tls_context is None or self._tls_protocol is not None:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(
                cast(asyncio.WriteTransport, self.transport),
                self,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.config.smtp.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            if self.transport is not None:
                self.transport.close()
            # A reset during the handshake never reaches this protocol through uvloop's TLS
            # layer: without this the session, its task and its connection slot would stay
            # forever. (When the loss does arrive as well, the second call does nothing.)
            self.connection_lost(error)
            return
        if transport is None:
            return
        # RFC 3207 §4.2: forget everything said before the handshake, including anything
        # the client pipelined behind STARTTLS (the classic injection attack).
        self.transport = transport
        # aiosmtpd's reader and writer hold the transport privately; point them at the new one.
        reader, writer = cast(Any, self._reader), cast(Any, self._writer)
        reader._transport = transport
        writer._transport = transport
        reader._buffer.clear()
        # aiosmtpd only tests this for "is the channel encrypted" (EHLO, AUTH, STARTTLS).
        self._tls_protocol = cast(Any, transport.get_extra_info("ssl_object") or True)
        self.envelope = self._create_envelope()
        self.session = self._create_session()
        self.session.peer = transport.get_extra_info("peername")
        self.session.ssl = {"cipher": transport.get_extra_info("cipher")}
        self.phase = "tls"

    async def smtp_DATA(self, arg: str) -> None:
        # One command timeout is too short for a 25 MB message on a slow link, and aiosmtpd
        # does not restart it per line; give the whole transfer its own deadline.
        self._reset_timeout(self.config.smtp.data_timeout)
        self.phase = "data"
        try:
            await super().smtp_DATA(arg)
        finally:
            self.phase = "authenticated" if self.session and self.session.authenticated else "ehlo"
            # Not when the link dropped mid-message: the timer would hold this session for a
            # command timeout and then trip over its closed transport.
            if self.transport is not None:
                self._reset_timeout()
