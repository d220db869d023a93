"""Helpers for testing mailfence, and for users testing their own setups.

- `Sink`: a real SMTP server (aiosmtpd) that records what it receives and can be told to
  answer with failures, to stand in for an upstream.
- `RunningRelay`: the real relay started on free loopback ports in a background thread.
- `relay_config`: settings for a throwaway relay in a temporary directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from mailfence.auth import make_hasher
from mailfence.config import AuthConfig, Config, Listener, MetricsConfig, RelayConfig, SMTPConfig
from mailfence.server import Server
from mailfence.smtp.tls import ensure_self_signed, server_context
from mailfence.store import open_database
from mailfence.store import users as user_table

# Cheap argon2 settings: tests check behaviour, not the cost of hashing.
FAST_AUTH = AuthConfig(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def client_tls_context() -> ssl.SSLContext:
    """Accepts the relay's self-signed certificate (tests only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class Sink:
    """An upstream SMTP server on a free loopback port.

    `reply` decides the answer to each DATA (default 250); `rcpt_reply` can refuse recipients.
    With `credentials` ({user: password}), it requires STARTTLS (a self-signed certificate),
    then a login with one of them before it takes mail; `logins` records each login tried, as
    (user, accepted).
    """

    port: int = field(default_factory=free_port)
    reply: Callable[[Envelope], str] = lambda envelope: "250 2.0.0 Ok"
    rcpt_reply: Callable[[str], str | None] = lambda address: None
    messages: list[Received] = field(default_factory=list)
    attempts: int = 0
    connections: int = 0
    credentials: dict[str, str] | None = None
    logins: list[tuple[str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        if self.credentials is None:
            self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        else:  # as real submission servers are: logins only after STARTTLS
            with tempfile.TemporaryDirectory(prefix="mailfence-sink-") as directory:
                context = server_context(*ensure_self_signed(Path(directory), "127.0.0.1"))
            self._controller = Controller(
                self,
                hostname="127.0.0.1",
                port=self.port,
                authenticator=self._authenticate,
                auth_required=True,
                tls_context=context,
                require_starttls=True,
            )

    def _authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword) or self.credentials is None:
            return AuthResult(success=False, handled=False)
        user, password = data.login.decode(), data.password.decode()
        accepted = self.credentials.get(user) == password
        with self._lock:
            self.logins.append((user, accepted))
        return AuthResult(success=accepted)

    async def handle_EHLO(
        self, server: Any, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self._lock:
            self.connections += 1
        return responses

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.rcpt_reply(address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.attempts += 1
        answer = self.reply(envelope)
        if answer.startswith("250"):
            with self._lock:
                self.messages.append(
                    Received(
                        envelope.mail_from or "",
                        list(envelope.rcpt_tos),
                        envelope.original_content or b"",
                    )
                )
        return answer

    def start(self) -> Sink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        with self._lock:
            return list(self.messages)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DNSServer:
    """A tiny authoritative DNS server on a loopback UDP port, for MX delivery tests.

    `records` maps (name, type) to record texts: {("example.org", "MX"): ["10 mx.example.org."],
    ("mx.example.org", "A"): ["127.0.0.1"]}. Unknown names get NXDOMAIN; known names without
    the asked type get an empty answer (NOERROR).
    """

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = {
            (name.lower().rstrip("."), kind): texts for (name, kind), texts in records.items()
        }
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def _answer(self, wire: bytes) -> bytes:
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        kind = dns.rdatatype.to_text(question.rdtype)
        if not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, kind) in self.records:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", kind, self.records[(name, kind)])
            )
        return bytes(response.to_wire())

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            self.sock.sendto(self._answer(wire), peer)

    def __enter__(self) -> DNSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def relay_config(state_dir: Path, upstream_port: int | None = None, **sections: Any) -> Config:
    """A relay on free ports (STARTTLS and implicit TLS) with fast hashing and retries.

    Keyword arguments replace fields of a section: `relay={"max_recipients": 2}`.
    """
    relay = RelayConfig(
        upstream=f"smtp://127.0.0.1:{upstream_port}" if upstream_port else "",
        retry_schedule=(0.5, 1.0),
        delivery_workers=2,
    )
    config = Config(
        source="<test>",
        state_dir=state_dir,
        listen=(
            Listener("127.0.0.1:0", "127.0.0.1", 0, "starttls"),
            Listener("127.0.0.1:0", "127.0.0.1", 0, "implicit"),
        ),
        auth=FAST_AUTH,
        relay=relay,
        smtp=SMTPConfig(hostname="relay.test", shutdown_timeout=5.0),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
    )
    # The strangers' door process (on by default) costs each relay's start a new interpreter
    # (the suite took 509 s with it, 423 s without): the tests about it ask for it.
    config = dataclasses.replace(
        config, defense=dataclasses.replace(config.defense, door_process=False)
    )
    for name, changes in sections.items():
        config = dataclasses.replace(
            config, **{name: dataclasses.replace(getattr(config, name), **changes)}
        )
    return config


def add_user(config: Config, name: str, password: str, senders: list[str] | None = None) -> None:
    conn = open_database(config.state_dir)
    try:
        user_table.add(conn, name, make_hasher(config.auth).hash(password), senders or [])
    finally:
        conn.close()


class RunningRelay:
    """The real relay on a uvloop loop in a background thread.

    `with RunningRelay(config) as relay:` starts it and waits until its listeners are bound;
    `relay.starttls_port` and `relay.implicit_port` are where to connect.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.server = Server(config, install_signals=False)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            task = asyncio.create_task(self.server.serve())
            while self.server.ready_event is None or not self.server.ready_event.is_set():
                if task.done():
                    break
                await asyncio.sleep(0.01)
            if task.done() and task.exception() is not None:
                self._error = task.exception()  # a failed startup: start() raises it
            self._ready.set()
            await task

        try:
            uvloop.run(main())
        except BaseException as error:
            self._error = error
            self._ready.set()

    @property
    def starttls_port(self) -> int:
        return self.server.ports[0]

    @property
    def implicit_port(self) -> int:
        return self.server.ports[1]

    def call(self, fn: Callable[[], Any]) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(fn)

    def start(self) -> RunningRelay:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        def request_exit() -> None:
            self.server.should_exit = True

        if self.loop is not None and self._thread.is_alive():
            self.call(request_exit)
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> RunningRelay:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
