"""Delivery in a process of its own, so that receiving and delivering each get a core.

One Python process is one core: on a two-core machine, the SMTP event loop alone saturates
its core under load, and delivery sharing that loop fell behind (DESIGN.md, "Scale"). The
child runs the same `Delivery` over the same SQLite spool (WAL lets the two processes read
and write side by side, as the CLI already does); the parent only nudges it through a socket
when a message is queued, so it need not wait for its one-second poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import uvloop

from mailfence.config import Config
from mailfence.delivery.worker import Delivery
from mailfence.observe.logs import LEVELS, configure_logging
from mailfence.spawn import spawn_with_channel
from mailfence.spool import Spool
from mailfence.store import Writer, connect

log = logging.getLogger("mailfence.delivery")

CHILD_CLEANUP = 3.0  # seconds, past its deadline, for the child's last report and close


class DeliveryProcess:
    """The parent's handle on the delivery child: start, nudge, watch, stop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._process: BaseProcess | None = None
        self._nudge: socket.socket | None = None
        self._nudge_pending = False
        self.restarts = 0
        self._replacing = False  # a reload is swapping the child: check() leaves it alone
        self._wanted = False  # started and not stopped for good: check() keeps it running
        # What the child reports once a second (cumulative for that child), and the sums of
        # the children that came before it.
        self._reported: dict[str, int] = {}
        self._earlier: dict[str, int] = {}
        self._partial = b""

    def figures(self) -> dict[str, int]:
        """Recipients delivered, deferred and failed since the relay started."""
        keys = set(self._reported) | set(self._earlier)
        return {k: self._earlier.get(k, 0) + self._reported.get(k, 0) for k in keys}

    def _on_report(self) -> None:
        if self._nudge is None:
            return
        try:
            data = self._nudge.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._nudge.fileno())
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines[-1:]:  # cumulative: only the newest matters
            with contextlib.suppress(ValueError):
                self._reported = {k: int(v) for k, v in json.loads(line).items()}

    def start(self) -> None:
        self._wanted = True  # from now on, check() keeps a child running
        level = logging.getLogger("mailfence").getEffectiveLevel()
        # On failure, check() tries again in a second.
        process, parent_end = spawn_with_channel(
            "mailfence-delivery", _child_main, (self.config, level)
        )
        self._nudge = parent_end
        self._process = process
        for key, value in self._reported.items():  # the previous child's last word
            self._earlier[key] = self._earlier.get(key, 0) + value
        self._reported = {}
        self._partial = b""
        with contextlib.suppress(RuntimeError):  # no running loop: nobody to read reports
            asyncio.get_running_loop().add_reader(parent_end.fileno(), self._on_report)

    def nudge(self) -> None:
        """A message was queued. Coalesced: one byte per loop turn, however many arrived."""
        if self._nudge_pending:
            return
        self._nudge_pending = True
        asyncio.get_running_loop().call_soon(self._send_nudge)

    def _send_nudge(self) -> None:
        self._nudge_pending = False
        if self._nudge is not None:
            # A full buffer already holds a nudge the child has yet to read.
            with contextlib.suppress(BlockingIOError, OSError):
                self._nudge.send(b"!")

    def check(self) -> None:
        """Called every second: a child that died (or could not be started) is logged and
        started again."""
        if self._replacing or not self._wanted:
            return
        if self._process is None or not self._process.is_alive():
            if self._process is None:
                log.error("delivery process is not running; starting it")
            else:
                log.error(
                    "delivery process exited (code %s); starting it again",
                    self._process.exitcode,
                )
                self._process = None
            self.restarts += 1
            self._on_report()  # its last counts, if it sent them before dying
            self._close_nudge()
            try:
                self.start()
            except OSError as error:  # out of descriptors or processes: next second, again
                log.error("delivery process could not be started: %s", error)

    async def replace(self, config: Config, grace: float, wanted: Callable[[], bool]) -> bool:
        """Reload: the child finishes its current messages and exits (within `grace` seconds), and
        one with `config` starts, unless `wanted()` has turned false meanwhile (the relay is
        stopping). Mail keeps arriving meanwhile; the new child finds it. True if started."""
        self._replacing = True
        try:
            await asyncio.to_thread(self._stop, grace)
            self.close()
            self.config = config
            if not wanted():
                self._wanted = False
                return False
            self.start()
            return True
        finally:
            self._replacing = False

    def stop(self, deadline: float) -> None:
        """Blocking (run it on a thread): the child finishes its current messages and exits,
        and none starts again."""
        self._wanted = False
        self._stop(deadline)

    def _stop(self, deadline: float) -> None:
        process = self._process
        if process is None:
            return
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            # The child waits up to `deadline` for its messages, then reports and closes its
            # database: the margin leaves it time for that before it is killed.
            process.join(max(1.0, deadline) + CHILD_CLEANUP)
        if process.is_alive():
            log.warning("delivery process did not stop in time; killing it")
            process.kill()
            process.join(5)
        self._process = None

    def close(self) -> None:
        """On the loop's thread, after stop(): the child's last report has been read."""
        self._on_report()
        self._close_nudge()

    def _close_nudge(self) -> None:
        if self._nudge is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                asyncio.get_running_loop().remove_reader(self._nudge.fileno())
            self._nudge.close()
            self._nudge = None


def _child_main(config: Config, level: int, nudges: socket.socket) -> None:
    # The same format as the parent's (one JSON object per line for journald, or text).
    configure_logging(
        config.log.format,
        name if (name := logging.getLevelName(level).lower()) in LEVELS else "info",
        flood_lines=config.log.flood_lines,
        flood_window=config.log.flood_window,
    )
    uvloop.run(_deliver(config, nudges))


async def _deliver(config: Config, nudges: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when to stop
    writer = Writer(connect(config.database_path))
    spool = Spool(writer, config.database_path, config.spool.max_messages)
    delivery = Delivery(config, spool)

    def on_nudge() -> None:
        try:
            data = nudges.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # the parent is gone: finish up
            stop.set()
        spool.arrived.set()

    def send_report() -> None:
        counters = delivery.counters
        line = json.dumps(
            {
                "delivered": counters.delivered,
                "deferred": counters.deferred,
                "failed": counters.failed,
            }
        )
        with contextlib.suppress(BlockingIOError, OSError):
            nudges.send(line.encode() + b"\n")

    async def report() -> None:
        # Once a second, the counters (cumulative) to the parent: its `top`, stats and metrics.
        while True:
            await asyncio.sleep(1.0)
            send_report()

    nudges.setblocking(False)
    loop.add_reader(nudges.fileno(), on_nudge)
    delivery.start()
    reporting = asyncio.create_task(report())
    await stop.wait()
    reporting.cancel()
    loop.remove_reader(nudges.fileno())
    await delivery.stop(config.smtp.shutdown_timeout)
    send_report()  # the last word: what the messages finished during the stop did
    spool.close()
    await asyncio.to_thread(writer.close)
    nudges.close()
