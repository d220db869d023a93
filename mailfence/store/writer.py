"""One writer thread, fed by a queue, with group commit.

Callers on the event loop `await writer.run(fn)`; `fn(conn)` runs on the writer thread inside a
BEGIN IMMEDIATE transaction. Every job waiting when the thread wakes joins the same
transaction, so fifty concurrent spool inserts cost one fsync, and none of their callers is
answered before that fsync (DESIGN.md: "group commit that fsyncs before any of the batch is
answered").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("mailfence.store")

MAX_BATCH = 256
SLOW_COMMIT = 0.1  # seconds; a commit this slow is logged
LOCK_WAIT = 10.0


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


WAL_PAGES_BOUND = 20_000  # pages of 4 KiB


class Writer:
    def __init__(self, conn: sqlite3.Connection, max_pending: int = 10000) -> None:
        self._conn = conn
        # SQLite's own busy handler sleeps 1, 2, 5, 10 ... 100 ms between tries; with the
        # delivery process writing too, that put 100 ms+ into the time to 250. This thread
        # waits for the write lock itself, polling every millisecond (see _begin).
        conn.execute("PRAGMA busy_timeout=0")
        # A commit that crosses SQLite's auto-checkpoint threshold copies the WAL into the
        # database and fsyncs it before returning: every caller in that batch (a client
        # waiting for its 250) waited 100-250 ms for it. The server checkpoints on a timer,
        # off the commit path, instead (checkpoint() below). The writer keeps a far threshold
        # of its own only as a bound: if the timed checkpoints fail, the WAL stops at ~80 MB.
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES_BOUND}")
        # Bounded: a stalled disk makes callers wait on put, not the process grow.
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._loop, name="mailfence-writer", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(fn, future, loop)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            await asyncio.to_thread(self._jobs.put, job)
        return await future

    def close(self) -> None:
        """Finishes every queued job, then stops the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._commit(batch)
            if stop:
                return

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting up to LOCK_WAIT for another process's write to finish."""
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if not _is_locked(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def _commit(self, batch: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        started = time.perf_counter()
        began = ran = started
        try:
            self._begin()
            began = time.perf_counter()
            for job in batch:
                # A savepoint per job: one failing job is rolled back alone and the rest of
                # the batch still commits.
                self._conn.execute("SAVEPOINT job")
                try:
                    value = job.fn(self._conn)
                    self._conn.execute("RELEASE job")
                    results.append((job, True, value))
                except Exception as error:
                    self._conn.execute("ROLLBACK TO job")
                    self._conn.execute("RELEASE job")
                    results.append((job, False, error))
            ran = time.perf_counter()
            self._conn.execute("COMMIT")
            _report_slow(started, began, ran, len(batch))
        except Exception as error:  # the commit itself failed: nobody's write is durable
            with contextlib.suppress(Exception):  # a failing ROLLBACK must not kill the thread
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            results = [(job, False, error) for job in batch]
        for job, ok, value in results:
            # RuntimeError: that caller's loop has closed; the write stands regardless.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(_settle, job.future, ok, value)


def _report_slow(started: float, began: float, ran: float, jobs: int) -> None:
    """Every client waiting for a 250 in this batch waited this long: a slow disk or a
    long lock shows in the log with where the time went."""
    done = time.perf_counter()
    if done - started >= SLOW_COMMIT:
        log.warning(
            "slow commit: %.0f ms for %d job(s) (waiting for the write lock %.0f ms, "
            "running them %.0f ms, COMMIT and fsync %.0f ms)",
            (done - started) * 1000,
            jobs,
            (began - started) * 1000,
            (ran - began) * 1000,
            (done - ran) * 1000,
        )


def _is_locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copies committed WAL pages into the database without waiting for anyone (PASSIVE).

    Blocking: run it on a thread. Called every few seconds by the server, since writers
    do not checkpoint on their own (see Writer)."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
