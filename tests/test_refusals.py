"""What the relay refuses, and the reply each refusal gets (DESIGN.md, "Reply codes")."""

from __future__ import annotations

import base64
import smtplib
import time

import pytest

from mailfence.smtp import replies
from mailfence.store import open_database
from mailfence.store import users as user_table
from mailfence.testing import RunningRelay, Sink, add_user, client_tls_context

from .conftest import ALICE, ALICE_PASSWORD, StartRelay, starttls_client

BODY = b"Subject: hi\r\n\r\nhello\r\n"


def expect(reply: tuple[int, bytes], expected: str) -> None:
    code, text = reply
    assert f"{code} {text.decode()}" == expected


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_before_tls_is_refused_with_538(relay: RunningRelay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as client:
        client.ehlo()
        expect(
            client.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PASSWORD)),
            replies.AUTH_ENCRYPTION_REQUIRED,
        )


def test_plaintext_networks_may_auth_without_tls(start_relay: StartRelay, sink: Sink) -> None:
    import ipaddress

    relay = start_relay(auth={"plaintext_networks": (ipaddress.ip_network("127.0.0.0/8"),)})
    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("auth")
        client.login(ALICE, ALICE_PASSWORD)
        client.sendmail(ALICE, ["bob@example.org"], BODY)
    [received] = sink.wait_for(1)
    assert b"with ESMTPA id" in received.content  # RFC 3848: authenticated, not encrypted


def test_wrong_password_is_temporary_by_default(relay: RunningRelay) -> None:
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        expect(
            client.docmd("AUTH", "PLAIN " + plain(ALICE, "wrong")), replies.AUTH_TEMPORARY_FAILURE
        )
        # The session goes on: the right password still works afterwards.
        expect(client.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PASSWORD)), replies.AUTH_OK)


def test_wrong_password_is_permanent_when_configured(start_relay: StartRelay) -> None:
    relay = start_relay(auth={"failure_reply": "permanent"})
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        expect(client.docmd("AUTH", "PLAIN " + plain(ALICE, "wrong")), replies.AUTH_INVALID)
        expect(
            client.docmd("AUTH", "PLAIN " + plain("nobody@example.com", "x")), replies.AUTH_INVALID
        )


def test_unknown_user_gets_the_same_reply_as_a_wrong_password(relay: RunningRelay) -> None:
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        expect(
            client.docmd("AUTH", "PLAIN " + plain("nobody@example.com", "x")),
            replies.AUTH_TEMPORARY_FAILURE,
        )


def test_disabled_user_cannot_log_in(relay: RunningRelay) -> None:
    add_user(relay.config, "bob@example.com", "bobs password")
    conn = open_database(relay.config.state_dir)
    user_table.set_disabled(conn, "bob@example.com", True)
    conn.close()
    time.sleep(1.5)  # the running relay notices changes to users within a second
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        expect(
            client.docmd("AUTH", "PLAIN " + plain("bob@example.com", "bobs password")),
            replies.AUTH_DISABLED,
        )
        expect(
            client.docmd("AUTH", "PLAIN " + plain("bob@example.com", "wrong")),
            replies.AUTH_TEMPORARY_FAILURE,
        )


def test_password_change_invalidates_a_cached_login(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:  # a success: now in the positive cache
        client.noop()
    conn = open_database(relay.config.state_dir)
    from mailfence.auth import make_hasher

    user_table.set_password(conn, ALICE, make_hasher(relay.config.auth).hash("new password"))
    conn.close()
    time.sleep(1.5)
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        expect(
            client.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PASSWORD)),
            replies.AUTH_TEMPORARY_FAILURE,
        )
        expect(client.docmd("AUTH", "PLAIN " + plain(ALICE, "new password")), replies.AUTH_OK)


def test_mail_without_auth_is_refused_no_open_relay(relay: RunningRelay) -> None:
    for port, tls in ((relay.starttls_port, True), (relay.starttls_port, False)):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            if tls:
                client.starttls(context=client_tls_context())
            client.ehlo()
            expect(client.docmd("MAIL", "FROM:<alice@example.com>"), replies.AUTH_REQUIRED)
            expect(client.docmd("RCPT", "TO:<bob@example.org>"), replies.AUTH_REQUIRED)
            expect(client.docmd("DATA"), replies.AUTH_REQUIRED)


def test_foreign_sender_is_refused(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:
        expect(client.docmd("MAIL", "FROM:<ceo@elsewhere.com>"), replies.SENDER_NOT_ALLOWED)
        expect(client.docmd("MAIL", "FROM:<billing@example.com>"), replies.SENDER_OK)


def test_account_without_patterns_may_send_only_as_itself(relay: RunningRelay) -> None:
    add_user(relay.config, "solo@example.net", "solo password")
    time.sleep(1.5)
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
    client.starttls(context=client_tls_context())
    client.login("solo@example.net", "solo password")
    expect(client.docmd("MAIL", "FROM:<other@example.net>"), replies.SENDER_NOT_ALLOWED)
    expect(client.docmd("MAIL", "FROM:<SOLO@example.net>"), replies.SENDER_OK)
    client.quit()


def test_too_many_recipients_gets_452(start_relay: StartRelay, sink: Sink) -> None:
    relay = start_relay(relay={"max_recipients": 2})
    with starttls_client(relay) as client:
        expect(client.docmd("MAIL", "FROM:<alice@example.com>"), replies.SENDER_OK)
        expect(client.docmd("RCPT", "TO:<a@example.org>"), replies.RECIPIENT_OK)
        expect(client.docmd("RCPT", "TO:<b@example.org>"), replies.RECIPIENT_OK)
        expect(client.docmd("RCPT", "TO:<c@example.org>"), replies.TOO_MANY_RECIPIENTS)
        code, _ = client.data(BODY)
        assert code == 250
    [received] = sink.wait_for(1)
    assert received.rcpt_tos == ["a@example.org", "b@example.org"]


def test_oversize_message_is_refused_with_552(start_relay: StartRelay, sink: Sink) -> None:
    relay = start_relay(relay={"max_message_bytes": 4096})
    with starttls_client(relay) as client:
        code, text = client.docmd("MAIL", "FROM:<alice@example.com> SIZE=5000")
        assert code == 552, text
        client.rset()
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        code, text = client.data(b"Subject: big\r\n\r\n" + b"x" * 900 + b"\r\n" * 1 + b"y" * 4000)
        assert code in (500, 552), text  # too long a line or too much data: both refused
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 80)
        assert code == 552, text
        assert text.startswith(b"5.3.4 ")
        assert client.noop()[0] == 250
    time.sleep(0.5)
    assert sink.messages == []


@pytest.mark.parametrize("command", ["VRFY alice@example.com", "EXPN staff", "ETRN example.com"])
def test_other_commands_do_not_leak_or_crash(relay: RunningRelay, command: str) -> None:
    with starttls_client(relay) as client:
        client.send(command.encode() + b"\r\n")
        code, _ = client.getreply()
        assert code in (252, 500, 502)
        assert client.noop()[0] == 250


def test_passwords_never_reach_the_logs(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    secret = "Zebra-Umbrella-42"
    encoded = [
        base64.b64encode(secret.encode()).decode(),
        plain(ALICE, secret),
        plain(ALICE, ALICE_PASSWORD),
    ]
    with caplog.at_level(logging.DEBUG):
        with starttls_client(relay, login=False) as client:
            client.ehlo()
            client.docmd("AUTH", "PLAIN " + plain(ALICE, secret))
            client.user, client.password = ALICE, secret
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            client.user, client.password = ALICE, ALICE_PASSWORD
            client.auth("PLAIN", client.auth_plain)
        time.sleep(0.2)
    text = caplog.text
    assert "auth ok" in text and "auth failed" in text  # the log did see the logins
    for leaked in [secret, ALICE_PASSWORD, *encoded]:
        assert leaked not in text


def test_disabling_an_account_ends_its_open_session(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:
        expect(client.docmd("MAIL", "FROM:<alice@example.com>"), replies.SENDER_OK)
        client.rset()
        conn = open_database(relay.config.state_dir)
        user_table.set_disabled(conn, ALICE, True)
        conn.close()
        time.sleep(1.5)
        expect(client.docmd("MAIL", "FROM:<alice@example.com>"), replies.ACCOUNT_CHANGED)
        expect(client.docmd("MAIL", "FROM:<alice@example.com>"), replies.AUTH_REQUIRED)
