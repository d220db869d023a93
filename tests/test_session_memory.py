"""A finished session is freed by reference counting, not left for the cycle collector.

Left to the collector, a flood's sessions piled up and were freed thousands at a time, in
collections that held the event loop for milliseconds (see RelaySMTP._forget).
"""

from __future__ import annotations

import asyncio
import gc
import smtplib
import time
import weakref
from collections.abc import Iterator

import pytest

from mailfence.smtp.session import RelaySMTP
from mailfence.testing import RunningRelay, client_tls_context

from .conftest import ALICE, ALICE_PASSWORD, StartRelay, starttls_client


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def live_sessions(relay: RunningRelay) -> list[weakref.ReferenceType[RelaySMTP]]:
    async def snapshot() -> list[weakref.ReferenceType[RelaySMTP]]:
        return [weakref.ref(session) for session in relay.server.listeners.live]

    assert relay.loop is not None
    return asyncio.run_coroutine_threadsafe(snapshot(), relay.loop).result(timeout=10)


def wait_until_freed(refs: list[weakref.ReferenceType[RelaySMTP]]) -> bool:
    for _ in range(100):  # bounded: 5 s
        if all(ref() is None for ref in refs):
            return True
        time.sleep(0.05)
    return False


def test_sessions_are_freed_without_the_cycle_collector(
    start_relay: StartRelay, no_cycle_collector: None
) -> None:
    relay = start_relay()
    # A customer's whole session: STARTTLS, AUTH, a message, QUIT.
    client = starttls_client(relay)
    [session] = live_sessions(relay)
    client.sendmail(ALICE, ["bob@example.net"], b"Subject: hi\r\n\r\nhello\r\n")
    client.quit()
    # A stranger's: a wrong password, then the connection dropped without QUIT.
    stranger = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
    stranger.starttls(context=client_tls_context())
    [dropped] = [ref for ref in live_sessions(relay) if ref is not session and ref() is not None]
    with pytest.raises(smtplib.SMTPAuthenticationError):
        stranger.login(ALICE, ALICE_PASSWORD + "wrong")
    stranger.close()  # no QUIT: the socket just closes
    assert wait_until_freed([session, dropped])


def test_a_session_dropped_during_data_is_freed(
    start_relay: StartRelay, no_cycle_collector: None
) -> None:
    """A customer whose link drops in the middle of a message: the session ends there, and no
    timer re-armed on the way out holds it (and trips over its closed transport later)."""
    relay = start_relay()
    client = starttls_client(relay)
    [session] = live_sessions(relay)
    client.mail(ALICE)
    client.rcpt("bob@example.net")
    client.putcmd("DATA")
    assert client.getreply()[0] == 354
    client.send(b"Subject: cut off\r\n\r\nhalf a mess")
    client.close()  # no end of data, no QUIT
    assert wait_until_freed([session])
