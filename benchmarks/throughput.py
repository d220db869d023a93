"""Submission throughput: mailfence against the same load sent straight to the sink.

    .venv/bin/python benchmarks/throughput.py [--clients 50] [--seconds 20]
        [--messages-per-connection 10] [--size 1024]

N concurrent clients (spread over --processes client processes) each connect, log in over
STARTTLS and send --messages-per-connection messages of --size bytes per connection,
reconnecting, through a `mailfence serve` subprocess to a sink, for a fixed time; then the
benchmark waits until the queue has drained (every accepted message counted at the sink and the
spool empty). In the same run, before that, the same client load goes straight to the sink:
that is the ceiling, and mailfence's rate divided by it is the figure.

The sink is Postfix's `smtp-sink` (a C program; `apt-get install postfix`) when installed,
otherwise benchmarks/sink.py. Neither offers STARTTLS, so the ceiling run sends AUTH PLAIN in
the clear (accepting any 2xx reply) and no TLS: the ceiling is the client's and sink's own
limit on this machine, not a like-for-like protocol run.

Latencies:
  - "MAIL->250", per message: from sending MAIL FROM to the 250 after the final dot;
  - "connect->250", per connection: from the start of connect (TCP, greeting, EHLO, STARTTLS,
    EHLO, AUTH) to the 250 of its first message;
  - "NOOP round trip": one extra idle session sends NOOP every 20 ms during the relay run, a
    cheap stand-in for the relay's event-loop lag.
One login before the relay run fills mailfence's credential cache, so the measured logins are
the steady state's cache hits rather than 50 argon2 runs at once.

"accepted msgs/s" is 250s over the load's duration; "delivered msgs/s" is messages counted at
the sink over the time from the load's start until the queue drained. Durability itself is
mailfence's (a 250 only after the group commit's fsync); this checks that nothing accepted was
lost: the sink's count equals the 250s and `mailfence queue list` is empty at the end.

The goal (issue): >= 800 msgs/s accepted and delivered, every one durable, and p99 to 250
under 100 ms at 50 clients, on this 2-core machine.

Everything binds to and connects to 127.0.0.1 only; every loop is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import aiosmtplib
import uvloop
from common import (
    client_tls_context,
    cpu_seconds,
    free_port,
    percentile,
    stopping,
    verdict,
    wait_for_port,
)

HOST = "127.0.0.1"
USER = "bench@example.com"
PASSWORD = "bench password 1"
RECIPIENT = "sink@example.net"
CLIENT_HOSTNAME = "client.bench"

SMTP_SINK = "/usr/sbin/smtp-sink"
READY_TIMEOUT = 60.0  # client processes importing, the relay starting
CLIENT_TIMEOUT = 30.0  # one SMTP command
ERROR_BACKOFF = 0.05  # after a failed connection, before the next one
MAX_CONNECTIONS_PER_CLIENT = 1_000_000  # a count bound on every client's loop
PROBE_INTERVAL = 0.02
POLL_INTERVAL = 0.02


# --- small helpers --------------------------------------------------------------------------


def build_message(size: int) -> bytes:
    """A message of exactly `size` bytes (headers included), in CRLF lines of at most 79."""
    header = (
        f"From: <{USER}>\r\nTo: <{RECIPIENT}>\r\nSubject: mailfence throughput benchmark\r\n"
        "Message-ID: <bench@client.bench>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode("ascii")
    full, rest = divmod(size - len(header), 78)
    lines = [b"x" * 76 + b"\r\n"] * full
    if rest >= 2:
        lines.append(b"x" * (rest - 2) + b"\r\n")
    elif rest == 1:  # one byte too few for a line of its own: lengthen the first one
        lines[0] = b"x" * 77 + b"\r\n"
    message = header + b"".join(lines)
    assert len(message) == size
    return message


# --- the client side: runs in --processes child processes -----------------------------------


@dataclass
class Stats:
    accepted: int = 0
    connections: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    message_latency: list[float] = field(default_factory=list)
    connect_latency: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    def error(self, stage: str, error: BaseException) -> None:
        code = getattr(error, "code", "")
        key = f"{stage}: {type(error).__name__}{f' {code}' if code else ''}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "connections": self.connections,
            "errors": self.errors,
            "message_latency": self.message_latency,
            "connect_latency": self.connect_latency,
            "started": self.started,
            "finished": self.finished,
        }


async def log_in(smtp: aiosmtplib.SMTP, relay: bool) -> None:
    if smtp.is_ehlo_or_helo_needed:  # after STARTTLS: the second EHLO (RFC 3207 §4.2)
        await smtp.ehlo()
    if relay:
        await smtp.auth_plain(USER, PASSWORD)  # one round trip; raises unless 235
        return
    # smtp-sink answers AUTH with 250, which aiosmtplib's login() refuses: same round trip,
    # any 2xx accepted.
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    response = await smtp.execute_command(b"AUTH", b"PLAIN", blob)
    if not 200 <= response.code < 300:
        raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)


async def client(
    port: int,
    relay: bool,
    end: float,
    per_connection: int,
    message: bytes,
    tls: ssl.SSLContext,
    stats: Stats,
) -> None:
    for _ in range(MAX_CONNECTIONS_PER_CLIENT):
        if time.monotonic() >= end:
            return
        smtp = aiosmtplib.SMTP(
            hostname=HOST,
            port=port,
            local_hostname=CLIENT_HOSTNAME,
            start_tls=relay,
            validate_certs=False,  # the relay's certificate is self-signed
            tls_context=tls,
            timeout=CLIENT_TIMEOUT,
        )
        stage = "connect"
        try:
            started = time.perf_counter()
            await smtp.connect()
            stage = "auth"
            await log_in(smtp, relay)
            stats.connections += 1
            for index in range(per_connection):
                if time.monotonic() >= end:
                    break
                stage = "send"
                sent = time.perf_counter()
                await smtp.sendmail(USER, [RECIPIENT], message)
                answered = time.perf_counter()
                stats.accepted += 1
                stats.message_latency.append(answered - sent)
                if index == 0:
                    stats.connect_latency.append(answered - started)
            stage = "quit"
            await smtp.quit()
        except (aiosmtplib.SMTPException, OSError) as error:
            stats.error(stage, error)
            smtp.close()
            await asyncio.sleep(ERROR_BACKOFF)


def client_process(
    port: int,
    relay: bool,
    clients: int,
    seconds: float,
    per_connection: int,
    size: int,
    nice: int,
    ready: multiprocessing.Queue[str],
    go: Event,
    results: multiprocessing.Queue[dict[str, Any]],
) -> None:
    if nice:
        os.nice(nice)
    message = build_message(size)
    tls = client_tls_context()
    ready.put("ready")
    if not go.wait(READY_TIMEOUT):
        results.put(Stats(errors={"never started": 1}).as_dict())
        return

    async def main() -> Stats:
        stats = Stats(started=time.monotonic())
        end = stats.started + seconds
        await asyncio.gather(
            *(client(port, relay, end, per_connection, message, tls, stats) for _ in range(clients))
        )
        stats.finished = time.monotonic()
        return stats

    results.put(uvloop.run(main()).as_dict())


# --- the load, as seen from the parent ------------------------------------------------------


@dataclass
class LoadResult:
    name: str
    accepted: int
    connections: int
    errors: dict[str, int]
    message_latency: list[float]
    connect_latency: list[float]
    started: float  # time.monotonic(), shared by all processes on Linux
    finished: float
    probe: list[float]  # NOOP round trips on an idle session, while the load ran
    cpu: dict[str, float]  # process name -> CPU seconds used during the load

    @property
    def elapsed(self) -> float:
        return max(1e-9, self.finished - self.started)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed


async def noop_probe(port: int, seconds: float) -> list[float]:
    """Round trips of NOOP on one idle session: how quickly the server's loop answers."""
    smtp = aiosmtplib.SMTP(
        hostname=HOST, port=port, local_hostname=CLIENT_HOSTNAME, start_tls=False, timeout=10
    )
    samples: list[float] = []
    try:
        await smtp.connect()
        end = time.monotonic() + seconds
        for _ in range(int(seconds / PROBE_INTERVAL) + 1):
            if time.monotonic() >= end:
                break
            started = time.perf_counter()
            await smtp.noop()
            samples.append(time.perf_counter() - started)
            await asyncio.sleep(PROBE_INTERVAL)
        await smtp.quit()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
    return samples


async def warm_up(port: int) -> None:
    """One login before the load: the relay caches a verified password (as it would have long
    before a steady stream), so the measured logins are cache hits, not argon2 runs."""
    smtp = aiosmtplib.SMTP(
        hostname=HOST,
        port=port,
        local_hostname=CLIENT_HOSTNAME,
        start_tls=True,
        tls_context=client_tls_context(),
        timeout=CLIENT_TIMEOUT,
    )
    await smtp.connect()
    await log_in(smtp, True)
    await smtp.quit()


def run_load(
    name: str, port: int, relay: bool, args: argparse.Namespace, watch: dict[str, int]
) -> LoadResult:
    context = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[str] = context.Queue()
    results: multiprocessing.Queue[dict[str, Any]] = context.Queue()
    go = context.Event()
    per_process = [
        args.clients // args.processes + (1 if i < args.clients % args.processes else 0)
        for i in range(args.processes)
    ]
    processes = [
        context.Process(
            target=client_process,
            args=(
                port,
                relay,
                count,
                args.seconds,
                args.messages_per_connection,
                args.size,
                args.client_nice,
                ready,
                go,
                results,
            ),
            daemon=True,
        )
        for count in per_process
        if count > 0
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=READY_TIMEOUT)
    watch = {**watch, **{f"client{i}": p.pid or 0 for i, p in enumerate(processes)}}
    cpu_before = {key: cpu_seconds(pid) for key, pid in watch.items()}
    go.set()
    probe = asyncio.run(noop_probe(port, args.seconds)) if args.probe and relay else []
    collected = [results.get(timeout=args.seconds + 2 * CLIENT_TIMEOUT + 30) for _ in processes]
    cpu = {key: cpu_seconds(pid) - cpu_before[key] for key, pid in watch.items()}
    for process in processes:
        process.join(30)
    errors: dict[str, int] = {}
    for part in collected:
        for key, value in part["errors"].items():
            errors[key] = errors.get(key, 0) + value
    started = [part["started"] for part in collected if part["started"]]
    finished = [part["finished"] for part in collected if part["finished"]]
    return LoadResult(
        name=name,
        accepted=sum(part["accepted"] for part in collected),
        connections=sum(part["connections"] for part in collected),
        errors=errors,
        message_latency=[x for part in collected for x in part["message_latency"]],
        connect_latency=[x for part in collected for x in part["connect_latency"]],
        started=min(started, default=0.0),
        finished=max(finished, default=0.0),
        probe=probe,
        cpu=cpu,
    )


# --- the sink and the relay -----------------------------------------------------------------


class Sink:
    """smtp-sink (or benchmarks/sink.py) on a loopback port, counting what it accepts."""

    def __init__(self, directory: Path, name: str, prefer_python: bool) -> None:
        self.port = free_port()
        self.output = directory / f"{name}.out"
        self.native = Path(SMTP_SINK).exists() and not prefer_python
        if self.native:
            # -c: counters on stdout; -m: connections served at once; -u: required as root.
            command = [SMTP_SINK, "-c", "-m", "1024"]
            command += ["-u", "nobody"] if os.geteuid() == 0 else []
            command += [f"{HOST}:{self.port}", "1024"]
        else:
            here = Path(__file__).resolve().parent
            command = [sys.executable, str(here / "sink.py"), str(self.port)]
        self.description = "smtp-sink (Postfix)" if self.native else "benchmarks/sink.py (aiosmtpd)"
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, time.monotonic() + READY_TIMEOUT, self.process)

    def count(self) -> int:
        """Messages accepted so far: the last "mesg=N" record of the -c counters."""
        with self.output.open("rb") as f:
            f.seek(max(0, self.output.stat().st_size - 200))
            tail = f.read().decode("ascii", "replace")
        for record in reversed(tail.replace("\n", "\r").split("\r")):
            for item in record.split():
                if item.startswith("mesg=") and item[5:].isdigit():
                    return int(item[5:])
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


MAILFENCE = Path(sys.executable).with_name("mailfence")


class Relay:
    """`mailfence serve` as a subprocess, configured by a TOML file in a temporary folder."""

    def __init__(self, directory: Path, sink_port: int, args: argparse.Namespace) -> None:
        self.port = free_port()
        self.config = directory / "mailfence.toml"
        self.state_dir = directory / "state"
        self.log = directory / "mailfence.log"
        self.stop_seconds = 0.0
        relay_extra = ""
        if args.delivery_workers:
            relay_extra += f"delivery_workers = {args.delivery_workers}\n"
        self.config.write_text(
            f'state_dir = "{self.state_dir}"\n\n'
            f'[[listen]]\naddress = "{HOST}:{self.port}"\ntls = "starttls"\n\n'
            '[smtp]\nhostname = "relay.bench"\n\n'
            f'[relay]\nupstream = "smtp://{HOST}:{sink_port}"\n{relay_extra}',
            encoding="utf-8",
        )
        subprocess.run(
            [
                str(MAILFENCE),
                "users",
                "add",
                USER,
                "--password-stdin",
                "--config",
                str(self.config),
            ],
            input=f"{PASSWORD}\n".encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(MAILFENCE), "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        wait_for_port(self.port, deadline, self.process)
        while b"mailfence ready" not in self.log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def queued(self) -> int:
        """Messages still in the spool, read straight from the database (read-only)."""
        with contextlib.closing(sqlite3.connect(self.state_dir / "mailfence.sqlite3")) as conn:
            return int(conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    def queue_list(self) -> list[Any]:
        """What `mailfence queue list --json` says (once, at the end: it costs a process)."""
        done = subprocess.run(
            [str(MAILFENCE), "queue", "list", "--json", "--config", str(self.config)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        listed: list[Any] = json.loads(done.stdout)
        return listed

    def log_problems(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in self.log.read_text("utf-8", "replace").splitlines():
            for level in ("WARNING", "ERROR", "CRITICAL"):
                if f" {level} " in line:
                    counts[level] = counts.get(level, 0) + 1
        return counts

    def stop(self) -> int | None:
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.stop_seconds = time.monotonic() - started
        return self.process.returncode


@dataclass
class Drain:
    delivered: int  # counted at the sink
    delivered_during_load: int
    drained_at: float  # time.monotonic() when the sink had them all and the spool was empty
    drained: bool
    left_in_spool: int


def wait_for_drain(relay: Relay, sink: Sink, accepted: int, timeout: float) -> Drain:
    delivered_during_load = sink.count()
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        now = time.monotonic()
        delivered = sink.count()
        if delivered >= accepted and relay.queued() == 0:
            return Drain(delivered, delivered_during_load, now, True, 0)
        if now >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    return Drain(sink.count(), delivered_during_load, time.monotonic(), False, relay.queued())


# --- the report -----------------------------------------------------------------------------


def ms(values: list[float]) -> str:
    if not values:
        return "      -        -        -"
    return (
        f"{percentile(values, 0.5) * 1000:7.1f}  {percentile(values, 0.99) * 1000:7.1f}"
        f"  {max(values) * 1000:7.1f}"
    )


def report(
    args: argparse.Namespace,
    ceiling: LoadResult | None,
    relayed: LoadResult,
    drain: Drain,
    sink: str,
    queue_list: list[Any],
    log_problems: dict[str, int],
    exit_code: int | None,
    stop_seconds: float,
) -> None:
    print()
    print(
        f"load: {args.clients} clients in {args.processes} processes, {args.seconds:g} s,"
        f" {args.messages_per_connection} messages of {args.size} B per connection;"
        f" sink: {sink}; {os.cpu_count()} CPUs"
    )
    print()
    header = f"{'run':<34}{'msgs/s':>9}{'msgs':>8}{'conns':>7}{'errors':>8}"
    print(header)
    print("-" * len(header))
    runs = [relayed] if ceiling is None else [ceiling, relayed]
    for run in runs:
        print(
            f"{run.name:<34}{run.rate:9.0f}{run.accepted:8d}{run.connections:7d}"
            f"{sum(run.errors.values()):8d}"
        )
    delivery_time = max(1e-9, drain.drained_at - relayed.started)
    delivered_rate = drain.delivered / delivery_time
    print(
        f"{'mailfence delivered (to drained)':<34}{delivered_rate:9.0f}{drain.delivered:8d}"
        f"{'':>7}{'':>8}"
    )
    print(
        f"  delivered during the load: {drain.delivered_during_load}"
        f" ({drain.delivered_during_load / relayed.elapsed:.0f}/s);"
        f" drained {drain.drained_at - relayed.finished:.2f} s after the load ended"
        + ("" if drain.drained else f"; NOT drained: {drain.left_in_spool} left in the spool")
    )
    print()
    header = f"{'latency (ms)':<52}{'p50':>7}  {'p99':>7}  {'max':>7}"
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run.name + ', MAIL->250':<52}{ms(run.message_latency)}")
        print(f"{run.name + ', connect->250 (1st msg)':<52}{ms(run.connect_latency)}")
    if relayed.probe:
        print(f"{'mailfence NOOP round trip (idle session)':<52}{ms(relayed.probe)}")
    print()
    for run in runs:
        busy = ", ".join(f"{k} {v / run.elapsed * 100:.0f}%" for k, v in run.cpu.items())
        print(f"CPU during {run.name} (% of one core): {busy}")
        for key, value in sorted(run.errors.items()):
            print(f"  errors in {run.name}: {key} x{value}")
    print(
        f"mailfence log: {log_problems or 'no warnings or errors'};"
        f" SIGTERM -> exit {exit_code} in {stop_seconds:.1f} s;"
        f" `mailfence queue list --json` after the drain: {len(queue_list)} message(s)"
    )
    print()
    lost = relayed.accepted - drain.delivered
    print("figures")
    p99_msg = percentile(relayed.message_latency, 0.99) * 1000
    p99_conn = percentile(relayed.connect_latency, 0.99) * 1000
    rows = [
        ("accepted msgs/s", f"{relayed.rate:8.0f}", f"goal >= 800: {verdict(relayed.rate >= 800)}"),
        (
            "delivered msgs/s",
            f"{delivered_rate:8.0f}",
            f"goal >= 800: {verdict(delivered_rate >= 800)}",
        ),
    ]
    if ceiling is not None:
        ratio = relayed.rate / max(1e-9, ceiling.rate)
        rows.append(("ceiling msgs/s (no relay)", f"{ceiling.rate:8.0f}", "AUTH PLAIN, no TLS"))
        rows.append(("ratio accepted / ceiling", f"{ratio:8.2f}", "the figure"))
        ratio = delivered_rate / max(1e-9, ceiling.rate)
        rows.append(("ratio delivered / ceiling", f"{ratio:8.2f}", "to drained"))
    rows.append(
        (
            "p99 MAIL->250 (ms)",
            f"{p99_msg:8.1f}",
            f"goal < 100: {verdict(bool(relayed.message_latency) and p99_msg < 100)}",
        )
    )
    rows.append(
        (
            "p99 connect->250 (ms)",
            f"{p99_conn:8.1f}",
            f"goal < 100: {verdict(bool(relayed.connect_latency) and p99_conn < 100)}",
        )
    )
    for label, figure, note in rows:
        print(f"  {label:<27}{figure}   ({note})")
    durable = relayed.accepted > 0 and drain.drained and lost == 0 and not queue_list
    print(
        f"  every accepted one delivered: {verdict(durable)}"
        f" (accepted {relayed.accepted}, counted at the sink {drain.delivered},"
        f" missing {max(0, lost)}, extra {max(0, -lost)})"
    )


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent client sessions")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load run")
    parser.add_argument("--messages-per-connection", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--client-nice", type=int, default=0, help="os.nice() of the clients")
    parser.add_argument("--delivery-workers", type=int, default=0, help="0: mailfence's default")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--no-ceiling", dest="ceiling", action="store_false")
    parser.add_argument("--no-probe", dest="probe", action="store_false")
    parser.add_argument("--python-sink", action="store_true", help="not smtp-sink")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.clients < 1 or args.processes < 1 or args.messages_per_connection < 1:
        parser.error("--clients, --processes and --messages-per-connection must be >= 1")
    if args.size < 256:
        parser.error("--size must be at least 256 bytes (the headers)")
    args.processes = min(args.processes, args.clients)

    directory = Path(tempfile.mkdtemp(prefix="mailfence-bench-"))
    try:
        ceiling: LoadResult | None = None
        if args.ceiling:
            sink = Sink(directory, "ceiling-sink", args.python_sink)
            with stopping(sink):
                print(f"ceiling: {args.seconds:g} s straight to {sink.description} ...", flush=True)
                ceiling = run_load(
                    "ceiling (straight to sink)",
                    sink.port,
                    False,
                    args,
                    {"sink": sink.process.pid},
                )

        sink = Sink(directory, "relay-sink", args.python_sink)
        with stopping(sink):
            relay = Relay(directory, sink.port, args)
            with stopping(relay):
                asyncio.run(warm_up(relay.port))
                print(f"mailfence: {args.seconds:g} s through the relay ...", flush=True)
                relayed = run_load(
                    "mailfence accepted",
                    relay.port,
                    True,
                    args,
                    {"mailfence": relay.process.pid, "sink": sink.process.pid},
                )
                print("waiting for the queue to drain ...", flush=True)
                drain = wait_for_drain(relay, sink, relayed.accepted, args.drain_timeout)
                queue_list = relay.queue_list()
            exit_code = relay.process.returncode
            problems = relay.log_problems()
        report(
            args,
            ceiling,
            relayed,
            drain,
            sink.description,
            queue_list,
            problems,
            exit_code,
            relay.stop_seconds,
        )
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
