"""The door: accepting by hand, a bounded batch per turn, and pausing when out of descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Iterator

import pytest

from mailfence.smtp.door import ACCEPT_BATCH, ACCEPT_PAUSE, Door, open_listening_sockets


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that the kernel completes in the backlog, before any accept."""
    made: list[socket.socket] = []
    try:
        for _ in range(count):
            made.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        yield made
    finally:
        for sock in made:
            sock.close()


def limit_leaving(free: int) -> int:
    """The RLIMIT_NOFILE under which exactly `free` descriptor numbers are still unused."""
    in_use = {int(name) for name in os.listdir("/proc/self/fd")}
    number = 0
    while free:
        if number not in in_use:
            free -= 1
        number += 1
    return number


def test_a_turn_accepts_at_most_one_batch() -> None:
    [(listening, _)] = open_listening_sockets("127.0.0.1", 0, backlog=128)
    accepted: list[socket.socket] = []
    door = Door(listening, lambda connection, peer: accepted.append(connection))
    waiting = 2 * ACCEPT_BATCH + 3
    try:
        with clients(door.port, waiting):
            assert door.accept_batch() == ACCEPT_BATCH
            assert len(accepted) == ACCEPT_BATCH
            assert door.accept_batch() == ACCEPT_BATCH
            assert door.accept_batch() == 3
            assert door.accept_batch() == 0  # nothing left: no blocking, no error
            assert all(connection.getpeername()[0] == "127.0.0.1" for connection in accepted)
    finally:
        for connection in accepted:
            connection.close()
        door.close()


def test_out_of_descriptors_pauses_the_door_and_it_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE must not make the loop spin on a readable socket it cannot accept from: the door
    stops watching for ACCEPT_PAUSE, says so in the log, and takes the rest afterwards."""
    [(listening, _)] = open_listening_sockets("127.0.0.1", 0, backlog=128)
    accepted: list[socket.socket] = []
    door = Door(listening, lambda connection, peer: accepted.append(connection))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    total = 40

    async def main() -> None:
        door.open()
        # A limit that leaves three free descriptors: accept runs into EMFILE at the fourth.
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(3), hard))
        try:
            await asyncio.sleep(0.05)
            assert door.paused
            assert 0 < len(accepted) < total
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for _ in range(50):  # bounded: 5 s at most
            if len(accepted) == total:
                break
            await asyncio.sleep(ACCEPT_PAUSE)
        assert len(accepted) == total
        assert not door.paused

    try:
        with caplog.at_level(logging.WARNING, "mailfence.smtp"), clients(door.port, total):
            asyncio.run(main())
        messages = [record.getMessage() for record in caplog.records]
        # One warning for the whole episode however many pauses it took, and one when over.
        assert sum("cannot accept" in message for message in messages) == 1
        assert sum("accepting again" in message for message in messages) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for connection in accepted:
            connection.close()
        door.close()


def test_an_address_family_the_kernel_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost` resolves to ::1 as well on a kernel booted with IPv6 disabled, where an
    AF_INET6 socket cannot be made. Such a kernel cannot be had here, so the resolver is
    made to answer with a family no kernel has (255): that address is skipped as
    loop.create_server skipped it, and only a name with no usable address at all fails."""
    real = socket.getaddrinfo
    missing = (255, socket.SOCK_STREAM, 6, "", ("::1", 0))

    def resolver(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        answers: list[object] = [missing]
        if host == "localhost":
            answers += real("127.0.0.1", port, type=socket.SOCK_STREAM)
        return answers

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    [(listening, _)] = open_listening_sockets("localhost", 0, backlog=8)
    try:
        assert listening.family == socket.AF_INET
    finally:
        listening.close()
    with pytest.raises(OSError):
        open_listening_sockets("ipv6-only.invalid", 0, backlog=8)
