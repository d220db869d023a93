"""The process: startup failures, SIGTERM draining, SIGHUP reload, a forced second SIGINT."""

from __future__ import annotations

import re
import signal
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfence.observe import control
from mailfence.smtp import replies
from mailfence.testing import Sink, client_tls_context, free_port

from .conftest import ALICE, ALICE_PASSWORD, ServeProcess

pytestmark = pytest.mark.slow


def logged_in(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    try:
        client.starttls(context=client_tls_context())
        client.login(ALICE, ALICE_PASSWORD)
    except BaseException:
        client.close()  # no socket left for the collector to find (a ResourceWarning)
        raise
    return client


def start_and_queue(relay: ServeProcess, body: bytes) -> None:
    """Alice's account, the relay started, and one message from her answered 250."""
    added = relay.cli("users", "add", ALICE, "--password-stdin", stdin=ALICE_PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    relay.start()
    client = logged_in(relay.starttls_port)
    client.sendmail(ALICE, ["bob@example.org"], body)
    client.quit()


def with_upstream_port(text: str, port: int) -> str:
    return re.sub(r"smtp://127\.0\.0\.1:\d+", f"smtp://127.0.0.1:{port}", text)


@pytest.fixture
def running(sink: Sink, serve_process: Callable[..., ServeProcess]) -> ServeProcess:
    relay = serve_process(sink.port)
    assert (
        relay.cli("users", "add", ALICE, "--password-stdin", stdin=ALICE_PASSWORD + "\n").returncode
        == 0
    )
    return relay.start()


def test_sigterm_during_data_lets_the_message_finish(running: ServeProcess, sink: Sink) -> None:
    busy = logged_in(running.starttls_port)
    idle = logged_in(running.starttls_port)
    busy.mail(ALICE)
    busy.rcpt("bob@example.org")
    busy.send(b"DATA\r\n")
    assert busy.getreply()[0] == 354
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    running.signal(signal.SIGTERM)
    time.sleep(0.5)
    # The idle session is told why it is being closed.
    assert idle.getreply() == (421, replies.SHUTTING_DOWN[4:].encode())
    # New connections are no longer accepted.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.starttls_port), timeout=2).recv(1)
        raise OSError("accepted")
    busy.send(b"second half\r\n.\r\n")
    code, text = busy.getreply()
    busy.close()
    idle.close()
    assert code == 250 or 400 <= code < 500, text
    assert running.wait(15) == 0
    if code == 250:  # answered 250: it must be delivered (now or after the next start)
        if not sink.wait_for(1, timeout=3):
            running.start()
            assert sink.wait_for(1, timeout=15)
        assert b"second half" in sink.messages[0].content


def test_sigterm_exits_cleanly_when_idle(running: ServeProcess) -> None:
    running.signal(signal.SIGTERM)
    assert running.wait(15) == 0
    assert "mailfence stopped" in running.log.read_text()


def test_second_sigint_forces_exit(running: ServeProcess) -> None:
    busy = logged_in(running.starttls_port)
    busy.mail(ALICE)
    busy.rcpt("bob@example.org")
    busy.send(b"DATA\r\n")
    assert busy.getreply()[0] == 354  # a session in DATA would hold the drain for 5 s
    running.signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    running.signal(signal.SIGINT)
    assert running.wait(15) == 0
    assert time.monotonic() - started < 3
    busy.close()


def test_sighup_reloads_users(running: ServeProcess) -> None:
    added = running.cli("users", "add", "new@example.com", "--password-stdin", stdin="pw\n")
    assert added.returncode == 0
    running.signal(signal.SIGHUP)
    time.sleep(0.5)
    client = smtplib.SMTP("127.0.0.1", running.starttls_port, timeout=10)
    client.starttls(context=client_tls_context())
    assert client.login("new@example.com", "pw")[0] == 235
    client.quit()
    assert "reloaded" in running.log.read_text()


@pytest.mark.parametrize("in_a_child", [True, False], ids=["child", "in-process"])
def test_sighup_applies_a_new_upstream_and_names_what_waits_for_a_restart(
    serve_process: Callable[..., ServeProcess], in_a_child: bool
) -> None:
    """The operator points the relay at a new upstream and reloads: mail queued for the old,
    unreachable one goes to the new one, without a restart. A setting a reload cannot apply
    is named in the log, not silently ignored."""
    # The first upstream never answers. (Delivery runs in a child process by default.)
    relay = serve_process(free_port(), f"delivery_process = {str(in_a_child).lower()}")
    start_and_queue(relay, b"Subject: waiting\r\n\r\nfor a new upstream\r\n")
    with Sink() as sink:
        text = with_upstream_port(relay.config_path.read_text(), sink.port)
        # A new state_dir waits for a restart, for the new delivery too: it must go on
        # delivering from the running database, not from an empty one in the new place.
        text = text.replace('state_dir = "state"', 'state_dir = "state2"')
        relay.config_path.write_text(text + "\n[spool]\nmax_messages = 5000\n")
        relay.signal(signal.SIGHUP)
        [received] = sink.wait_for(1, timeout=30)
    assert b"for a new upstream" in received.content
    log = relay.log.read_text()
    assert "reload applied: relay.upstream" in log
    assert (
        "reload: state_dir, spool.max_messages changed; the running values stay until a restart"
        in log
    )
    assert "delivery restarted with the new relay settings" in log
    assert not (relay.directory / "state2").exists()
    # What the relay reports is the bound it enforces (the running one), not the file's.
    answer = control.request(relay.directory / "state" / "control.sock", "snapshot", {})
    assert answer["snapshot"]["spool"]["max"] == 100000


def test_sighup_applies_a_rotated_upstream_password(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """The operator rotates the upstream's password: a new one in the same file, and a
    reload. No setting changed, only the file's contents; the next delivery logs in with it."""
    password_file = tmp_path / "upstream.pw"
    password_file.write_text("old-secret\n")
    with Sink(credentials={"relay@example.net": "new-secret"}) as sink:
        relay = serve_process(
            sink.port,
            f'upstream_username = "relay@example.net"\nupstream_password_file = "{password_file}"',
        )
        text = relay.config_path.read_text().replace("smtp://", "smtp+starttls://")
        relay.config_path.write_text(text + "upstream_tls_verify = false\n")
        start_and_queue(relay, b"Subject: rotated\r\n\r\nnew password\r\n")
        for _ in range(100):  # bounded: 10 s, until the old password has been refused
            if ("relay@example.net", False) in sink.logins:
                break
            time.sleep(0.1)
        assert ("relay@example.net", False) in sink.logins and not sink.messages
        password_file.write_text("new-secret\n")
        relay.signal(signal.SIGHUP)
        [received] = sink.wait_for(1, timeout=30)
        relay.signal(signal.SIGTERM)  # before the sink stops: its connections end cleanly
        assert relay.wait(30) == 0
    assert b"new password" in received.content
    assert ("relay@example.net", True) in sink.logins
    assert "reload applied: relay.upstream_password_file (its contents)" in relay.log.read_text()


def test_a_stop_right_after_a_reload_starts_no_new_delivery(
    serve_process: Callable[..., ServeProcess],
) -> None:
    """SIGHUP with a new upstream, then SIGTERM while the old delivery is still finishing its
    message: the stop wins. No delivery starts inside the shutdown (where it would be cut
    short mid-send), the relay exits in its own time, and the message waits on disk for the
    next start, which delivers it."""
    with socket.socket() as mute:  # accepts connections and never greets
        mute.bind(("127.0.0.1", 0))
        mute.listen(50)
        relay = serve_process(mute.getsockname()[1])
        # The delivery waits up to a minute for the mute upstream's greeting: still busy
        # with it whenever the reload and the stop come.
        text = relay.config_path.read_text().replace('connect_timeout = "2s"', "")
        relay.config_path.write_text(text + 'connect_timeout = "60s"\n')
        start_and_queue(relay, b"Subject: kept\r\n\r\nfor later\r\n")
        mute.settimeout(20)
        waiting, _ = mute.accept()  # the delivery has connected and waits for a greeting
        with Sink() as sink:
            text = with_upstream_port(relay.config_path.read_text(), sink.port)
            relay.config_path.write_text(text)
            relay.signal(signal.SIGHUP)
            time.sleep(0.3)
            stopped = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert relay.wait(30) == 0
            # shutdown_timeout is 5 s; the old delivery's cleanup margin is 3 s.
            assert time.monotonic() - stopped < 12
            log = relay.log.read_text()
            assert "reload's delivery restart dropped: the relay is stopping" in log
            assert "delivery restarted with the new relay settings" not in log
            assert not sink.messages
            waiting.close()
            relay.start()  # with the new upstream: the message was kept
            [received] = sink.wait_for(1, timeout=30)
    assert b"for later" in received.content


def test_sighup_switches_the_defense_to_monitor_mode(running: ServeProcess) -> None:
    """docs/operations.md: to try stricter thresholds without risk, set monitor mode and
    reload. After the reload a honeypot name (which bans the source when enforced) bans
    nothing."""
    running.config_path.write_text(
        running.config_path.read_text() + '\n[defense]\nmode = "monitor"\n'
    )
    running.signal(signal.SIGHUP)
    for _ in range(100):  # bounded: 10 s
        if "reload applied: defense.mode" in running.log.read_text():
            break
        time.sleep(0.1)
    assert "reload applied: defense.mode" in running.log.read_text()
    client = smtplib.SMTP("127.0.0.1", running.starttls_port, timeout=20)
    client.starttls(context=client_tls_context())
    with pytest.raises(smtplib.SMTPAuthenticationError):
        client.login("admin", "admin")
    client.close()
    client = smtplib.SMTP("127.0.0.1", running.starttls_port, timeout=20)
    assert client.noop()[0] == 250  # greeted and served: not banned
    client.quit()
    assert "monitor: would ban 127.0.0.1" in running.log.read_text()


def test_port_in_use_is_a_startup_failure(serve_process: Callable[..., ServeProcess]) -> None:
    relay = serve_process(1)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", relay.starttls_port))
    blocker.listen()
    try:
        result = relay.cli("serve")
    finally:
        blocker.close()
    assert result.returncode == 3
    line = result.stderr.strip()
    assert str(relay.config_path) in line
    assert "listen[0].address" in line and "already in use" in line and "fix:" in line


def test_config_error_exits_2_naming_file_key_and_fix(
    serve_process: Callable[..., ServeProcess],
) -> None:
    relay = serve_process(1, extra="max_recipent = 5")
    result = relay.cli("serve")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0
    assert str(relay.config_path) in line
    assert "relay.max_recipent" in line and "relay.max_recipients" in line
    assert "Traceback" not in result.stderr


def test_unreadable_certificate_is_a_startup_failure(
    serve_process: Callable[..., ServeProcess],
) -> None:
    relay = serve_process(1)
    text = relay.config_path.read_text().replace(
        "[smtp]", '[tls]\ncert = "missing.pem"\nkey = "missing.key"\n[smtp]'
    )
    relay.config_path.write_text(text)
    result = relay.cli("serve")
    assert result.returncode == 3
    assert "tls.cert" in result.stderr and "missing.pem" in result.stderr


def test_an_upstream_password_file_that_is_not_text_is_a_startup_failure(
    serve_process: Callable[..., ServeProcess], tmp_path: Path
) -> None:
    """One line naming the file, the setting and the fix, not a traceback."""
    password_file = tmp_path / "upstream.pw"
    password_file.write_bytes(b"\xff\xfe\x00secret")  # UTF-16 by mistake, say
    relay = serve_process(
        1,
        f'upstream_username = "relay@example.net"\nupstream_password_file = "{password_file}"',
    )
    text = relay.config_path.read_text().replace("smtp://", "smtp+starttls://")
    relay.config_path.write_text(text)
    result = relay.cli("serve")
    assert result.returncode == 3
    assert "relay.upstream_password_file" in result.stderr
    assert "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
