"""sd_notify: the exact datagrams a real Unix socket receives, and silence outside systemd."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailfence.systemd import Notifier
from mailfence.testing import RunningRelay, Sink

from .conftest import ServeProcess


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        yield sock, str(path)


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_each_message_is_one_exact_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    assert received(sock) == b"READY=1"
    notifier.status("ok: 2 listeners, 0 queued")
    assert received(sock) == b"STATUS=ok: 2 listeners, 0 queued"
    notifier.watchdog()
    assert received(sock) == b"WATCHDOG=1"
    notifier.stopping()
    assert received(sock) == b"STOPPING=1"
    notifier.close()


def test_reloading_carries_the_monotonic_time(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", received(sock))
    assert match is not None
    assert before <= int(match.group(1)) <= after
    notifier.close()


def test_a_status_is_one_line(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    notifier.status("degraded:\nqueue above 80%")
    assert received(sock) == b"STATUS=degraded: queue above 80%"
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"mailfence-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready()
        assert received(sock) == b"READY=1"
        notifier.close()


def test_without_notify_socket_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.status("ok")
    notifier.reloading()
    notifier.watchdog()
    notifier.stopping()
    notifier.close()
    assert notifier._socket is None  # no socket was ever opened


def test_a_missing_socket_is_not_an_error(tmp_path: Path) -> None:
    # systemd went away, or the path is wrong: the relay carries on.
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    notifier.ready()
    notifier.stopping()
    notifier.close()


def test_a_full_socket_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    # Nobody reads: the receive queue fills and sendto would block; it must not.
    _, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    for _ in range(5000):
        notifier.status("x" * 200)
    assert time.monotonic() - started < 5
    notifier.close()


def test_not_a_unix_socket_address() -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()


def test_watchdog_interval_is_half_of_watchdog_usec(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env).watchdog_interval == 15.0
    mine = {**env, "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(mine).watchdog_interval == 15.0
    # Meant for another process (e.g. inherited by a child): not ours to answer.
    other = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environment(other).watchdog_interval is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": path}).watchdog_interval is None
    bad = {**env, "WATCHDOG_USEC": "soon"}
    assert Notifier.from_environment(bad).watchdog_interval is None


CHILD = """
import os, sys
sys.frozen = {frozen}
from mailfence.systemd import Notifier
env = {{"NOTIFY_SOCKET": "/run/none", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": sys.argv[1]}}
print(Notifier.from_environment(env).watchdog_interval)
"""


def watchdog_interval_in_child(frozen: bool, via_shell: bool) -> str:
    """A real child of this process, as PyInstaller's one-file bootloader runs the relay."""
    code = CHILD.format(frozen=frozen)
    if via_shell:  # the parent is then /bin/sh, another executable
        command = ["/bin/sh", "-c", f'"{sys.executable}" -c \'{code}\' "$$"; true']
    else:
        command = [sys.executable, "-c", code, str(os.getpid())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def test_a_one_file_binary_answers_the_watchdog_for_its_bootloader() -> None:
    # systemd's main PID is the bootloader (same executable), the relay its child.
    assert watchdog_interval_in_child(frozen=True, via_shell=False) == "15.0"
    # Not frozen, or a parent that is another program: the watchdog is someone else's.
    assert watchdog_interval_in_child(frozen=False, via_shell=False) == "None"
    assert watchdog_interval_in_child(frozen=True, via_shell=True) == "None"


@pytest.mark.slow
def test_serve_talks_to_systemd(
    serve_process: Callable[..., ServeProcess], sink: Sink, tmp_path: Path
) -> None:
    """`mailfence serve` under a fake systemd: a real datagram socket in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    relay = serve_process(sink.port)
    try:
        relay.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})

        def messages_until(wanted: str) -> list[str]:
            seen = []
            while True:
                message = listener.recv(4096).decode()
                seen.append(message)
                if wanted in message:
                    return seen

        seen = messages_until("READY=1")
        # READY=1 comes once the listeners are bound: a connection works at once.
        socket.create_connection(("127.0.0.1", relay.starttls_port), timeout=5).close()
        seen += messages_until("WATCHDOG=1")
        seen += messages_until("WATCHDOG=1")  # and again, every WatchdogSec / 2
        assert any(m.startswith("STATUS=ok: ") for m in seen), seen
        relay.signal(signal.SIGHUP)
        reload = messages_until("READY=1")
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in reload), reload
        relay.signal(signal.SIGTERM)
        assert "STOPPING=1" in messages_until("STOPPING=1")[-1]
        assert relay.wait(30) == 0
    finally:
        listener.close()


def test_the_watchdog_keeps_time_while_housekeeping_waits_on_a_slow_disk(
    receiver: tuple[socket.socket, str],
    start_relay: Callable[..., RunningRelay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop is alive (mail flows) while the database answers slowly: systemd must not
    kill the relay for it. The slow disk is real SQLite slowed by a progress handler."""
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    relay = start_relay()
    conn = relay.server.watch_conn
    slow = threading.Event()
    slow.set()

    def crawl() -> int:
        if slow.is_set():
            time.sleep(0.2)  # every few SQLite instructions: housekeeping's reads crawl
        return 0

    conn.set_progress_handler(crawl, 10)
    try:
        time.sleep(0.5)  # a housekeeping round is stuck in its first query by now
        sock.settimeout(0.3)
        pings = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                pings += received(sock) == b"WATCHDOG=1"
            except TimeoutError:
                break
        assert pings >= 5
    finally:
        # Back to full speed. (The handler stays: removing it from this thread while a query
        # runs on another deadlocks on SQLite's mutex and the GIL.)
        slow.clear()
