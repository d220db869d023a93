"""The relay's log: text or JSON lines, with floods folded into one summary per window.

Code that may log once per bot attempt tags the call with a category:

    log.info("auth refused", extra={"flood": "auth refused",
                                    "fields": {"peer": peer, "user": user}})

The first `lines` records of a category per window are written; the rest are counted, and when
the window ends one WARNING from "mailfence.flood" says how many were suppressed and from
where. Records without a category are never suppressed.
"""

from __future__ import annotations

import heapq
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
SUMMARY_LOGGER = "mailfence.flood"
MAX_TRACKED = 1000  # distinct peers (and users) remembered per category per window
TOP = 5  # sources and users named in a summary
MAX_LABEL = 100  # characters kept of a peer or user name: an AUTH username can be anything


def _label(value: object) -> str:
    """A peer or user as one short printable line; a username with a newline in it must not
    forge a line of the text log."""
    text = str(value)[:MAX_LABEL]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _text(value: object) -> str:
    """str() for json.dumps's unknown types, even when that str() itself fails."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's `fields`, and the
    traceback as "exception". Never raises: a log line must not cost the request its life."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._message(record),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                # The record's own keys win: a field must not forge the level or the message.
                document.setdefault(_text(key), value)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(document, default=_text, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            # Keys json cannot write, NaN, a cycle: fall back to each value's text.
            safe = {key: self._safe(value) for key, value in document.items()}
            return json.dumps(safe, default=_text, allow_nan=False)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception:  # a call like log.info("%d", "x"): keep what there is
            return f"{_text(record.msg)} {_text(record.args)}"

    @staticmethod
    def _safe(value: object) -> object:
        try:
            json.dumps(value, default=_text, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return _text(value)
        return value


class BoundedCounter:
    """How often each key was seen, remembering at most `bound` keys (Misra-Gries).

    While no more than `bound` distinct keys arrive the counts are exact. After that a new key
    finding the table full takes one off every count and keys reaching zero leave; any key
    seen in more than 1/(bound+1) of the adds is guaranteed to still be there, its count
    short by at most that share. So a flood from 100,000 addresses still names the one
    address sending a fifth of it, in constant memory and amortised constant time.
    """

    def __init__(self, bound: int = MAX_TRACKED) -> None:
        self.bound = bound
        self.counts: dict[str, int] = {}
        self.exact = True

    def add(self, key: str) -> None:
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < self.bound:
            self.counts[key] = 1
        else:
            self.exact = False
            for tracked in list(self.counts):
                self.counts[tracked] -= 1
                if not self.counts[tracked]:
                    del self.counts[tracked]

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return heapq.nlargest(n, self.counts.items(), key=itemgetter(1))

    def __len__(self) -> int:
        return len(self.counts)


@dataclass
class Suppression:
    """What one category lost in the current window."""

    lines: int = 0
    peers: BoundedCounter = field(default_factory=BoundedCounter)
    users: BoundedCounter = field(default_factory=BoundedCounter)


class FloodLimiter(logging.Filter):
    """Lets the first `lines` records of each flood category through per `window` seconds.

    Attach it with `attach(handler)`: the summaries are written by calling `handler.handle()`
    directly, after this filter's lock is released. A summary has no `flood` attribute, so it
    passes this filter on its way out and cannot be suppressed or recurse further. A window
    ends on the first record or `flush()` after it is due; the server calls `flush()` once a
    second so a flood that stops abruptly still gets its summary. Thread-safe: records come
    from the event loop and from worker threads alike.
    """

    def __init__(
        self, lines: int = 20, window: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.lines = lines
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None
        self._window_start = clock()
        self._window_end = self._window_start + window
        self._passed: dict[str, int] = {}
        # Read-only for others (tests, a live view): replaced, never cleared, at a window's end.
        self.suppressed: dict[str, Suppression] = {}

    def attach(self, handler: logging.Handler) -> None:
        """Filter `handler`'s records and write the summaries to it."""
        handler.addFilter(self)
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        self._write(self._end_window_if_due())
        category = getattr(record, "flood", None)
        if category is None:
            return True
        category = str(category)
        with self._lock:
            passed = self._passed.get(category, 0)
            if passed < self.lines:
                self._passed[category] = passed + 1
                return True
            self._count(category, record)
        return False

    def flush(self) -> list[logging.LogRecord]:
        """End the window if it is due; returns the summaries written (for tests)."""
        summaries = self._end_window_if_due()
        self._write(summaries)
        return summaries

    def _count(self, category: str, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        self._count_fields(category, fields if isinstance(fields, Mapping) else {})

    def _count_fields(self, category: str, fields: Mapping[str, object]) -> None:
        suppression = self.suppressed.get(category)
        if suppression is None:
            suppression = self.suppressed[category] = Suppression()
        suppression.lines += 1
        if (peer := fields.get("peer")) is not None:
            suppression.peers.add(_label(peer))
        if (user := fields.get("user")) is not None:
            suppression.users.add(_label(user))

    def absorb(self, category: str, fields: Mapping[str, object]) -> bool:
        """For hot paths: True when a line of `category` would be suppressed now. It is
        then counted here, and the caller skips building a record only to have it dropped
        (during a flood, most of what logging would cost)."""
        self._write(self._end_window_if_due())
        with self._lock:
            if self._passed.get(category, 0) < self.lines:
                return False
            self._count_fields(category, fields)
            return True

    def _end_window_if_due(self) -> list[logging.LogRecord]:
        now = self._clock()
        if now < self._window_end:  # the common case, without taking the lock
            return []
        with self._lock:
            if now < self._window_end:
                return []  # another thread ended it first
            elapsed = now - self._window_start
            ended, self.suppressed, self._passed = self.suppressed, {}, {}
            self._window_start, self._window_end = now, now + self.window
        return [summary_record(category, lost, elapsed) for category, lost in ended.items()]

    def _write(self, summaries: list[logging.LogRecord]) -> None:
        if self._handler is not None:
            for record in summaries:
                self._handler.handle(record)


def summary_record(category: str, lost: Suppression, elapsed: float) -> logging.LogRecord:
    """The one WARNING that stands for a window's suppressed lines of `category`."""
    sources = lost.peers.most_common(TOP)
    users = lost.users.most_common(TOP)
    exact = lost.peers.exact and lost.users.exact
    parts = [f"flood: {lost.lines:,} {category!r} lines suppressed in the last {elapsed:.0f} s"]
    if sources:
        parts.append("top sources " + ", ".join(f"{peer} ({n:,})" for peer, n in sources))
    if users:
        parts.append("top users " + ", ".join(f"{user} ({n:,})" for user, n in users))
    if not exact:
        parts.append("counts of sources and users are lower bounds")
    fields = {
        "event": "flood_summary",
        "category": category,
        "suppressed": lost.lines,
        "top_sources": [{"peer": peer, "count": n} for peer, n in sources],
        "top_users": [{"user": user, "count": n} for user, n in users],
        "exact_counts": exact,
    }
    # No args: a '%' in a peer or user name must not be taken for a format directive.
    return logging.getLogger(SUMMARY_LOGGER).makeRecord(
        SUMMARY_LOGGER,
        logging.WARNING,
        __file__,
        0,
        "; ".join(parts),
        (),
        None,
        extra={"fields": fields},
    )


class _ConfiguredHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so that a second call replaces it."""


_active: FloodLimiter | None = None  # the limiter of the handler configure_logging made


def suppressed(category: str, fields: Mapping[str, object]) -> bool:
    """True when a flood line of `category` is to be dropped (and has been counted)."""
    limiter = _active
    return limiter is not None and limiter.absorb(category, fields)


def configure_logging(
    format: str,
    level: str,
    stream: TextIO | None = None,
    *,
    flood_lines: int = 20,
    flood_window: float = 10.0,
) -> FloodLimiter:
    """Send the "mailfence" logger tree to one handler on `stream` (stdout by default).

    `format` is "text" or "json"; `level` one of LEVELS. The tree stops propagating, so a
    handler on the root logger (basicConfig, for aiosmtpd's own logger) does not print
    every line a second time.
    Returns the flood limiter, whose `flush()` the server calls once a second.
    """
    if format not in ("text", "json"):
        raise ValueError(f"log format {format!r} is not 'text' or 'json'")
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    logger = logging.getLogger("mailfence")
    for old in [h for h in logger.handlers if isinstance(h, _ConfiguredHandler)]:
        logger.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open: stdout stays usable
    handler = _ConfiguredHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    limiter = FloodLimiter(flood_lines, flood_window)
    limiter.attach(handler)
    global _active
    _active = limiter
    # Nothing here prints process or thread names: not looking them up saves every record
    # a few system calls.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logger.addHandler(handler)
    logger.setLevel(LEVELS[level.lower()])
    logger.propagate = False
    return limiter
