"""Malformed and hostile input gets the right reply, never a traceback or a split message."""

from __future__ import annotations

import smtplib
import time

import pytest

from mailfence.smtp import replies
from mailfence.testing import RunningRelay, Sink

from .conftest import StartRelay, starttls_client


def raw(client: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    client.send(data)
    return client.getreply()


def still_alive(client: smtplib.SMTP) -> None:
    assert client.noop()[0] == 250


def test_bad_base64_in_auth(relay: RunningRelay) -> None:
    with starttls_client(relay, login=False) as client:
        client.ehlo()
        assert raw(client, b"AUTH PLAIN not*base64!\r\n") == (501, b"5.5.2 Cannot decode base64")
        assert raw(client, b"AUTH LOGIN %%%\r\n") == (501, b"5.5.2 Cannot decode base64")
        # A PLAIN blob without the two NUL separators.
        assert raw(client, b"AUTH PLAIN dXNlcnBhc3M=\r\n") == (
            501,
            replies.AUTH_BAD_PLAIN[4:].encode(),
        )
        # '*' cancels an exchange (RFC 4954 §4).
        assert raw(client, b"AUTH PLAIN\r\n")[0] == 334
        assert raw(client, b"*\r\n")[0] == 501
        still_alive(client)


def test_nul_bytes_in_commands(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:
        code, _ = raw(client, b"MAIL FROM:<alice\0@example.com>\r\n")
        assert 500 <= code < 600
        code, _ = raw(client, b"NO\0OP\r\n")
        assert 500 <= code < 600
        still_alive(client)


def test_ten_megabyte_command_line(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:
        assert raw(client, b"MAIL FROM:<" + b"a" * 10_000_000 + b">\r\n")[0] == 500
        still_alive(client)


def test_ten_megabyte_line_in_data_is_refused_and_not_queued(
    relay: RunningRelay, sink: Sink
) -> None:
    with starttls_client(relay) as client:
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        code, _ = client.data(b"Subject: long\r\n\r\n" + b"x" * 10_000_000 + b"\r\n")
        assert 500 <= code < 600
        still_alive(client)
    time.sleep(0.5)
    assert sink.attempts == 0


SMUGGLING = [
    b"\n.\n",  # bare LF dot bare LF
    b"\r\n.\n",  # CRLF dot bare LF
    b"\n.\r\n",  # bare LF dot CRLF
    b"\r.\r",  # bare CRs
]


@pytest.mark.parametrize("terminator", SMUGGLING, ids=repr)
def test_smuggling_sequences_never_split_a_message(
    relay: RunningRelay, sink: Sink, terminator: bytes
) -> None:
    smuggled = b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    body = b"Subject: one\r\n\r\nfirst part" + terminator + smuggled + b"Subject: two\r\n\r\nx"
    with starttls_client(relay) as client:
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        client.send(b"DATA\r\n")
        assert client.getreply()[0] == 354
        client.send(body + b"\r\n.\r\n")
        code, text = client.getreply()
        assert code == 250, text
        still_alive(client)
    [received] = sink.wait_for(1)
    time.sleep(0.3)
    assert len(sink.messages) == 1 and sink.attempts == 1
    assert received.rcpt_tos == ["bob@example.org"]
    # The smuggled command is part of the one message, and what goes upstream has no bare
    # CR or LF left for a vulnerable receiver to misread.
    assert b"ceo@bank.example" in received.content
    content = received.content
    assert content.count(b"\n") == content.count(b"\r\n")
    assert content.count(b"\r") == content.count(b"\r\n")


def test_bare_newline_reject_mode(start_relay: StartRelay, sink: Sink) -> None:
    relay = start_relay(
        smtp={"bare_newline": "reject", "hostname": "relay.test", "shutdown_timeout": 5.0}
    )
    with starttls_client(relay) as client:
        client.mail("alice@example.com")
        client.rcpt("bob@example.org")
        client.send(b"DATA\r\n")
        assert client.getreply()[0] == 354
        client.send(b"Subject: x\r\n\r\nline\n.\nMAIL FROM:<x@y>\r\n.\r\n")
        assert client.getreply() == (550, replies.BARE_NEWLINE[4:].encode())
        still_alive(client)
    time.sleep(0.5)
    assert sink.attempts == 0


def test_pipelined_commands(relay: RunningRelay, sink: Sink) -> None:
    """RFC 2920: the client may send MAIL, RCPT and DATA without waiting for each reply."""
    with starttls_client(relay) as client:
        client.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert [client.getreply()[0] for _ in range(3)] == [250, 250, 354]
        client.send(b"Subject: piped\r\n\r\nhello\r\n.\r\n")
        assert client.getreply()[0] == 250
    assert len(sink.wait_for(1)) == 1


def test_commands_out_of_order(relay: RunningRelay) -> None:
    with starttls_client(relay) as client:
        assert raw(client, b"RCPT TO:<bob@example.org>\r\n")[0] == 503
        assert raw(client, b"DATA\r\n")[0] == 503
        assert raw(client, b"MAIL FROM:<alice@example.com>\r\n")[0] == 250
        assert raw(client, b"MAIL FROM:<alice@example.com>\r\n")[0] == 503
        assert raw(client, b"AUTH PLAIN AGFAYg==\r\n")[0] == 503  # already authenticated
        still_alive(client)


def test_commands_pipelined_behind_starttls_are_discarded(relay: RunningRelay) -> None:
    """RFC 3207 §4.2 (the STARTTLS command injection): nothing sent in the clear after
    STARTTLS may be executed inside the TLS session."""
    import socket

    from mailfence.testing import client_tls_context

    sock = socket.create_connection(("127.0.0.1", relay.starttls_port), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nFOO injected\r\n")
    assert reader.readline().startswith(b"220 ")
    tls = client_tls_context().wrap_socket(sock, server_hostname="relay.test")
    tls.sendall(b"NOOP\r\n")
    reply = tls.recv(1024)
    assert reply.startswith(b"250 "), reply  # not "500 ... FOO not recognized"
    tls.close()
    reader.close()
