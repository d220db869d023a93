"""aiosmtpd handler hooks: translate SMTP into calls on the relay's core and back.

AUTH is implemented as `async auth_PLAIN` / `auth_LOGIN` on the handler, not through
aiosmtpd's synchronous `authenticator=` callback, so that password hashing happens in the
verification pool and never on the event loop (STYLE.md, "Note the trap").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import inspect
import logging
import re
import time
from collections.abc import Callable
from typing import Any, cast

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session

from mailfence.auth import Authenticator, Outcome
from mailfence.config import Config
from mailfence.defense import AuthAction, Ban, Defense
from mailfence.defense.net import IPNetwork, parse_ip
from mailfence.observe import logs
from mailfence.observe.figures import Totals
from mailfence.smtp import replies
from mailfence.smtp.session import RelaySMTP
from mailfence.spool import Spool, SpoolFull, new_id
from mailfence.store.users import User

log = logging.getLogger("mailfence.smtp")

_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Control characters (NUL above all) have no place in an address (RFC 5321 §4.1.2) and only
# serve to confuse the next system that parses it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_bare_newline(content: bytes) -> bool:
    # Counting is ten times faster than the regex; equal counts mean every CR and LF pair up.
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


def _decode_b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _ignore_bans(bans: list[Ban]) -> None:
    return None


def _ignore_known_good(user: str, prefix: IPNetwork, when: float) -> None:
    return None


def _log_refusal(name: str, address: object, reason: str) -> None:
    fields = {
        "event": "auth",
        "outcome": "refused",
        "user": name,
        "peer": str(address),
        "reason": reason,
    }
    if logs.suppressed("auth refused", fields):
        return  # counted for the flood summary, no record built
    log.info(
        "auth refused user=%r peer=%s: %s",
        name,
        address,
        reason,
        extra={"flood": "auth refused", "fields": fields},
    )


_OUTCOME_NAMES = {
    Outcome.OK: "ok",
    Outcome.BAD_CREDENTIALS: "failed",
    Outcome.BUSY: "busy",
    Outcome.DISABLED: "disabled",
}


class RelayHandler:
    def __dir__(self) -> list[str]:
        # aiosmtpd reads the handler's hooks per session with inspect.getmembers and dir():
        # list only what it looks for (see RelaySMTP.__dir__).
        return _HOOK_NAMES

    def __init__(
        self, config: Config, authenticator: Authenticator, spool: Spool, defense: Defense
    ) -> None:
        self.config = config
        self.authenticator = authenticator
        self.spool = spool
        self.defense = defense
        # Set by the server: persist what the defense decided (bans, known-good pairs).
        self.on_bans: Callable[[list[Ban]], None] = _ignore_bans
        self.on_known_good: Callable[[str, IPNetwork, float], None] = _ignore_known_good
        self.totals = Totals()  # the server's Observer reads these once a second

    # --- AUTH (RFC 4954, RFC 4616) -------------------------------------------------------

    async def _challenge(self, server: RelaySMTP, prompt: str) -> bytes | None:
        answer = await server.challenge_auth(prompt)  # pushes 501 itself on '*' or bad base64
        return None if answer is MISSING else answer

    async def auth_PLAIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self._challenge(server, "")
            if blob is None:
                return AuthResult(success=False, handled=True)
        else:
            decoded = _decode_b64(args[1])
            if decoded is None:
                return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_BASE64)
            blob = decoded
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_PLAIN)
        _authzid, login, password = parts
        return await self._authenticate(server, login, password)

    async def auth_LOGIN(self, server: RelaySMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self._challenge(server, server.AuthLoginUsernameChallenge)
            if login is None:
                return AuthResult(success=False, handled=True)
        else:
            decoded = _decode_b64(args[1])
            if decoded is None:
                return AuthResult(success=False, handled=False, message=replies.AUTH_BAD_BASE64)
            login = decoded
        password = await self._challenge(server, server.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password)

    async def _authenticate(self, server: RelaySMTP, login: bytes, password: bytes) -> AuthResult:
        started = time.perf_counter()
        name = login.decode("utf-8", "surrogateescape")
        address = server.address
        totals = self.totals
        server.phase = "auth"
        server.auth_attempts += 1
        now = time.time()
        defense = self.defense
        exists = self.authenticator.accounts.get(name) is not None
        gate = defense.before_auth(address, name, now, server.auth_attempts, exists)
        if gate.bans:
            self.banned(list(gate.bans))
        if gate.action is AuthAction.DISCONNECT:
            totals.auth_outcome("refused", "gate")
            server.auth_result = "refused"
            _log_refusal(name, address, gate.reason)
            server.close_with(replies.TOO_MANY_AUTH_ATTEMPTS)
            return AuthResult(success=False, handled=True)
        source = defense.source_of(address)
        lane = gate.lane
        if gate.action is AuthAction.REFUSE:
            # A refusal a retry may lift: the same credentials again from the same source
            # (a mail server retrying) go through to the hash, in the retry lane.
            if not (gate.retry_allowed and self.authenticator.redeem(name, password, source)):
                if gate.retry_allowed:
                    self.authenticator.issue(name, password, source)
                    defense.on_auth_refused(address, name, now)
                totals.auth_outcome("refused", "gate")
                server.auth_result = "refused"
                _log_refusal(name, address, gate.reason)
                server.phase = "ehlo"
                return self._failure(replies.AUTH_TEMPORARY_FAILURE)
            lane = "retry"
        verdict = await self.authenticator.check(name, password, lane, source)
        answered_lane = "cache" if verdict.cached or verdict.repeated else (verdict.lane or lane)
        totals.auth_outcome(_OUTCOME_NAMES[verdict.outcome], answered_lane)
        totals.auth_latency(answered_lane, time.perf_counter() - started)
        server.auth_result = _OUTCOME_NAMES[verdict.outcome]
        server.auth_lane = answered_lane
        fields = {
            "event": "auth",
            "outcome": server.auth_result,
            "user": name,
            "peer": str(address),
            "lane": answered_lane,
        }
        # A customer's login is always worth a line; a flood's failures are summarised.
        extra: dict[str, Any] = {"fields": fields}
        if verdict.outcome is not Outcome.OK:
            extra["flood"] = "auth failed"
        if "flood" not in extra or not logs.suppressed("auth failed", fields):
            log.info(
                "auth %s user=%r peer=%s lane=%s",
                server.auth_result,
                name,
                address,
                answered_lane,
                extra=extra,
            )
        if verdict.outcome is Outcome.OK:
            server.phase = "authenticated"
            server.authenticated()
            if defense.on_auth_success(address, name, now):
                self.on_known_good(name, defense.prefix_of(address), now)
            return AuthResult(success=True, auth_data=verdict.user, message=replies.AUTH_OK)
        server.phase = "ehlo"
        if verdict.outcome is Outcome.BUSY:
            if answered_lane != "known":
                defense.on_auth_busy(address, now)
            return self._failure(replies.AUTH_TEMPORARY_FAILURE)
        if verdict.outcome is Outcome.DISABLED:
            return self._failure(replies.AUTH_DISABLED)
        if not verdict.repeated:
            totals.failure(str(source), name)
        bans = defense.on_auth_failure(address, name, verdict.fingerprint, now, verdict.repeated)
        if bans:
            self.banned(bans)
            if defense.bans.find(address, now) is not None:
                server.close_with(replies.BANNED)
                return AuthResult(success=False, handled=True)
        if self.config.auth.failure_reply == "permanent":
            return self._failure(replies.AUTH_INVALID)
        return self._failure(replies.AUTH_TEMPORARY_FAILURE)

    def banned(self, bans: list[Ban]) -> None:
        """Logs new automatic bans and hands them on to be recorded (database, ledger)."""
        for ban in bans:
            log.warning("banned %s until %s: %s", ban.network, ban.until, ban.reason)
        self.on_bans(bans)

    @staticmethod
    def _failure(reply: str) -> AuthResult:
        return AuthResult(success=False, handled=False, message=reply)

    # --- PROXY protocol -------------------------------------------------------------------

    async def handle_PROXY(
        self, server: RelaySMTP, session: Session, envelope: Envelope, proxy_data: Any
    ) -> bool:
        """The client's address from a trusted proxy's header goes through the gate."""
        if server.admit_proxied is None or not proxy_data.valid:
            return False
        try:
            client = parse_ip(str(proxy_data.src_addr))
        except ValueError:
            return False
        refusal = server.admit_proxied(server, client)
        if refusal is not None:
            server.close_with(refusal)
            return False
        session.peer = cast(Any, (str(client), proxy_data.src_port))
        server.decide_auth_in_clear()  # plaintext_networks apply to the client, not the proxy
        return True

    # --- envelope ------------------------------------------------------------------------

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to the hook when one exists
        server.phase = "authenticated" if session.authenticated else "ehlo"
        # Drop aiosmtpd's "250 HELP" and end with the two extensions it does not list.
        lines = [line for line in responses if line != "250 HELP"]
        lines += ["250-PIPELINING", "250 ENHANCEDSTATUSCODES"]
        return lines

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        user: User | None = session.auth_data
        if user is None:  # aiosmtpd's auth_required answers 530 before this hook
            return replies.AUTH_REQUIRED
        # The account as it is now: a disable, delete or password change since this session
        # logged in ends its right to send.
        current = self.authenticator.accounts.get(user.name)
        if current is None or current.disabled or current.updated != user.updated:
            session.authenticated = False
            session.auth_data = None
            return replies.ACCOUNT_CHANGED
        if _CONTROL.search(address):
            return replies.BAD_SENDER
        if address == "<>":
            # The null sender (RFC 5321 §4.5.5): a customer's MTA relaying its own bounces.
            # aiosmtpd hands it over as "<>"; the envelope keeps that (it needs a non-empty
            # value) and the spool stores "".
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return replies.SENDER_OK
        if not user.may_send_as(address):
            log.info("sender refused user=%r from=%r", user.name, address)
            return replies.SENDER_NOT_ALLOWED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.config.relay.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 tells the client to send the rest in another message.
            return replies.TOO_MANY_RECIPIENTS
        if "@" not in address or _CONTROL.search(address):
            return replies.BAD_RECIPIENT
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    # --- DATA ----------------------------------------------------------------------------

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        reply = await self._data(server, session, envelope)
        if reply.startswith("250"):
            self.totals.messages["accepted"] += 1
            self.totals.to_250_seconds.observe(time.perf_counter() - started)
            server.messages.append(reply.rsplit(" ", 1)[-1])
        else:
            self.totals.messages["rejected"] += 1
        return reply

    async def _data(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        # Scanning a large message takes long enough to stall every other session: off the loop.
        if len(content) > 65536:
            bare = await asyncio.to_thread(_has_bare_newline, content)
        else:
            bare = _has_bare_newline(content)
        if bare:
            # RFC 5321 §2.3.8: lines end in CRLF. A bare LF or CR is how SMTP smuggling hides
            # a second message; never pass one upstream as it came.
            if self.config.smtp.bare_newline == "reject":
                return replies.BARE_NEWLINE
            content = await asyncio.to_thread(_BARE_NEWLINE.sub, b"\r\n", content)
        if len(content) > self.config.relay.max_message_bytes:
            return replies.MESSAGE_TOO_BIG
        user: User | None = session.auth_data
        if user is None:  # unreachable: aiosmtpd's auth_required guards DATA
            return replies.AUTH_REQUIRED
        msg_id = new_id()
        received = self._received_header(server, session, envelope, msg_id)
        try:
            await self.spool.enqueue(
                "" if envelope.mail_from == "<>" else envelope.mail_from or "",
                list(envelope.rcpt_tos),
                received + content,
                user.name,
                msg_id=msg_id,
            )
        except SpoolFull:
            log.warning("spool full (%d messages): refusing with 452", self.spool.size)
            return replies.SPOOL_FULL
        except Exception as error:
            # A full or failing disk: the sender is told 451 and retries; `mailfence status`
            # says so (degraded) for five minutes after the last one.
            log.exception("spool write failed; the client is told to retry")
            self.totals.messages["spool_failed"] += 1
            self.totals.last_spool_error = str(error) or type(error).__name__
            return replies.SPOOL_FAILED
        log.info(
            "queued id=%s user=%r from=%r rcpts=%d size=%d",
            msg_id,
            user.name,
            envelope.mail_from,
            len(envelope.rcpt_tos),
            len(content),
            extra={
                "fields": {
                    "event": "queued",
                    "id": msg_id,
                    "user": user.name,
                    "peer": server.peer_address,
                    "from": envelope.mail_from,
                    "rcpts": len(envelope.rcpt_tos),
                    "size": len(content),
                }
            },
        )
        return replies.QUEUED.format(id=msg_id)

    def _received_header(
        self, server: RelaySMTP, session: Session, envelope: Envelope, msg_id: str
    ) -> bytes:
        # RFC 5321 §4.4 trace field; "with" values from RFC 3848.
        protocol = "ESMTPSA" if server.encrypted else "ESMTPA"
        helo = _CONTROL.sub("", session.host_name or "") or "unknown"
        recipient = f"\r\n\tfor <{envelope.rcpt_tos[0]}>" if len(envelope.rcpt_tos) == 1 else ""
        date = email.utils.formatdate(localtime=False)
        text = (
            f"Received: from {helo} ([{server.peer_address}])\r\n"
            f"\tby {self.config.smtp.hostname} (mailfence) with {protocol} id {msg_id}"
            f"{recipient}; {date}\r\n"
        )
        return text.encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        log.exception("unexpected error in an SMTP session")
        return "451 4.3.0 Local error in processing"


_HOOK_NAMES = sorted(name for name in vars(RelayHandler) if name.startswith(("handle_", "auth_")))
# aiosmtpd inspects handle_EHLO's signature for every session; give it the answer ready.
RelayHandler.handle_EHLO.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    RelayHandler.handle_EHLO
)
