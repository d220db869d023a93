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
    """Recent successful logins, keyed by HMAC(secret, user, password).

    An entry remembers the account's `updated` stamp: a password change, a disable or a
    delete changes or removes the account, and the entry stops matching at once.
    """

    def __init__(self, ttl: float, max_entries: int = 10000) -> None:
        self._secret = secrets.token_bytes(32)
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, float]] = {}  # key -> (expires, user.updated)

    def _key(self, name: str, password: bytes) -> bytes:
        message = name.encode("utf-8", "surrogateescape") + b"\0" + password
        return hmac.digest(self._secret, message, hashlib.sha256)

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
        if len(self._entries) >= self._max:
            # Drop the oldest insertion: dicts keep order, so this is O(1).
            del self._entries[next(iter(self._entries))]
        self._entries[self._key(user.name, password)] = (now + self._ttl, user.updated)

    def __len__(self) -> int:
        return len(self._entries)


class VerificationPool:
    """argon2 on a fixed number of threads with a bounded number of waiting requests."""

    def __init__(self, hasher: argon2.PasswordHasher, threads: int, queue_limit: int) -> None:
        self._hasher = hasher
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mailfence-verify")
        self.capacity = threads + queue_limit
        self.in_flight = 0
        # Recent verification times, used to make a login for an unknown user take as long.
        self.recent_seconds: deque[float] = deque(maxlen=64)

    def full(self) -> bool:
        return self.in_flight >= self.capacity

    async def verify(self, password_hash: str, password: bytes) -> bool:
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            ok = await loop.run_in_executor(
                self._executor, verify_password, self._hasher, password_hash, password
            )
            self.recent_seconds.append(time.perf_counter() - started)
            return ok
        finally:
            self.in_flight -= 1

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

    async def check(self, name: str, password: bytes) -> Verdict:
        now = time.monotonic()
        user = self.accounts.get(name)
        if user is not None and self.cache.hit(user, password, now):
            return Verdict(Outcome.OK, user, cached=True)
        if self.pool.full():
            return Verdict(Outcome.BUSY)
        if user is None:
            # No hash to check, but the answer must not come back faster than a real one
            # would: sleep (no CPU) for as long as a verification takes.
            await asyncio.sleep(self.pool.decoy_delay())
            return Verdict(Outcome.BAD_CREDENTIALS)
        if not await self.pool.verify(user.password_hash, password):
            return Verdict(Outcome.BAD_CREDENTIALS)
        current = self.accounts.get(name)  # the account may have changed while we hashed
        if current is None or current.password_hash != user.password_hash:
            return Verdict(Outcome.BAD_CREDENTIALS)
        if current.disabled:
            return Verdict(Outcome.DISABLED, current)
        self.cache.remember(current, password, now)
        return Verdict(Outcome.OK, current)
