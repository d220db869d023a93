"""The verification pool's lanes, with real argon2 slowed down so states can be observed."""

from __future__ import annotations

import asyncio
import os
import threading

import argon2

from mailfence.auth import (
    STRANGERS_NICE,
    Accounts,
    Authenticator,
    CredentialCache,
    Outcome,
    VerificationPool,
)
from mailfence.config import AuthConfig
from mailfence.store.users import User

# Slow enough (hundreds of ms) that the pool's state can be read while hashes run.
SLOW = argon2.PasswordHasher(time_cost=8, memory_cost=65536, parallelism=1)
SECRET = b"correct horse"


def test_strangers_hold_at_most_their_share_and_customers_start_at_once() -> None:
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=2, known_queue=8, unknown_queue=1, unknown_threads=1)
        first = asyncio.create_task(pool.verify(digest, b"guess 1", "unknown"))
        await asyncio.sleep(0)
        second = asyncio.create_task(pool.verify(digest, b"guess 2", "unknown"))
        await asyncio.sleep(0)
        # One stranger hashes; the second waits although a thread is free: that thread is
        # the customers' margin.
        assert pool.busy_by_lane == {"known": 0, "retry": 0, "unknown": 1}
        assert len(pool.waiting["unknown"]) == 1
        assert pool.full("unknown")  # queue of 1 is taken: the next stranger is told 454
        customer = asyncio.create_task(pool.verify(digest, SECRET, "known"))
        await asyncio.sleep(0)
        assert pool.busy_by_lane == {"known": 1, "retry": 0, "unknown": 1}
        assert not pool.full("known")
        assert await customer is True
        assert not await first
        assert not await second
        assert pool.busy == 0 and pool.busy_by_lane == {"known": 0, "retry": 0, "unknown": 0}
        # The waiting stranger got the unknown slot only after the first one let it go.
        assert len(pool.recent_waits["unknown"]) == 2
        assert max(pool.recent_waits["unknown"]) > 0
        pool.shutdown()

    asyncio.run(main())


def test_known_lane_is_served_before_waiting_strangers() -> None:
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=1, known_queue=8, unknown_queue=8, unknown_threads=1)
        order: list[str] = []

        async def verify(label: str, lane: str) -> None:
            await pool.verify(digest, SECRET, lane)
            order.append(label)

        tasks = [asyncio.create_task(verify("stranger 1", "unknown"))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(verify("stranger 2", "unknown")))
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(verify("customer", "known")))
        await asyncio.gather(*tasks)
        assert order == ["stranger 1", "customer", "stranger 2"]
        pool.shutdown()

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=1, known_queue=8, unknown_queue=8)
        running = asyncio.create_task(pool.verify(digest, SECRET, "unknown"))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(pool.verify(digest, SECRET, "unknown"))
        await asyncio.sleep(0)
        waiting.cancel()
        await running
        assert pool.busy == 0 and not pool.waiting["unknown"]
        pool.shutdown()

    asyncio.run(main())


def test_a_session_that_leaves_mid_hash_holds_its_thread_until_the_hash_ends() -> None:
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=2, known_queue=8, unknown_queue=8, unknown_threads=1)
        hashing = asyncio.create_task(pool.verify(digest, b"guess", "unknown"))
        await asyncio.sleep(0.05)  # the hash is running on its thread now
        hashing.cancel()  # the bot hung up in the middle of AUTH
        await asyncio.sleep(0)
        # The thread still hashes, so the strangers' share is still in use: a second
        # stranger must wait rather than start a second hash beside it.
        assert pool.busy_by_lane["unknown"] == 1
        follower = asyncio.create_task(pool.verify(digest, b"guess 2", "unknown"))
        await asyncio.sleep(0)
        assert pool.busy_by_lane["unknown"] == 1 and len(pool.waiting["unknown"]) == 1
        assert not await follower
        assert hashing.cancelled()
        assert pool.busy == 0 and pool.busy_by_lane == {"known": 0, "retry": 0, "unknown": 0}
        pool.shutdown()

    asyncio.run(main())


def test_retry_tickets_are_bounded_and_lead_to_the_retry_lane() -> None:
    from mailfence import auth

    authenticator = Authenticator(
        Accounts(dict), CredentialCache(60.0), VerificationPool(SLOW, 1, 1, 1)
    )
    for n in range(auth.MAX_RETRY_TICKETS + 50):
        authenticator._issue_ticket(f"198.51.100.{n}", b"key", 0.0)
    assert len(authenticator.retry_tickets) == auth.MAX_RETRY_TICKETS
    # A ticket is used once, by the same source with the same credentials, retrying (not at
    # the same instant) while it lasts.
    key = authenticator.cache.fingerprint("alice", b"pw")
    authenticator._issue_ticket("192.0.2.1", key, 0.0)
    assert authenticator._lane_for("unknown", "192.0.2.1", key, 0.1) == "unknown"  # concurrent
    assert authenticator._lane_for("unknown", "192.0.2.2", key, 5.0) == "unknown"
    assert authenticator._lane_for("unknown", "192.0.2.1", key, 5.0) == "retry"
    assert authenticator._lane_for("unknown", "192.0.2.1", key, 6.0) == "unknown"  # used up
    authenticator._issue_ticket("192.0.2.1", key, 0.0)
    assert authenticator._lane_for("unknown", "192.0.2.1", key, 10_000.0) == "unknown"
    authenticator.pool.shutdown()


def test_strangers_hash_at_a_lower_cpu_priority_than_customers() -> None:
    """While both run, the stranger's thread has the relay's nice value plus STRANGERS_NICE
    (capped at 19) and the customer's thread has the relay's own: the kernel gives the CPU
    to the event loop and the customer first."""
    digest = SLOW.hash(SECRET)
    relay_nice = os.getpriority(os.PRIO_PROCESS, 0)

    def nice_of(prefix: str) -> set[int]:
        return {
            os.getpriority(os.PRIO_PROCESS, thread.native_id)
            for thread in threading.enumerate()
            if thread.name.startswith(prefix) and thread.native_id is not None
        }

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=2, known_queue=8, unknown_queue=8, unknown_threads=1)
        stranger = asyncio.create_task(pool.verify(digest, b"guess", "unknown"))
        customer = asyncio.create_task(pool.verify(digest, SECRET, "known"))
        await asyncio.sleep(0.05)  # both threads exist and are hashing (hundreds of ms each)
        assert nice_of("mailfence-verify-strangers") == {min(19, relay_nice + STRANGERS_NICE)}
        assert nice_of("mailfence-verify_") == {relay_nice}
        assert await customer is True
        assert await stranger is False
        pool.shutdown()

    asyncio.run(main())


def test_decoys_take_as_long_as_a_strangers_hash() -> None:
    """A login for a user that does not exist is always a stranger's: its decoy delay is
    drawn from strangers' hashes (which run at a lower priority), not from customers'."""
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=2, known_queue=8, unknown_queue=8, unknown_threads=1)
        await pool.verify(digest, SECRET, "known")
        [customer] = pool.recent_seconds
        assert customer * 0.9 <= pool.decoy_delay() <= customer * 1.1  # all there is so far
        await pool.verify(digest, b"guess", "unknown")
        [stranger] = pool.recent_stranger_seconds
        for _ in range(20):
            assert stranger * 0.9 <= pool.decoy_delay() <= stranger * 1.1
        pool.shutdown()

    asyncio.run(main())


def test_decoys_take_as_long_as_a_stranger_waits_in_a_busy_lane() -> None:
    """Strangers hash one at a time: when two arrive together, the second waits for the first.
    A real name's answer then takes the wait plus a hash; a decoy must be drawn from that
    whole time, or a busy lane would tell real names from unknown ones by timing."""
    digest = SLOW.hash(SECRET)

    async def main() -> None:
        pool = VerificationPool(SLOW, threads=2, known_queue=8, unknown_queue=8, unknown_threads=1)
        await asyncio.gather(
            pool.verify(digest, b"first", "unknown"), pool.verify(digest, b"second", "unknown")
        )
        waited = max(pool.recent_waits["unknown"])
        assert waited > 0  # the second did wait for the thread
        hashes, answers = list(pool.recent_seconds), list(pool.recent_stranger_seconds)
        assert max(answers) >= waited + min(hashes) * 0.5
        assert max(answers) > max(hashes)  # longer than any hash alone
        drawn = [pool.decoy_delay() for _ in range(200)]
        assert max(drawn) >= max(answers) * 0.9
        pool.shutdown()

    asyncio.run(main())


def test_by_default_a_stranger_is_hashed_at_once_or_told_busy_at_once() -> None:
    """The shipped defaults keep no strangers' queue: while a stranger's hash runs, another
    stranger is answered BUSY without waiting behind it; the same credentials retried from
    the same source go to the retry lane and are checked."""
    from mailfence import auth

    assert AuthConfig().verify_queue == 0

    async def main() -> None:
        authenticator, pool = _authenticator_with_defaults("alice", "bob")
        bot = asyncio.create_task(authenticator.check("alice", b"guess", source="203.0.113.9"))
        await asyncio.sleep(0)
        assert pool.busy_by_lane["unknown"] == 1
        newcomer = await authenticator.check("bob", SECRET, source="198.51.100.7")
        assert newcomer.outcome is Outcome.BUSY
        assert not bot.done()  # answered while the stranger's hash still ran: no wait
        assert not pool.waiting["unknown"]
        # A mail server retries a few seconds later: served ahead of the strangers.
        ticket = ("198.51.100.7", authenticator.cache.fingerprint("bob", SECRET))
        authenticator.retry_tickets[ticket] -= auth.RETRY_TICKET_MIN_AGE
        retried = await authenticator.check("bob", SECRET, source="198.51.100.7")
        assert retried.outcome is Outcome.OK and retried.lane == "retry"
        assert (await bot).outcome is Outcome.BAD_CREDENTIALS
        pool.shutdown()

    asyncio.run(main())


def _authenticator_with_defaults(*names: str) -> tuple[Authenticator, VerificationPool]:
    """The shipped [auth] defaults; each of `names` (alice by default) with password SECRET."""
    defaults = AuthConfig()
    users = {
        name: User(name, SLOW.hash(SECRET), (), disabled=False, updated=0.0)
        for name in names or ("alice",)
    }
    accounts = Accounts(lambda: users)
    accounts.users = users
    pool = VerificationPool(
        SLOW,
        defaults.verify_threads,
        defaults.verify_queue_known,
        defaults.verify_queue,
        defaults.verify_threads_unknown,
    )
    return Authenticator(accounts, CredentialCache(60.0), pool), pool


def test_copies_of_one_login_at_once_share_one_verification() -> None:
    """A customer's server opening several connections at once, before its first login ever
    succeeded: one hash answers them all, and none is told BUSY (the strangers' lane has no
    queue by default, so each copy would otherwise be)."""

    async def main() -> None:
        authenticator, pool = _authenticator_with_defaults()
        copies = [authenticator.check("alice", SECRET, source="198.51.100.7") for _ in range(4)]
        verdicts = await asyncio.gather(*copies)
        assert [v.outcome for v in verdicts] == [Outcome.OK] * 4
        assert len(pool.recent_seconds) == 1  # one argon2 run
        assert sum(v.cached for v in verdicts) == 3
        assert not authenticator.verifying
        # The same wrong password four times at once is one mistake: one counts.
        wrong = [authenticator.check("alice", b"stale", source="198.51.100.7") for _ in range(4)]
        failures = await asyncio.gather(*wrong)
        assert [v.outcome for v in failures] == [Outcome.BAD_CREDENTIALS] * 4
        assert sum(not v.repeated for v in failures) == 1
        assert len(pool.recent_seconds) == 2
        # Different passwords are separate checks: the second stranger is told BUSY.
        guesses = [authenticator.check("alice", b"guess %d" % n) for n in range(2)]
        outcomes = sorted(v.outcome.value for v in await asyncio.gather(*guesses))
        assert outcomes == [Outcome.BAD_CREDENTIALS.value, Outcome.BUSY.value]
        pool.shutdown()

    asyncio.run(main())


def test_a_copy_checks_for_itself_when_the_session_that_started_the_check_goes_away() -> None:
    async def main() -> None:
        authenticator, pool = _authenticator_with_defaults()
        first = asyncio.create_task(authenticator.check("alice", SECRET))
        await asyncio.sleep(0)
        assert pool.busy_by_lane["unknown"] == 1
        copy = asyncio.create_task(authenticator.check("alice", SECRET))
        await asyncio.sleep(0)
        first.cancel()  # its client disconnected mid-AUTH
        verdict = await copy
        assert verdict.outcome is Outcome.OK
        assert first.cancelled()
        assert not authenticator.verifying
        pool.shutdown()

    asyncio.run(main())
