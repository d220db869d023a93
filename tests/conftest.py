from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfence.config import Config
from mailfence.testing import RunningRelay, Sink, add_user, client_tls_context, relay_config

ALICE = "alice@example.com"
ALICE_PASSWORD = "correct horse battery staple"


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as running:
        yield running


StartRelay = Callable[..., RunningRelay]


@pytest.fixture
def start_relay(tmp_path: Path, sink: Sink) -> Iterator[StartRelay]:
    """Starts a relay delivering to `sink`, with alice allowed to send as *@example.com."""
    started: list[RunningRelay] = []

    def start(config: Config | None = None, **sections: Any) -> RunningRelay:
        settings = config or relay_config(tmp_path / "state", sink.port, **sections)
        if not started:
            add_user(settings, ALICE, ALICE_PASSWORD, ["*@example.com"])
        relay = RunningRelay(settings).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay: StartRelay) -> RunningRelay:
    return start_relay()


def starttls_client(relay: RunningRelay, login: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
    client.starttls(context=client_tls_context())
    if login:
        client.login(ALICE, ALICE_PASSWORD)
    return client


def implicit_client(relay: RunningRelay, login: bool = True) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, timeout=10, context=client_tls_context()
    )
    if login:
        client.login(ALICE, ALICE_PASSWORD)
    return client
