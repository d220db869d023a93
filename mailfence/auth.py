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
import random
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import argon2

from mailfence.config import AuthConfig
from mailfence.store import users as user_table
from mailfence.store.users import User


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


def _bounded_put(table: dict[bytes, Any], limit: int, key: bytes, value: Any) -> None:
    if key not in table and len(table) >= limit:
        # Drop the oldest insertion: dicts keep order, so this is O(1).
        del table[next(iter(table))]
    table[key] = value


class VerificationPool:
    """argon2 on a fixed number of threads, fed by two bounded lanes.

    The known-good lane (a user logging in from a network it has used before) is always
    served first; the unknown lane takes what is left. A lane whose queue is full answers at
    once (BUSY): nobody waits in a line they cannot see the end of.
    """

    def __init__(
        self, hasher: argon2.PasswordHasher, threads: int, known_queue: int, unknown_queue: int
    ) -> None:
        self._hasher = hasher
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mailfence-verify")
        self.threads = threads
        self.busy = 0
        self.limits = {"known": known_queue, "unknown": unknown_queue}
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {
            "known": deque(),
            "unknown": deque(),
        }
        # Recent verification times, used to make a login for an unknown user take as long.
        self.recent_seconds: deque[float] = deque(maxlen=64)

    @property
    def in_flight(self) -> int:
        return self.busy + sum(len(q) for q in self.waiting.values())

    def full(self, lane: str = "unknown") -> bool:
        return self.busy >= self.threads and len(self.waiting[lane]) >= self.limits[lane]

    async def _acquire(self, lane: str) -> None:
        if self.busy < self.threads:
            self.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[lane].append(waiter)
        try:
            await waiter  # the releasing verification hands its slot over
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # we were handed a slot but will not use it
            else:
                self.waiting[lane].remove(waiter)
            raise

    def _release(self) -> None:
        for lane in ("known", "unknown"):  # known-good first, always
            queue = self.waiting[lane]
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.busy -= 1

    async def verify(self, password_hash: str, password: bytes, lane: str = "unknown") -> bool:
        await self._acquire(lane)
        try:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            ok = await loop.run_in_executor(
                self._executor, verify_password, self._hasher, password_hash, password
            )
            self.recent_seconds.append(time.perf_counter() - started)
            return ok
        finally:
            self._release()

    def decoy_delay(self) -> float:
        """How long a real verification takes now, drawn from recent ones."""
        if not self.recent_seconds:
            return 0.02
        return random.choice(self.recent_seconds) * random.uniform(0.9, 1.1)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Authenticator:
    def __init__(self, accounts: Accounts, cache: CredentialCache, pool: VerificationPool):
        self.accounts = accounts
        self.cache = cache
        self.pool = pool

    async def check(self, name: str, password: bytes, lane: str = "unknown") -> Verdict:
        now = time.monotonic()
        user = self.accounts.get(name)
        if user is not None and self.cache.hit(user, password, now):
            return Verdict(Outcome.OK, user, cached=True)
        key = self.cache.fingerprint(name, password)
        if self.cache.failed_before(key, user, now):
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key, repeated=True)
        if self.pool.full(lane):
            return Verdict(Outcome.BUSY)
        if user is None:
            # No hash to check, but the answer must not come back faster than a real one
            # would: sleep (no CPU) for as long as a verification takes.
            await asyncio.sleep(self.pool.decoy_delay())
            self.cache.remember_failure(key, None, now)
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key)
        if not await self.pool.verify(user.password_hash, password, lane):
            self.cache.remember_failure(key, user, now)
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key)
        current = self.accounts.get(name)  # the account may have changed while we hashed
        if current is None or current.password_hash != user.password_hash:
            return Verdict(Outcome.BAD_CREDENTIALS, fingerprint=key)
        if current.disabled:
            return Verdict(Outcome.DISABLED, current)
        self.cache.remember(current, password, now)
        return Verdict(Outcome.OK, current)
