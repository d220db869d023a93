"""What one refusal costs the strangers' door process, against the least a server can do.

Two servers take the same load in turn, in the same run:

  door  the real strangers' door child (smtp/strangers_door.py, `_child_main`), on a fresh
        state directory, with `unknown_connections_per_second = 1`: nearly every connection
        is a stranger over the shared rate, refused with 421; the few it passes on are
        answered by this script in the relay's place;
  null  a uvloop server that answers every connection with a 421 and keeps no state (the
        flood benchmark's floor target): the kernel's and the event loop's share alone.

Load: --clients processes, each connecting from 5,000 source addresses in turn (127.64.0.0
and up, as the flood's distributed bots), reading the reply and closing, for --seconds per
server. Printed: connections refused per second, the server's CPU per 1,000 refusals (utime +
stime from /proc) and the door's ratio to the null server.

    .venv/bin/python benchmarks/door_cost.py [--seconds 8] [--clients 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import flood
from common import HOST, cpu_seconds

from mailfence.smtp import strangers_door
from mailfence.store.db import open_database
from mailfence.testing import relay_config

ADDRESSES = 5_000
READY_TIMEOUT = 20.0
PASSED_REPLY = b"421 4.7.0 answered by the benchmark in the relay's place\r\n"


def client(port: int, seconds: float, first: int, counts: multiprocessing.Queue[int]) -> None:
    """Connects, reads the one line, closes; again, for `seconds` (bounded by the clock)."""
    answered = 0
    end = time.monotonic() + seconds
    n = first
    while time.monotonic() < end:
        n = (n + 1) % ADDRESSES
        source = f"127.{64 + n // 2500}.{n // 250 % 10}.{1 + n % 250}"
        try:
            with socket.create_connection((HOST, port), 5, (source, 0)) as sock:
                if sock.recv(128):
                    answered += 1
        except OSError:
            pass
    counts.put(answered)


def answer_passed(channel: socket.socket, passed: list[int]) -> None:
    """The relay's end of the door's channel: every passed connection gets a 421 here."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 512, 1)
        except OSError:
            return
        if not message and not fds:
            return
        for fd in fds:
            passed[0] += 1
            with contextlib.suppress(OSError):
                os.write(fd, PASSED_REPLY)
            os.close(fd)


def start_door(directory: Path) -> tuple[BaseProcess, int, list[int]]:
    config = relay_config(directory)
    config = dataclasses.replace(
        config, defense=dataclasses.replace(config.defense, unknown_connections_per_second=1)
    )
    open_database(config.state_dir).close()
    listener = socket.create_server((HOST, 0), backlog=1024)
    port = int(listener.getsockname()[1])
    relay_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=strangers_door._child_main, args=(config, [listener], 20, child_end), daemon=True
    )
    process.start()
    child_end.close()
    listener.close()
    relay_end.settimeout(READY_TIMEOUT)
    if relay_end.recv(16) != b"R":
        raise RuntimeError("the door process did not report ready")
    relay_end.settimeout(None)
    passed = [0]
    threading.Thread(target=answer_passed, args=(relay_end, passed), daemon=True).start()
    return process, port, passed


def start_null() -> tuple[BaseProcess, int]:
    context = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue[int] = context.Queue()
    process = context.Process(target=flood.null_door_process, args=(ports,), daemon=True)
    process.start()
    return process, ports.get(timeout=READY_TIMEOUT)


def load(server: BaseProcess, port: int, args: argparse.Namespace) -> tuple[int, float]:
    """(connections answered, the server's CPU seconds) under --clients for --seconds."""
    time.sleep(1.0)  # the server's own start-up is not part of its refusals' cost
    context = multiprocessing.get_context("spawn")
    counts: multiprocessing.Queue[int] = context.Queue()
    clients = [
        context.Process(target=client, args=(port, args.seconds, k * 1_667, counts), daemon=True)
        for k in range(args.clients)
    ]
    before = cpu_seconds(server.pid or 0)
    for process in clients:
        process.start()
    answered = sum(counts.get(timeout=args.seconds + 30) for _ in clients)
    spent = cpu_seconds(server.pid or 0) - before
    for process in clients:
        process.join(10)
    return answered, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per server and round")
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--rounds", type=int, default=2, help="door and null, interleaved")
    args = parser.parse_args()
    per_thousand: dict[str, list[float]] = {"door": [], "null": []}
    with tempfile.TemporaryDirectory(prefix="mailfence-door-cost-") as directory:
        for round_number in range(args.rounds):
            for name in ("door", "null"):
                passed = [0]
                if name == "door":
                    server, port, passed = start_door(Path(directory) / str(round_number))
                else:
                    server, port = start_null()
                try:
                    answered, spent = load(server, port, args)
                finally:
                    server.kill()
                    server.join(10)
                cost = spent / max(1, answered) * 1e6
                per_thousand[name].append(cost)
                print(
                    f"{name:4}  {answered:7,} answered in {args.seconds:.0f} s"
                    f" ({answered / args.seconds:,.0f}/s; {passed[0]} passed to the relay):"
                    f" {spent:.2f} s of CPU = {cost:.0f} ms per 1,000"
                )
    door = sum(per_thousand["door"]) / len(per_thousand["door"])
    null = sum(per_thousand["null"]) / len(per_thousand["null"])
    print(f"door {door:.0f} ms per 1,000 refusals, null {null:.0f} ms: {door / null:.2f}x")


if __name__ == "__main__":
    main()
