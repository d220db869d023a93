"""A message relayed end to end: client → mailfence (TLS, AUTH) → spool → sink."""

from __future__ import annotations

import email
import shutil
import subprocess

import pytest

from mailfence.smtp import replies
from mailfence.testing import RunningRelay, Sink

from .conftest import ALICE, ALICE_PASSWORD, implicit_client, starttls_client

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <report-1@example.com>\r\n"
    b"\r\n"
    b"Numbers attached.\r\n"
    b".leading dot survives transparency\r\n"
    b"caf\xc3\xa9 in 8 bits\r\n"
)


def _check_delivered(sink: Sink, rcpts: list[str]) -> None:
    [received] = sink.wait_for(1)
    assert received.mail_from == "billing@example.com"
    assert received.rcpt_tos == rcpts
    headers, _, body = received.content.partition(b"\r\n\r\n")
    # The original message is intact, after exactly one Received line of ours on top.
    assert received.content.endswith(MESSAGE)
    assert headers.startswith(b"Received: from ")
    assert b"by relay.test (mailfence) with ESMTPSA id " in headers
    parsed = email.message_from_bytes(received.content)
    assert len(parsed.get_all("Received") or []) == 1
    assert parsed["Subject"] == "quarterly report"
    assert body == MESSAGE.partition(b"\r\n\r\n")[2]


def test_starttls_relay_end_to_end(relay: RunningRelay, sink: Sink) -> None:
    with starttls_client(relay) as client:
        refused = client.sendmail("billing@example.com", ["bob@example.org"], MESSAGE)
        assert refused == {}
    _check_delivered(sink, ["bob@example.org"])


def test_implicit_tls_relay_end_to_end(relay: RunningRelay, sink: Sink) -> None:
    with implicit_client(relay) as client:
        client.sendmail("billing@example.com", ["bob@example.org", "carol@example.net"], MESSAGE)
    _check_delivered(sink, ["bob@example.org", "carol@example.net"])


def test_reply_says_queued_with_the_id(relay: RunningRelay, sink: Sink) -> None:
    with starttls_client(relay) as client:
        client.mail("billing@example.com")
        client.rcpt("bob@example.org")
        code, text = client.data(MESSAGE)
    assert code == 250
    assert text.decode().startswith(replies.QUEUED.split("{")[0][4:])
    queue_id = text.decode().rsplit(" ", 1)[1]
    [received] = sink.wait_for(1)
    assert f"id {queue_id}".encode() in received.content


def test_ehlo_advertises_extensions_and_auth_only_after_tls(relay: RunningRelay) -> None:
    import smtplib

    from mailfence.testing import client_tls_context

    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as client:
        client.ehlo()
        for extension in ("size", "8bitmime", "pipelining", "smtputf8", "enhancedstatuscodes"):
            assert client.has_extn(extension), extension
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        client.starttls(context=client_tls_context())
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert not client.has_extn("starttls")


def test_auth_login_mechanism(relay: RunningRelay, sink: Sink) -> None:
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        client.user, client.password = ALICE, ALICE_PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        client.sendmail("billing@example.com", ["bob@example.org"], MESSAGE)
    assert len(sink.wait_for(1)) == 1


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (.ci/run installs it)"
)
def test_swaks_relays_over_starttls_and_implicit_tls(relay: RunningRelay, sink: Sink) -> None:
    common = [
        "swaks",
        "--server",
        "127.0.0.1",
        "--from",
        "billing@example.com",
        "--to",
        "bob@example.org",
        "--auth",
        "PLAIN",
        "--auth-user",
        ALICE,
        "--auth-password",
        ALICE_PASSWORD,
        "--header",
        "Subject: via swaks",
    ]
    for extra in (
        ["--port", str(relay.starttls_port), "--tls"],
        ["--port", str(relay.implicit_port), "--tlsc"],
    ):
        result = subprocess.run(
            common + extra, capture_output=True, text=True, timeout=30, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "250 2.0.0 Ok: queued as" in result.stdout
    received = sink.wait_for(2)
    assert len(received) == 2
    assert all(b"Subject: via swaks" in r.content for r in received)
