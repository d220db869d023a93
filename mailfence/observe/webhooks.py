"""Health documents POSTed to the operator's webhooks, from one thread, never from the loop.

`post()` runs on the event loop and only appends to a bounded queue; the thread named
"mailfence-webhooks" does the slow part (DNS, connect, a receiver that hangs, backoff). When
the receivers cannot keep up, the oldest pending document is dropped: a webhook exists to say
what the relay's state is *now*, so the newest document is the one that must go out.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from email.message import Message
from typing import IO

log = logging.getLogger("mailfence.health")

THREAD_NAME = "mailfence-webhooks"
HEADERS = {"Content-Type": "application/json", "User-Agent": "mailfence"}


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a 301/302/303 to a POST by sending a GET without the body; the document
    would be lost while the attempt looked successful. A redirect is a non-2xx answer here."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _where(url: str) -> str:
    """The scheme and host only: webhook URLs often carry a secret token in their path."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}"


class Webhooks:
    """POSTs each document to every URL in `urls`, in order, from one daemon thread.

    A failed URL (refused, timed out, non-2xx) is tried `retries` times in all, waiting
    `backoff`, then twice that, and so on. Counters for metrics, per URL and document: `sent`,
    `failed` (gave up after the retries); per document: `dropped` (never sent: pushed out of
    the queue, or still queued when `close()` ran out of time).
    """

    def __init__(
        self,
        urls: Sequence[str],
        timeout: float = 5.0,
        retries: int = 3,
        max_pending: int = 100,
        backoff: float = 1.0,
    ) -> None:
        for url in urls:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"webhook {url!r} is not an http(s) URL")
        self.urls = tuple(urls)
        self.timeout = timeout
        self.retries = max(1, retries)
        self.max_pending = max(1, max_pending)
        self.backoff = backoff
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self._pending: deque[bytes] = deque()
        self._changed = threading.Condition()  # guards _pending, _closing, _thread, dropped
        self._closing = False
        self._stop = threading.Event()  # set when close() gives up: abandon the rest now
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Documents waiting for the thread (not counting the one it is sending)."""
        return len(self._pending)

    def post(self, document: Mapping[str, object]) -> None:
        """Queue `document` for every URL; returns at once. Called on the event loop."""
        if not self.urls:
            return
        body = json.dumps(document, default=str).encode()
        with self._changed:
            if self._closing:
                return
            dropped = len(self._pending) >= self.max_pending
            if dropped:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append(body)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            self._changed.notify()
        if dropped:
            log.warning(
                "webhooks: receivers are behind; dropped the oldest pending document "
                "(%d dropped so far)",
                self.dropped,
                extra={"flood": "webhook dropped", "fields": {"event": "webhook_dropped"}},
            )

    def close(self, timeout: float) -> None:
        """Let the thread send what is queued for up to `timeout` seconds, then stop it.

        Blocks the caller for up to `timeout`. If time runs out, what is still queued is
        dropped and the thread exits after its current attempt, at most the webhook timeout
        later; it is a daemon thread, so it never holds up the process's exit.
        """
        with self._changed:
            self._closing = True
            self._changed.notify()
            thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if not thread.is_alive():
            return
        with self._changed:
            abandoned = len(self._pending)
            self.dropped += abandoned
            self._pending.clear()
        self._stop.set()
        log.warning("webhooks: stopped with %d documents not sent", abandoned)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return  # closing, and everything queued has been sent
                body = self._pending.popleft()
            for url in self.urls:
                if self._stop.is_set():
                    return
                self._deliver(url, body)

    def _deliver(self, url: str, body: bytes) -> None:
        delay = self.backoff
        for attempt in range(1, self.retries + 1):
            problem = self._attempt(url, body)
            if problem is None:
                self.sent += 1
                return
            if attempt == self.retries or self._stop.wait(delay):
                break
            delay *= 2
        self.failed += 1
        log.warning(
            "webhook %s failed after %d attempts: %s",
            _where(url),
            attempt,
            problem,
            extra={"flood": "webhook failed", "fields": {"event": "webhook_failed"}},
        )

    def _attempt(self, url: str, body: bytes) -> str | None:
        """One POST. None when the receiver answered 2xx, else what went wrong."""
        # The scheme was checked in __init__: only http(s), never file: or ftp:.
        request = urllib.request.Request(url, data=body, headers=HEADERS, method="POST")  # noqa: S310
        try:
            with self._opener.open(request, timeout=self.timeout):
                return None
        except urllib.error.HTTPError as error:
            error.close()  # it holds the response, and with it the socket
            return f"HTTP {error.code}"
        except Exception as error:
            # Refused, timed out, a malformed reply: all just a failed attempt. The thread
            # must outlive any of them, or every later document would be silently lost.
            return str(error) or type(error).__name__
