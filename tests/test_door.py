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
    [listening] = open_listening_sockets("127.0.0.1", 0, backlog=128)
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
    [listening] = open_listening_sockets("127.0.0.1", 0, backlog=128)
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
        assert any("pausing" in record.getMessage() for record in caplog.records)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for connection in accepted:
            connection.close()
        door.close()
