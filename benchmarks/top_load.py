"""`mailfence top` against 10,000 live connections: does watching slow the relay?

Starts `mailfence serve` as a subprocess, opens N idle SMTP sessions to it from another
process (sources spread over 127.90.0.0/16), then measures in two phases of the same run:

1. baseline: a probe session sends NOOP every 20 ms (its round trip is the loop's latency);
2. watched: the same, while a poller asks for a `top` snapshot every second, as `top` does;

and prints the probe's p50/p99/max in both, their ratio, the snapshot's own time, and one
`mailfence top --once` timed end to end.

    .venv/bin/python benchmarks/top_load.py [--connections 10000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from common import free_port

from mailfence.observe import control

PROBE_INTERVAL = 0.02


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def holder(port: int, count: int, ready: multiprocessing.Queue[int], stop: object) -> None:
    """Opens `count` sessions, reads each greeting, keeps them open until told to stop."""

    async def main() -> None:
        writers = []
        opened = 0
        for n in range(count):
            source = f"127.90.{n // 250}.{n % 250 + 1}"
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                line = await asyncio.wait_for(reader.readline(), 30)
            except OSError:
                continue
            if line.startswith(b"220"):
                opened += 1
                writers.append(writer)
            else:
                writer.close()
        ready.put(opened)
        await asyncio.to_thread(stop.wait)  # type: ignore[attr-defined]
        for writer in writers:
            writer.close()

    uvloop.run(main())


async def probe(port: int, seconds: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.91.0.1", 0))
    await reader.readline()
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.perf_counter()
        writer.write(b"NOOP\r\n")
        await writer.drain()
        await reader.readline()
        times.append(time.perf_counter() - sent)
        await asyncio.sleep(PROBE_INTERVAL)
    writer.write(b"QUIT\r\n")
    writer.close()
    return times


async def poll_snapshots(
    path: Path, seconds: float, times: list[float], builds: list[float]
) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        answer = await asyncio.to_thread(control.request, path, "snapshot", {"sessions": 50})
        times.append(time.perf_counter() - started)
        builds.append(answer["build_ms"] / 1000)
        await asyncio.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        port = free_port()
        config = folder / "mailfence.toml"
        config.write_text(
            f"""state_dir = "state"
[[listen]]
address = "127.0.0.1:{port}"
tls = "starttls"
[smtp]
max_connections = {args.connections + 100}
command_timeout = "10m"
[metrics]
listen = ""
[defense]
max_connections_per_ip = 100000
max_connections_per_prefix = 100000
connection_rate_per_ip = 100000
connection_rate_per_prefix = 100000
unknown_connections_per_second = 100000
known_good_reserved = 0.0
"""
        )
        log = (folder / "serve.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "mailfence", "serve", "--config", str(config)],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            ready: multiprocessing.Queue[int] = multiprocessing.Queue()
            stop = multiprocessing.Event()
            held = multiprocessing.Process(
                target=holder, args=(port, args.connections, ready, stop)
            )
            held.start()
            opened = ready.get(timeout=600)
            print(f"{opened} idle sessions open (asked for {args.connections})")
            path = folder / "state" / "control.sock"
            started = time.perf_counter()
            shot = control.request(path, "snapshot", {"sessions": 50})["snapshot"]
            print(
                f"snapshot: {shot['connections']['sessions']} sessions counted, "
                f"{len(shot['sessions'])} listed, "
                f"{(time.perf_counter() - started) * 1000:.1f} ms"
            )

            baseline = uvloop.run(probe(port, args.seconds))
            snapshot_times: list[float] = []
            build_times: list[float] = []

            async def watched() -> list[float]:
                poller = asyncio.create_task(
                    poll_snapshots(path, args.seconds, snapshot_times, build_times)
                )
                times = await probe(port, args.seconds)
                await poller
                return times

            with_top = uvloop.run(watched())
            started = time.perf_counter()
            once = subprocess.run(
                [sys.executable, "-m", "mailfence", "top", "--once", "--config", str(config)],
                capture_output=True,
                cwd=folder,
                env={**os.environ, "COLUMNS": "150", "LINES": "60"},
                check=False,
            )
            once_ms = (time.perf_counter() - started) * 1000
            stop.set()
            held.join(60)
        finally:
            server.terminate()
            server.wait(60)
            log.close()
    print(f"probe NOOP round trip, ms (p50 / p99 / max), {opened} idle sessions open:")
    for label, times in (("baseline", baseline), ("top polling", with_top)):
        print(f"  {label:12} {pct(times, 0.5):6.2f} {pct(times, 0.99):6.2f} {pct(times, 1):6.2f}")
    ratio = pct(with_top, 0.99) / max(pct(baseline, 0.99), 1e-9)
    print(f"  p99 ratio watched/baseline: {ratio:.2f}")
    print(
        f"snapshot request (sessions=50) over {len(snapshot_times)} polls: "
        f"median {statistics.median(snapshot_times) * 1000:.1f} ms, "
        f"max {max(snapshot_times) * 1000:.1f} ms; built on the relay's loop in "
        f"median {statistics.median(build_times) * 1000:.2f} ms, "
        f"max {max(build_times) * 1000:.2f} ms"
    )
    print(f"`mailfence top --once` end to end: {once_ms:.0f} ms, exit {once.returncode}")


if __name__ == "__main__":
    main()
