"""The auth gate: who may log in, checked with the cheapest step that can decide.

Order (DESIGN.md, "One request, end to end"): the account table in memory, a positive cache
of recent successes (keyed HMAC, so a memory dump shows no passwords), then the bounded
verification pool, where argon2id runs on threads (argon2 releases the GIL) and never on the
event loop. When the pool and its queue are full the answer is BUSY at once: a client is never
kept in a line it cannot see the end of.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import os
import random
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import argon2

from mailfence.config import AuthConfig
from mailfence.store import users as user_table
from mailfence.store.users import User

log = logging.getLogger("mailfence.auth")

# How much lower than the relay's own the CPU priority of strangers' hashes (the unknown and
# retry lanes) is, as a nice increment: the event loop and customers' hashes get the CPU
# first. Five, not more: a stranger's hash must still finish promptly on a busy machine (a
# bot is never kept waiting because the relay is busy), and a thread that waits long for a
# core may hold up the event loop when it takes the GIL back (measured with the flood
# benchmark: at +10 strangers' hashes took 100+ ms under load, at +5 about 25 ms).
STRANGERS_NICE = 5


def make_hasher(config: AuthConfig) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(
        time_cost=config.argon2_time_cost,
        memory_cost=config.argon2_memory_kib,
        parallelism=config.argon2_parallelism,
        type=argon2.Type.ID,
    )


def verify_password(hasher: argon2.PasswordHasher, password_hash: str, password: bytes) -> bool:
    """Blocking: call it on a thread."""
    try:
        return hasher.verify(password_hash, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


class Outcome(enum.Enum):
    OK = "ok"
    BAD_CREDENTIALS = "bad_credentials"
    DISABLED = "disabled"
    BUSY = "busy"


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    user: User | None = None
    cached: bool = False
    fingerprint: bytes = b""  # keyed HMAC of (user, password): counts distinct guesses
    repeated: bool = False  # the same wrong password again, answered from the negative cache
    lane: str = ""  # the verification lane it went through ("" when answered from a cache)


class Accounts:
    """The users table held in memory, so a login never reads SQLite on the event loop."""

    def __init__(self, load: Callable[[], dict[str, User]]) -> None:
        self._load = load
        self.users: dict[str, User] = {}

    async def reload(self) -> None:
        self.users = await asyncio.to_thread(self._load)

    def get(self, name: str) -> User | None:
        return self.users.get(name)


def accounts_from_database(database_path: str) -> Accounts:
    def load() -> dict[str, User]:
        conn = sqlite3.connect(database_path, timeout=10.0)
        try:
            return user_table.load_all(conn)
        finally:
            conn.close()

    return Accounts(load)


class CredentialCache:
    """Recent logins, keyed by HMAC(secret, user, password): successes and failures.

    A success remembers the account's `updated` stamp: a password change, a disable or a
    delete changes or removes the account, and the entry stops matching at once. A failure
    (the negative cache) answers the same user with the same wrong password without hashing,
    and tells the defense it is a repeat, not a new guess.
    """

    def __init__(self, ttl: float, negative_ttl: float = 600.0, max_entries: int = 10000) -> None:
        self._secret = secrets.token_bytes(32)
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, float]] = {}  # key -> (expires, user.updated)
        self._failures: dict[bytes, tuple[float, float]] = {}  # key -> (expires, user.updated)

    def fingerprint(self, name: str, password: bytes) -> bytes:
        message = name.encode("utf-8", "surrogateescape") + b"\0" + password
        return hmac.digest(self._secret, message, hashlib.sha256)

    _key = fingerprint

    def hit(self, user: User, password: bytes, now: float) -> bool:
        key = self._key(user.name, password)
        entry = self._entries.get(key)
        if entry is None:
            return False
        expires, stamp = entry
        if expires < now or stamp != user.updated:
            del self._entries[key]
            return False
        return True

    def remember(self, user: User, password: bytes, now: float) -> None:
        if self._ttl <= 0:
            return
        _bounded_put(
            self._entries,
            self._max,
            self._key(user.name, password),
            (now + self._ttl, user.updated),
        )
        self._failures.pop(self._key(user.name, password), None)

    def failed_before(self, key: bytes, user: User | None, now: float) -> bool:
        entry = self._failures.get(key)
        if entry is None:
            return False
        expires, stamp = entry
        # A changed account (a new password may be the one that failed) starts afresh.
        if expires < now or stamp != (user.updated if user else 0.0):
            del self._failures[key]
            return False
        return True

    def remember_failure(self, key: bytes, user: User | None, now: float) -> None:
        if self._negative_ttl > 0:
            stamp = user.updated if user else 0.0
            _bounded_put(self._failures, self._max, key, (now + self._negative_ttl, stamp))

    def __len__(self) -> int:
        return len(self._entries)


K = TypeVar("K")
V = TypeVar("V")


def _bounded_put(table: dict[K, V], limit: int, key: K, value: V) -> None:
    if key not in table and len(table) >= limit:
        # Drop the oldest insertion: dicts keep order, so this is O(1).
        del table[next(iter(table))]
    table[key] = value


# Lanes in the order they are served. "retry": a stranger told BUSY before, back with the
# same user and password from the same source (a real server retrying; a bot guesses anew).
LANES = ("known", "retry", "unknown")
RETRY_QUEUE = 32
# An hour: a mail server's retries after a 4xx come minutes apart (Postfix: 5, then 10, then
# 20 minutes), and in a flood its next connection may be turned away at the door once more.
RETRY_TICKET_SECONDS = 3600.0
RETRY_TICKET_MIN_AGE = 1.0  # concurrent copies of one attempt are not retries
MAX_RETRY_TICKETS = 50_000  # a flood's refused strangers add about 10 a second


class VerificationPool:
    """argon2 on a fixed number of threads, fed by bounded lanes.

    The known-good lane (a user logging in from a network it has used before) is always
    served first and may use every thread; strangers (the retry and unknown lanes) may hold
    at most `unknown_threads` of them, so strangers can never fill every core: a customer's
    verification (and the event loop) always find CPU. A lane whose queue is full answers at
    once (BUSY): nobody waits in a line they cannot see the end of.

    Strangers' hashes run on threads of their own, at a lower CPU priority (Linux keeps a
    nice value per thread): while a flood has a stranger's hash running, the event loop and
    the customers' hashes take the CPU first instead of sharing it with the bots' guesses.
    `threads` still bounds how many hashes run at once, strangers' included.
    """

    def __init__(
        self,
        hasher: argon2.PasswordHasher,
        threads: int,
        known_queue: int,
        unknown_queue: int,
        unknown_threads: int | None = None,
    ) -> None:
        self._hasher = hasher
        self.threads = threads
        self.unknown_threads = min(threads, unknown_threads or threads)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mailfence-verify")
        self._strangers_executor = ThreadPoolExecutor(
            self.unknown_threads,
            thread_name_prefix="mailfence-verify-strangers",
            initializer=lower_thread_priority,
        )
        self.busy = 0
        self.busy_by_lane = dict.fromkeys(LANES, 0)
        self.limits = {"known": known_queue, "retry": RETRY_QUEUE, "unknown": unknown_queue}
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {lane: deque() for lane in LANES}
        # Recent verification times, used to make a login for an unknown user take as long.
        self.recent_seconds: deque[float] = deque(maxlen=64)
        # How long strangers waited for their answer, the wait for a thread included (their
        # hashes run at a lower priority, one thread at a time): a login for a user that does
        # not exist is always a stranger's, and must take as long as one, or a busy lane
        # would tell real names (queued) from unknown ones (answered after a hash's time).
        self.recent_stranger_seconds: deque[float] = deque(maxlen=64)
        # Time spent waiting for a thread, per lane (the last 256): `top` shows its p99.
        self.recent_waits: dict[str, deque[float]] = {lane: deque(maxlen=256) for lane in LANES}

    @property
    def in_flight(self) -> int:
        return self.busy + sum(len(q) for q in self.waiting.values())

    def _can_start(self, lane: str) -> bool:
        if self.busy >= self.threads:
            return False
        strangers = self.busy_by_lane["retry"] + self.busy_by_lane["unknown"]
        return lane == "known" or strangers < self.unknown_threads

    def full(self, lane: str = "unknown") -> bool:
        return not self._can_start(lane) and len(self.waiting[lane]) >= self.limits[lane]

    def _take(self, lane: str) -> None:
        self.busy += 1
        self.busy_by_lane[lane] += 1

    async def _acquire(self, lane: str) -> None:
        if self._can_start(lane):
            self._take(lane)
            self.recent_waits[lane].append(0.0)
            return
        started = time.perf_counter()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[lane].append(waiter)
        try:
            await waiter  # the releasing verification hands a slot over (already taken)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(lane)  # we were handed a slot but will not use it
            else:
                self.waiting[lane].remove(waiter)
            raise
        self.recent_waits[lane].append(time.perf_counter() - started)

    def _release(self, lane: str) -> None:
        self.busy -= 1
        self.busy_by_lane[lane] -= 1
        for next_lane in LANES:  # known-good first, always; then strangers who retried
            queue = self.waiting[next_lane]
            while queue and self._can_start(next_lane):
                waiter = queue.popleft()
                if not waiter.done():
                    self._take(next_lane)
                    waiter.set_result(None)

    async def verify(self, password_hash: str, password: bytes, lane: str = "unknown") -> bool:
        return await asyncio.shield(await self.start(password_hash, password, lane))

    async def start(
        self, password_hash: str, password: bytes, lane: str = "unknown"
    ) -> asyncio.Future[bool]:
        """Waits for a slot in `lane` (none when one is free: no await before it is taken)
        and starts the hash; returns its future, which runs to the end whoever awaits it."""
        entered = time.perf_counter()
        await self._acquire(lane)
        try:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            executor = self._executor if lane == "known" else self._strangers_executor
            job = loop.run_in_executor(
                executor, verify_password, self._hasher, password_hash, password
            )
        except BaseException:
            self._release(lane)
            raise

        def finished(job: asyncio.Future[bool]) -> None:
            # The slot is free when the hash has finished, not when the client gave up: a
            # session dropped mid-AUTH must not let another hash start on a busy core.
            self._release(lane)
            if not job.cancelled() and job.exception() is None:
                now = time.perf_counter()
                self.recent_seconds.append(now - started)
                if lane != "known":
                    self.recent_stranger_seconds.append(now - entered)

        job.add_done_callback(finished)
        return job

    def decoy_delay(self) -> float:
        """How long a stranger's real verification takes now, drawn from recent ones."""
        samples = self.recent_stranger_seconds or self.recent_seconds
        if not samples:
            return 0.02
        return random.choice(samples) * random.uniform(0.9, 1.1)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._strangers_executor.shutdown(wait=False, cancel_futures=True)


def lower_thread_priority() -> None:
    """Raises the calling thread's nice value by STRANGERS_NICE (no privilege needed).

    On Linux, PRIO_PROCESS with a thread id changes that thread alone. Where that fails
    (another kernel, a seccomp filter), the thread runs at the relay's priority, as before.
    """
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + STRANGERS_NICE))
    except (AttributeError, OSError) as error:
        global _renice_failure_logged
        if not _renice_failure_logged:
            _renice_failure_logged = True
            log.warning("strangers' hashes run at normal priority: cannot renice: %s", error)


_renice_failure_logged = False


class Authenticator:
    def __init__(self, accounts: Accounts, cache: CredentialCache, pool: VerificationPool):
        self.accounts = accounts
        self.cache = cache
        self.pool = pool
        # (source, fingerprint) refused for load or suspicion -> when. A retry of the same
        # credentials from the same source, at least RETRY_TICKET_MIN_AGE later and within
        # RETRY_TICKET_SECONDS, is served ahead of strangers.
        self.retry_tickets: dict[tuple[Hashable, bytes], float] = {}
        # Fingerprints of (user, password) being checked right now -> their verdict to come.
        # One entry per verification or decoy in progress: bounded by the pool and by the
        # relay's connection limit (one AUTH at a time per session).
        self.verifying: dict[bytes, asyncio.Future[Verdict | None]] = {}

    def _lane_for(self, lane: str, source: Hashable | None, key: bytes, now: float) -> str:
        if lane != "unknown" or source is None:
            return lane
        issued = self.retry_tickets.get((source, key))
        if issued is None or now - issued < RETRY_TICKET_MIN_AGE:
            return lane  # none, or a concurrent attempt rather than a retry
        del self.retry_tickets[(source, key)]
        return "retry" if now - issued <= RETRY_TICKET_SECONDS else lane

    def _issue_ticket(self, source: Hashable | None, key: bytes, now: float) -> None:
        if source is not None and (source, key) not in self.retry_tickets:
            _bounded_put(self.retry_tickets, MAX_RETRY_TICKETS, (source, key), now)

    def issue(self, name: str, password: bytes, source: Hashable) -> None:
        """A refusal a retry may lift: remember these credentials from this source."""
        self._issue_ticket(source, self.cache.fingerprint(name, password), time.monotonic())

    def redeem(self, name: str, password: bytes, source: Hashable) -> bool:
        """True (once) when these credentials were refused from this source before."""
        key = self.cache.fingerprint(name, password)
        return self._lane_for("unknown", source, key, time.monotonic()) == "retry"

    async def check(
        self, name: str, password: bytes, lane: str = "unknown", source: Hashable | None = None
    ) -> Verdict:
        """`source` (the client's address or /64) lets a stranger told BUSY retry ahead of
        the flood: a first-time customer gets through on its next try."""
        now = time.monotonic()
        user = self.accounts.get(name)
        if user is not None and self.cache.hit(user, password, now):
            return Verdict(Outcome.OK, user, cached=True)
        key = self.cache.fingerprint(name, password)
        if self.cache.failed_before(key, user, now):
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key, repeated=True)
        pending = self.verifying.get(key)
        if pending is not None:
            # The same name and password are being checked right now: a customer's server
            # opening several connections at once. One verification answers them all (none
            # of them is told BUSY), and a wrong password is one mistake, not one per copy.
            verdict = await asyncio.shield(pending)
            if verdict is not None:
                return _joined(verdict)
            return await self.check(name, password, lane, source)  # that check was dropped
        lane = self._lane_for(lane, source, key, now)
        if self.pool.full(lane):
            if lane != "known":
                self._issue_ticket(source, key, now)
            return Verdict(Outcome.BUSY, lane=lane)
        published: asyncio.Future[Verdict | None] = asyncio.get_running_loop().create_future()
        self.verifying[key] = published

        def publish(verdict: Verdict | None) -> None:
            published.set_result(verdict)
            if self.verifying.get(key) is published:
                del self.verifying[key]

        try:
            # In this session up to the hash's start: between the pool's "not full" above
            # and its taking a slot there is no await, so the lanes' bounds hold.
            concluding = await self._start(name, user, password, key, lane, now)
        except BaseException:
            publish(None)  # gone while queued, before any hash: its copies check themselves
            raise

        def concluded(task: asyncio.Task[Verdict]) -> None:
            failed = task.cancelled() or task.exception() is not None
            publish(None if failed else task.result())

        concluding.add_done_callback(concluded)
        # Shielded: once the hash runs, its verdict reaches the caches and this session's
        # copies even if this session goes away.
        return await asyncio.shield(concluding)

    async def _start(
        self, name: str, user: User | None, password: bytes, key: bytes, lane: str, now: float
    ) -> asyncio.Task[Verdict]:
        if user is None:
            return asyncio.ensure_future(self._decoy(key, lane, now))
        job = await self.pool.start(user.password_hash, password, lane)
        return asyncio.ensure_future(self._conclude(job, name, user, password, key, lane, now))

    async def _decoy(self, key: bytes, lane: str, now: float) -> Verdict:
        # No hash to check, but the answer must not come back faster than a real one would:
        # sleep (no CPU) for as long as a verification takes.
        await asyncio.sleep(self.pool.decoy_delay())
        self.cache.remember_failure(key, None, now)
        return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key, lane=lane)

    async def _conclude(
        self,
        job: asyncio.Future[bool],
        name: str,
        user: User,
        password: bytes,
        key: bytes,
        lane: str,
        now: float,
    ) -> Verdict:
        if not await job:
            self.cache.remember_failure(key, user, now)
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key, lane=lane)
        current = self.accounts.get(name)  # the account may have changed while we hashed
        if current is None or current.password_hash != user.password_hash:
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key, lane=lane)
        if current.disabled:
            return Verdict(Outcome.DISABLED, current, lane=lane)
        self.cache.remember(current, password, now)
        return Verdict(Outcome.OK, current, lane=lane)


def _joined(verdict: Verdict) -> Verdict:
    """The verdict of a check another session started, as this session's: answered without
    a verification of its own, like the caches' answers."""
    if verdict.outcome is Outcome.OK:
        return Verdict(Outcome.OK, verdict.user, cached=True)
    if verdict.outcome is Outcome.BAD_CREDENTIALS:
        return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=verdict.fingerprint, repeated=True)
    return verdict
