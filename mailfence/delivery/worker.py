"""Delivery: a scheduler that finds due messages and workers that send them.

The scheduler wakes when a message is queued (or every second, to see retries and changes
made by `mailfence queue`), groups due messages by route and hands bundles to a bounded job
queue. Each worker sends a bundle over one SMTP connection and keeps the connection for the
next bundle to the same route, so a steady stream of mail does not pay a TLS handshake per
message. Every attempt ends in one spool transaction (`Spool.complete_attempt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from mailfence.config import Config, resolve_path
from mailfence.delivery.dsn import Failure, build_bounce
from mailfence.delivery.routes import Hop, MXResolver, RouteError, domain_of, parse_upstream
from mailfence.spool import Message, Recipient, RecipientState, Spool, new_id

log = logging.getLogger("mailfence.delivery")

DUE_BATCH = 500
DUE_MAX_BYTES = 64 * 1024 * 1024
BUNDLE_SIZE = 10
IDLE_CONNECTION_SECONDS = 10.0
# aiosmtplib's start_tls: True = required, None = if offered, False = never (implicit TLS).
_START_TLS: dict[str, bool | None] = {"required": True, "opportunistic": None, "implicit": False}


@dataclass
class Job:
    route: str  # "upstream" or a recipient domain
    items: list[tuple[Message, list[str]]]


@dataclass
class _Tracker:
    """One message whose recipients span several routes (MX mode): finish after the last."""

    message: Message
    parts: int
    results: dict[str, Recipient] = field(default_factory=dict)


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    sent: int = 0
    last_used: float = 0.0
    reused: bool = False  # taken from the idle pool: the server may have closed it meanwhile


class TemporaryFailure(Exception):
    def __init__(self, code: int, reply: str, retry: bool = True) -> None:
        super().__init__(reply)
        self.code, self.reply = code, reply
        self.retry = retry  # worth one immediate retry on a fresh connection


class UpstreamPasswordError(Exception):
    """relay.upstream_password_file cannot be used; the message names the file and the fix."""


def read_upstream_password(config: Config) -> str:
    path = resolve_path(config, config.relay.upstream_password_file)
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        problem = f"cannot be read ({error.strerror or error})"
        fix = "check the path and its permissions"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
        fix = "write the password alone, as UTF-8 text, in that file"
    raise UpstreamPasswordError(
        f"{config.source}: relay.upstream_password_file: {path} {problem}; fix: {fix}"
    )


@dataclass
class DeliveryCounters:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    bounces_queued: int = 0


def _outcome(address: str, code: int, message: str) -> Recipient:
    """A refusal's meaning for one recipient (only refusals come here: a 2xx among them,
    such as 252, was not followed by an accepted DATA, so it is tried again)."""
    reply = f"{code} {message}".strip()
    if 500 <= code < 600:
        return Recipient(address, "failed", code, reply)
    return Recipient(address, "pending", code, reply)


class Delivery:
    def __init__(self, config: Config, spool: Spool, upstream_password: str | None = None) -> None:
        self.config = config
        self.spool = spool
        relay = config.relay
        self.upstream: Hop | None = (
            parse_upstream(relay.upstream, relay.upstream_tls_verify) if relay.upstream else None
        )
        self.resolver = MXResolver(
            relay.dns_servers, relay.mx_port, allow_private=relay.mx_allow_private
        )
        self.ca_file = (
            str(resolve_path(config, relay.upstream_ca_file)) if relay.upstream_ca_file else None
        )
        # Given when the caller has just read the file (a reload), else read here.
        self.upstream_password = upstream_password
        if upstream_password is None and relay.upstream_password_file:
            self.upstream_password = read_upstream_password(config)
        self.jobs: asyncio.Queue[Job] = asyncio.Queue(maxsize=relay.delivery_workers * 2)
        self.in_flight: set[str] = set()
        self.trackers: dict[str, _Tracker] = {}
        self.idle: dict[str, list[_Connection]] = {}
        self.counters = DeliveryCounters()
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._schedule(), name="delivery-scheduler")]
        self._tasks += [
            asyncio.create_task(self._work(), name=f"delivery-worker-{n}")
            for n in range(self.config.relay.delivery_workers)
        ]

    async def stop(self, deadline: float) -> None:
        """Workers finish the message they are sending; what remains stays queued on disk."""
        self.stopping = True
        self.spool.arrived.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=max(0.0, deadline))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for connections in self.idle.values():
            for connection in connections:
                connection.smtp.close()
        self.idle.clear()

    def close_idle_connections(self, now: float) -> None:
        for route, connections in list(self.idle.items()):
            keep = []
            for connection in connections:
                if now - connection.last_used > IDLE_CONNECTION_SECONDS:
                    connection.smtp.close()
                else:
                    keep.append(connection)
            if keep:
                self.idle[route] = keep
            else:
                del self.idle[route]

    # --- scheduling ----------------------------------------------------------------------

    async def _schedule(self) -> None:
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.spool.arrived.wait(), timeout=1.0)
            self.spool.arrived.clear()
            try:
                while not self.stopping:
                    batch = await self.spool.due(set(self.in_flight), DUE_BATCH, DUE_MAX_BYTES)
                    for job in self._plan(batch):
                        await self._put(job)
                    if len(batch) < DUE_BATCH:
                        break
            except Exception:
                # A database hiccup must not end delivery for good: log, wait, look again.
                log.exception("delivery scheduler: cannot read the spool; retrying in 1 s")
                await asyncio.sleep(1.0)
        # Wake the workers so they notice `stopping`.
        for _ in self._tasks:
            with contextlib.suppress(asyncio.QueueFull):
                self.jobs.put_nowait(Job("", []))

    async def _put(self, job: Job) -> None:
        """Waits for room in the job queue, giving up (the job stays on disk) when stopping."""
        while not self.stopping:
            try:
                await asyncio.wait_for(self.jobs.put(job), timeout=0.5)
                return
            except TimeoutError:
                continue
        for message, _ in job.items:
            self._release(message.id)

    def _plan(self, messages: list[Message]) -> list[Job]:
        by_route: dict[str, list[tuple[Message, list[str]]]] = {}
        for message in messages:
            self.in_flight.add(message.id)
            routes: dict[str, list[str]] = {}
            for rcpt in message.pending:
                route = "upstream" if self.upstream is not None else domain_of(rcpt)
                routes.setdefault(route, []).append(rcpt)
            if not routes:  # nothing left to send (e.g. an interrupted finish): finish it now
                routes[""] = []
            self.trackers[message.id] = _Tracker(message, len(routes))
            for route, rcpts in routes.items():
                by_route.setdefault(route, []).append((message, rcpts))
        jobs = []
        for route, items in by_route.items():
            for start in range(0, len(items), BUNDLE_SIZE):
                jobs.append(Job(route, items[start : start + BUNDLE_SIZE]))
        return jobs

    # --- workers -------------------------------------------------------------------------

    async def _work(self) -> None:
        while not self.stopping:
            job = await self.jobs.get()
            if not job.items:
                continue
            try:
                await self._run_job(job)
            except Exception:
                # Only a bug gets here (_run_job guards each message); what was not recorded
                # stays queued on disk and is tried again.
                log.exception("delivery job for %s failed unexpectedly", job.route)
                for message, _ in job.items:
                    self._release(message.id)

    async def _run_job(self, job: Job) -> None:
        connection: _Connection | None = None
        try:
            for index, (message, rcpts) in enumerate(job.items):
                if self.stopping:
                    for rest, _ in job.items[index:]:
                        self._release(rest.id)
                    return
                if not rcpts:
                    await self._part_done(message, {}, "")
                    continue
                try:
                    if connection is None:
                        connection = await self._connection(job.route)
                    try:
                        results = await self._send(connection, message, rcpts)
                    except TemporaryFailure as failure:
                        if not connection.reused or not failure.retry:
                            raise
                        # An idle connection the server timed out: once more, on a fresh one.
                        connection.smtp.close()
                        connection = None
                        connection = _Connection(await self._open_any(job.route))
                        results = await self._send(connection, message, rcpts)
                    connection.reused = False
                except TemporaryFailure as failure:
                    if connection is not None:
                        connection.smtp.close()
                        connection = None
                    results = {
                        r: Recipient(r, "pending", failure.code, failure.reply) for r in rcpts
                    }
                except RouteError as error:
                    state: RecipientState = "failed" if error.permanent else "pending"
                    reply = f"{error.code} {error}"
                    results = {r: Recipient(r, state, error.code, reply) for r in rcpts}
                except Exception as error:
                    log.exception("delivering %s to %s failed unexpectedly", message.id, job.route)
                    if connection is not None:
                        connection.smtp.close()
                        connection = None
                    reply = f"451 4.3.0 local error: {type(error).__name__}"
                    results = {r: Recipient(r, "pending", 451, reply) for r in rcpts}
                await self._part_done(message, results, "")
        finally:
            if connection is not None:
                connection.reused = False
                self._park(job.route, connection)

    async def _hops(self, route: str) -> Sequence[Hop]:
        if self.upstream is not None:
            return [self.upstream]
        return await self.resolver.hops(route)

    async def _connection(self, route: str) -> _Connection:
        idle = self.idle.get(route)
        while idle:
            connection = idle.pop()
            if connection.smtp.is_connected:
                connection.reused = True
                return connection
        return _Connection(await self._open_any(route))

    async def _open_any(self, route: str) -> aiosmtplib.SMTP:
        hops = await self._hops(route)
        last = TemporaryFailure(451, "451 4.4.1 no server could be reached")
        for hop in hops:
            try:
                return await self._open(hop)
            except aiosmtplib.SMTPAuthenticationError as error:
                # Our credentials for the upstream are wrong: never bounce customers' mail
                # for that; keep it queued and say so loudly.
                log.error("upstream %s refused our login: %s %s", hop.name, error.code, error)
                last = TemporaryFailure(451, f"451 4.7.0 upstream refused our login: {error}")
            except aiosmtplib.SMTPResponseException as error:
                last = TemporaryFailure(451, f"451 4.4.1 {hop.name} answered {error.code} {error}")
            except (aiosmtplib.SMTPException, OSError) as error:
                last = TemporaryFailure(451, f"451 4.4.1 cannot connect to {hop.name}: {error}")
            log.warning("delivery hop %s:%d failed: %s", hop.address, hop.port, last.reply)
        raise last

    async def _open(self, hop: Hop) -> aiosmtplib.SMTP:
        relay = self.config.relay
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self.config.smtp.hostname,
            timeout=relay.command_timeout,
            use_tls=hop.tls == "implicit",
            start_tls=True
            if hop.tls == "required"
            else (None if hop.tls == "opportunistic" else False),
            validate_certs=hop.verify,
            cert_bundle=self.ca_file,
        )
        await smtp.connect(timeout=relay.connect_timeout)
        if self.upstream is not None and relay.upstream_username:
            try:
                await smtp.login(relay.upstream_username, self.upstream_password or "")
            except BaseException:
                smtp.close()
                raise
        return smtp

    def _park(self, route: str, connection: _Connection) -> None:
        if (
            self.stopping
            or not connection.smtp.is_connected
            or connection.sent >= self.config.relay.messages_per_connection
        ):
            connection.smtp.close()
            return
        connection.last_used = time.monotonic()
        self.idle.setdefault(route, []).append(connection)

    async def _send(
        self, connection: _Connection, message: Message, rcpts: list[str]
    ) -> dict[str, Recipient]:
        smtp = connection.smtp
        options = []
        if not message.content.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (message.mail_from + "".join(rcpts)).isascii():
            if not smtp.supports_extension("smtputf8"):
                reply = "553 5.6.7 the receiving server does not support SMTPUTF8 addresses"
                return {r: Recipient(r, "failed", 553, reply) for r in rcpts}
            options.append("SMTPUTF8")
        connection.sent += 1
        try:
            errors, response = await smtp.sendmail(
                message.mail_from, rcpts, message.content, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as refused:
            return {
                e.recipient: _outcome(e.recipient, e.code, e.message) for e in refused.recipients
            }
        except aiosmtplib.SMTPServerDisconnected as error:
            raise TemporaryFailure(451, f"451 4.4.2 connection lost: {error}") from None
        except (aiosmtplib.SMTPTimeoutError, OSError) as error:
            # Not retried at once on a fresh connection: the upstream may have the message.
            raise TemporaryFailure(
                451, f"451 4.4.2 connection lost: {error}", retry=False
            ) from None
        except aiosmtplib.SMTPResponseException as error:
            return {r: _outcome(r, error.code, error.message) for r in rcpts}
        except ValueError as error:  # aiosmtplib refuses an address it cannot send safely
            reply = f"553 5.1.3 address cannot be sent: {error}"
            return {r: Recipient(r, "failed", 553, reply) for r in rcpts}
        results = {}
        for rcpt in rcpts:
            if rcpt in errors:
                results[rcpt] = _outcome(rcpt, errors[rcpt].code, errors[rcpt].message)
            else:
                results[rcpt] = Recipient(rcpt, "delivered", 250, f"250 {response}")
        return results

    # --- results -------------------------------------------------------------------------

    def _release(self, msg_id: str) -> None:
        self.in_flight.discard(msg_id)
        self.trackers.pop(msg_id, None)

    async def _part_done(self, message: Message, results: dict[str, Recipient], error: str) -> None:
        tracker = self.trackers.get(message.id)
        if tracker is None:
            return
        tracker.results.update(results)
        tracker.parts -= 1
        if tracker.parts > 0:
            return
        try:
            await self._finish(message, tracker.results)
        finally:
            self._release(message.id)

    async def _finish(self, message: Message, results: dict[str, Recipient]) -> None:
        now = time.time()
        for recipient in message.recipients:
            if recipient.address in results:
                new = results[recipient.address]
                recipient.state, recipient.code, recipient.reply = new.state, new.code, new.reply
        newly_failed = [r for r in results.values() if r.state == "failed"]
        pending = [r for r in message.recipients if r.state == "pending"]
        expired = bool(pending) and now - message.created >= self.config.relay.max_queue_age
        if expired:
            for r in pending:
                r.state = "failed"
                r.reply = r.reply or "451 4.4.7 message expired in the queue"
                r.code = r.code or 451
            newly_failed += pending
            pending = []
        bounce = self._bounce(message, newly_failed, expired)
        schedule = self.config.relay.retry_schedule
        next_attempt = now + schedule[min(message.attempts, len(schedule) - 1)]
        last_error = pending[0].reply if pending else ""
        changed = list(results.values()) + ([] if not expired else newly_failed)
        await self._record(message.id, changed, not pending, next_attempt, last_error, bounce)
        for r in results.values():
            if r.state == "delivered":
                self.counters.delivered += 1
            elif r.state == "pending":
                self.counters.deferred += 1
        self.counters.failed += len(newly_failed)
        if bounce is not None:
            self.counters.bounces_queued += 1
        delivered = sum(r.state == "delivered" for r in results.values())
        log.info(
            "attempt id=%s delivered=%d deferred=%d failed=%d%s",
            message.id,
            delivered,
            len(pending),
            len(newly_failed),
            " (bounce queued)" if bounce else "",
            extra={
                "fields": {
                    "event": "delivery",
                    "id": message.id,
                    "attempt": message.attempts + 1,
                    "delivered": delivered,
                    "deferred": len(pending),
                    "failed": len(newly_failed),
                    "bounce_queued": bounce is not None,
                    "last_error": last_error,
                    "results": {
                        r.address: f"{r.state} {r.reply}".strip() for r in results.values()
                    },
                }
            },
        )

    async def _record(
        self,
        msg_id: str,
        changed: list[Recipient],
        finished: bool,
        next_attempt: float,
        last_error: str,
        bounce: tuple[str, str, bytes] | None,
    ) -> None:
        """Writes the attempt's outcome, retrying while the disk refuses.

        The message stays in flight meanwhile: releasing it unrecorded would send it again at
        the next poll, once a second, for as long as the disk is full.
        """
        delay = 1.0
        while True:
            try:
                await self.spool.complete_attempt(
                    msg_id, changed, finished, next_attempt, last_error, bounce
                )
                return
            except Exception:
                log.exception("cannot record the delivery of %s; retrying in %.0f s", msg_id, delay)
                if self.stopping:
                    return  # it stays queued as before: sent again after restart (a duplicate)
                await asyncio.sleep(delay)
                delay = min(60.0, delay * 2)

    def _bounce(
        self, message: Message, failed: list[Recipient], expired: bool
    ) -> tuple[str, str, bytes] | None:
        # A bounce never bounces (RFC 5321 §4.5.5): failures of a null-sender message end here.
        if not failed or message.is_bounce or not message.mail_from:
            return None
        content = build_bounce(
            reporting_host=self.config.smtp.hostname,
            original_id=message.id,
            original_sender=message.mail_from,
            arrival=message.created,
            failures=[Failure(r.address, r.code, r.reply) for r in failed],
            original=message.content,
            expired=expired,
        )
        return new_id(), message.mail_from, content
