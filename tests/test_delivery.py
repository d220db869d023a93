"""Delivery: retries on 4xx, bounces (RFC 3464) on 5xx and expiry, MX routing, reuse."""

from __future__ import annotations

import email
import email.message
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.smtp import Envelope

from mailfence import spool
from mailfence.testing import DNSServer, RunningRelay, Sink, free_port, relay_config

from .conftest import ALICE, StartRelay, starttls_client

BODY = b"From: alice@example.com\r\nSubject: invoice 42\r\n\r\nPay up.\r\n"


def queued(relay: RunningRelay) -> list[spool.Message]:
    conn = sqlite3.connect(relay.config.database_path)
    try:
        return spool.list_messages(conn)
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def send(relay: RunningRelay, rcpts: list[str], sender: str = "billing@example.com") -> None:
    with starttls_client(relay) as client:
        client.sendmail(sender, rcpts, BODY)


def parse_dsn(content: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    report = email.message_from_bytes(content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = [part for part in report.get_payload() if isinstance(part, email.message.Message)]
    return report, parts


def status_fields(part: email.message.Message) -> list[email.message.Message]:
    """The header blocks of a message/delivery-status part (per-message, per-recipient...)."""
    return [block for block in part.get_payload() if isinstance(block, email.message.Message)]


def test_temporary_failure_is_retried_until_delivered(relay: RunningRelay, sink: Sink) -> None:
    answers = iter(["451 4.3.0 try again later", "421 4.3.2 busy"])
    sink.reply = lambda envelope: next(answers, "250 2.0.0 Ok")
    send(relay, ["bob@example.org"])
    [received] = sink.wait_for(1, timeout=15)
    assert sink.attempts == 3
    assert received.rcpt_tos == ["bob@example.org"]
    assert wait_until(lambda: queued(relay) == [])


def test_deferred_message_shows_its_error_in_the_queue(relay: RunningRelay, sink: Sink) -> None:
    sink.reply = lambda envelope: "451 4.3.0 disk full at upstream"
    send(relay, ["bob@example.org"])
    assert wait_until(lambda: bool(queued(relay)) and queued(relay)[0].attempts >= 1)
    [message] = queued(relay)
    assert "disk full at upstream" in message.last_error
    assert message.recipients[0].state == "pending"


def test_permanent_failure_bounces_a_well_formed_dsn(relay: RunningRelay, sink: Sink) -> None:
    sink.rcpt_reply = lambda address: "550 5.1.1 User unknown" if "nobody" in address else None
    send(relay, ["nobody@example.org", "bob@example.org"])
    messages = sink.wait_for(2)
    assert len(messages) == 2
    [original] = [m for m in messages if m.mail_from != "<>"]
    [bounce] = [m for m in messages if m.mail_from == "<>"]
    assert original.rcpt_tos == ["bob@example.org"]  # the good recipient still got it
    assert bounce.rcpt_tos == ["billing@example.com"]
    report, parts = parse_dsn(bounce.content)
    assert report["To"] == "<billing@example.com>"
    assert report["Auto-Submitted"] == "auto-replied"
    human, status, headers = parts
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    fields = status_fields(status)
    per_message, per_recipient = fields[0], fields[1:]
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert len(per_recipient) == 1
    assert per_recipient[0]["Final-Recipient"] == "rfc822; nobody@example.org"
    assert per_recipient[0]["Action"] == "failed"
    assert per_recipient[0]["Status"] == "5.1.1"
    assert "User unknown" in per_recipient[0]["Diagnostic-Code"]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: invoice 42" in bounce.content
    assert wait_until(lambda: queued(relay) == [])


def test_a_bounce_never_bounces(relay: RunningRelay, sink: Sink) -> None:
    tried: list[str] = []

    def refuse(address: str) -> str:
        tried.append(address)
        return "550 5.1.1 No such user"

    sink.rcpt_reply = refuse
    send(relay, ["nobody@example.org"])
    # The original fails, its bounce to the sender fails too, and that is the end of it.
    assert wait_until(lambda: "billing@example.com" in tried and queued(relay) == [])
    time.sleep(1.5)
    assert queued(relay) == []
    assert tried == ["nobody@example.org", "billing@example.com"]


def test_expired_message_bounces(start_relay: StartRelay, sink: Sink) -> None:
    def answer(envelope: Envelope) -> str:
        return "250 2.0.0 Ok" if envelope.mail_from == "<>" else "451 4.4.1 still down"

    sink.reply = answer
    relay = start_relay(
        relay={
            "max_queue_age": 1.5,
            "retry_schedule": (0.5,),
            "upstream": f"smtp://127.0.0.1:{sink.port}",
        }
    )
    send(relay, ["bob@example.org"])
    [bounce] = sink.wait_for(1, timeout=15)
    assert bounce.mail_from == "<>"
    _, parts = parse_dsn(bounce.content)
    assert b"expired" in parts[0].as_bytes()
    assert status_fields(parts[1])[1]["Status"] == "4.4.1"
    assert wait_until(lambda: queued(relay) == [])


def test_one_upstream_connection_carries_many_messages(relay: RunningRelay, sink: Sink) -> None:
    with starttls_client(relay) as client:
        for n in range(20):
            client.sendmail("billing@example.com", [f"r{n}@example.org"], BODY)
    assert len(sink.wait_for(20)) == 20
    assert sink.connections <= 4  # two workers, each keeps its connection between bundles


def test_mx_delivery_with_dns_and_implicit_mx(tmp_path: Path, sink: Sink) -> None:
    records = {
        ("example.org", "MX"): ["10 mx1.example.org.", "20 mx2.example.org."],
        ("mx1.example.org", "A"): ["127.0.0.1"],
        ("mx2.example.org", "A"): ["127.0.0.1"],
        ("nomx.example", "A"): ["127.0.0.1"],  # no MX: the A record is the implicit MX
        ("example.com", "A"): ["127.0.0.1"],  # where bounces to billing@example.com go
        ("nullmx.example", "MX"): ["0 ."],  # RFC 7505: accepts no mail
    }
    with DNSServer(records) as dns:
        config = relay_config(
            tmp_path / "state",
            None,
            relay={
                "mx_port": sink.port,
                "dns_servers": (f"127.0.0.1:{dns.port}",),
                "mx_allow_private": True,  # the test's MX hosts are on loopback
            },
        )
        from mailfence.testing import add_user

        from .conftest import ALICE_PASSWORD

        add_user(config, ALICE, ALICE_PASSWORD, ["*@example.com"])
        with RunningRelay(config) as relay:
            send(
                relay,
                [
                    "bob@example.org",
                    "carol@nomx.example",
                    "x@does-not-exist.example",
                    "y@nullmx.example",
                ],
            )
            messages = sink.wait_for(3)
            assert wait_until(lambda: queued(relay) == [])
    delivered = sorted(r for m in messages if m.mail_from != "<>" for r in m.rcpt_tos)
    assert delivered == ["bob@example.org", "carol@nomx.example"]
    [bounce] = [m for m in messages if m.mail_from == "<>"]
    assert b"x@does-not-exist.example" in bounce.content
    assert b"y@nullmx.example" in bounce.content


def test_mx_delivery_refuses_private_addresses_by_default(tmp_path: Path, sink: Sink) -> None:
    records = {
        ("example.org", "MX"): ["10 mx.example.org."],
        ("mx.example.org", "A"): ["127.0.0.1"],
        ("example.com", "A"): ["127.0.0.1"],
    }
    with DNSServer(records) as dns:
        config = relay_config(
            tmp_path / "state",
            None,
            relay={"mx_port": sink.port, "dns_servers": (f"127.0.0.1:{dns.port}",)},
        )
        from mailfence.testing import add_user

        from .conftest import ALICE_PASSWORD

        add_user(config, ALICE, ALICE_PASSWORD, ["*@example.com"])
        with RunningRelay(config) as relay:
            send(relay, ["bob@example.org", "x@[127.0.0.1]"])
            # Neither the MX on loopback nor the literal is used; the bounce has nowhere to
            # go either (example.com is on loopback too) and, being a bounce, is dropped.
            assert wait_until(lambda: queued(relay) == [])
            message_count = len(sink.messages)
    assert message_count == 0


def test_null_sender_is_relayed(relay: RunningRelay, sink: Sink) -> None:
    with starttls_client(relay) as client:
        client.sendmail("<>", ["bob@example.org"], BODY)
    [received] = sink.wait_for(1)
    assert received.mail_from == "<>"
    assert received.rcpt_tos == ["bob@example.org"]


def test_a_delivery_child_that_could_not_start_is_started_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload replaces the delivery child; if the new one cannot be started (here: no file
    descriptor left for its socket, as under EMFILE), the relay must not be left with no
    delivery at all: the next check starts one."""
    import asyncio
    import resource

    from mailfence.delivery.process import DeliveryProcess
    from mailfence.store import open_database

    from .test_door import limit_leaving

    # No upstream to reach, and no other thread here that could take a descriptor while
    # the limit is down.
    config = relay_config(tmp_path / "state", free_port())
    open_database(config.state_dir).close()

    async def main() -> None:
        children = DeliveryProcess(config)
        children.start()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            # One left: the old child is waited for (a selector takes one descriptor at a
            # time) and the new one's socket pair and pipes cannot all be made.
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(1), hard))
            with pytest.raises(OSError):
                await children.replace(config, 5.0, lambda: True)
            children.check()  # still no descriptors: logged, not raised into housekeeping
            assert children._process is None
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        children.check()
        process = children._process
        try:
            assert process is not None and process.is_alive()
        finally:
            await asyncio.to_thread(children.stop, 5.0)
            children.close()
        assert not process.is_alive()
        children.check()  # stopped for good: nothing starts again
        assert children._process is None

    with caplog.at_level("ERROR", logger="mailfence.delivery"):
        asyncio.run(main())
    assert "delivery process is not running; starting it" in caplog.text
    assert "delivery process could not be started" in caplog.text
