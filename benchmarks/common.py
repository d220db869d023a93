"""What the benchmarks share: ports, processes' CPU, percentiles, the client's TLS context.

The benchmarks run as scripts (`python benchmarks/flood.py`), so this folder is on sys.path
and they import this module as `common`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

HOST = "127.0.0.1"


def percentile(values: list[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of them at or below it
    (p99 of 100 samples is the second largest; of fewer than 100, the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] if ordered else 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, deadline: float, alive: subprocess.Popen[bytes]) -> None:
    """Until something listens on HOST:port; fails at once if `alive` exits first."""
    while time.monotonic() < deadline:
        if alive.poll() is not None:
            raise RuntimeError(f"{alive.args!r} exited with {alive.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} by the deadline")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_seconds(pid: int) -> float:
    """How long the process's main thread has waited on a run queue for a CPU, in all: the
    second field of /proc/<pid>/schedstat (the kernel's sched_info, in ns; 0.0 if unreadable)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc/<pid>/task/*/children (bounded)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 1000:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def tree_cpu(pid: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in descendants(pid)}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    # A process that appeared in between counts from zero; one that ended is lost (the
    # relay's delivery child lives for the whole run).
    return sum(value - before.get(p, 0.0) for p, value in after.items())


def client_tls_context() -> ssl.SSLContext:
    """One context for all of a process's connections, not verifying (self-signed relay).

    Without it a client builds a default context, loading the system CA store, for every
    connection: about 20 ms of client CPU each time, which would be measured as the relay's.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


class Stoppable(Protocol):
    def stop(self) -> object: ...


@contextlib.contextmanager
def stopping(*things: Stoppable) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            thing.stop()
