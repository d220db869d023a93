"""Never lose a message that was answered 250: SIGKILL right after the replies."""

from __future__ import annotations

import re
import signal
import smtplib
import threading
from collections.abc import Callable

import pytest

from mailfence.testing import Sink, client_tls_context, free_port

from .conftest import ALICE, ALICE_PASSWORD, ServeProcess

pytestmark = pytest.mark.slow


def send_batch(port: int, count: int, tag: str) -> list[str]:
    """Sends `count` messages on one connection; returns the queue ids from the 250 replies."""
    ids = []
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    client.starttls(context=client_tls_context())
    client.login(ALICE, ALICE_PASSWORD)
    for n in range(count):
        client.mail(ALICE)
        client.rcpt("bob@example.org")
        code, text = client.data(f"Subject: {tag}-{n}\r\n\r\nbody {n}\r\n".encode())
        assert code == 250, text
        ids.append(text.decode().rsplit(" ", 1)[1])
    client.close()  # no QUIT: the kill comes right after the last reply
    return ids


def test_sigkill_after_250_loses_nothing(serve_process: Callable[..., ServeProcess]) -> None:
    upstream_port = free_port()  # nothing listens there yet: the upstream is down
    relay = serve_process(upstream_port)
    added = relay.cli("users", "add", ALICE, "--password-stdin", stdin=ALICE_PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    relay.start()

    answered: list[str] = []
    lock = threading.Lock()

    def client(tag: str) -> None:
        ids = send_batch(relay.starttls_port, 15, tag)
        with lock:
            answered.extend(ids)

    # Several concurrent connections, so replies come out of shared (group) commits.
    threads = [threading.Thread(target=client, args=(f"c{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    relay.signal(signal.SIGKILL)
    assert relay.wait(10) == -signal.SIGKILL
    assert len(answered) == 60

    with Sink(port=upstream_port) as sink:
        relay.start()
        received = sink.wait_for(60, timeout=30)
    delivered = {
        m.group(1).decode() for r in received for m in [re.search(rb" id (\S+)", r.content)] if m
    }
    missing = set(answered) - delivered
    assert not missing, f"{len(missing)} answered messages were lost"
