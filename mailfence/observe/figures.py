"""The relay's figures: counters bumped on the event paths, read once a second.

The paths that run ten thousand times a second (a refusal at the door, an AUTH) only add 1 to
an int here. Everything else (rates, sparklines, the minute roll-up into SQLite, Prometheus)
is derived from these totals on the one-second tick, never per event.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds in seconds, Prometheus-style (the last bucket is +Inf).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """Counts per latency bucket, with a sum: enough for Prometheus and a p99 estimate."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merge(self, counts: list[int]) -> None:
        for index, n in enumerate(counts[: len(self.counts)]):
            self.counts[index] += n

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q)


def quantile(counts: list[int], q: float) -> float | None:
    """The bucket bound under which a share q of the observations fall (None: no data).

    An upper bound, as precise as the buckets: the p99 of 7 ms reads as "≤ 10 ms"."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, n in enumerate(counts):
        seen += n
        if seen >= rank and n:
            return LATENCY_BUCKETS[index] if index < len(LATENCY_BUCKETS) else float("inf")
    return float("inf")


def subtract(now: list[int], before: list[int]) -> list[int]:
    return [a - b for a, b in zip(now, before, strict=True)]


@dataclass
class Totals:
    """Everything counted since the server started. Keys are short, stable names."""

    auth: Counter[tuple[str, str]] = field(default_factory=Counter)  # (outcome, lane)
    messages: Counter[str] = field(default_factory=Counter)  # accepted, rejected, ...
    sessions: Counter[str] = field(default_factory=Counter)  # how sessions ended
    auth_seconds: dict[str, Histogram] = field(default_factory=dict)  # by lane
    to_250_seconds: Histogram = field(default_factory=Histogram)
    failures_by_source: Counter[str] = field(default_factory=Counter)
    failures_by_user: Counter[str] = field(default_factory=Counter)
    last_spool_error: str = ""  # why the last message could not be written to the spool

    def auth_outcome(self, outcome: str, lane: str) -> None:
        self.auth[(outcome, lane)] += 1

    def auth_latency(self, lane: str, seconds: float) -> None:
        histogram = self.auth_seconds.get(lane)
        if histogram is None:
            histogram = self.auth_seconds[lane] = Histogram()
        histogram.observe(seconds)

    def failure(self, source: str, user: str) -> None:
        self.failures_by_source[source] += 1
        self.failures_by_user[user] += 1
        # A flood from 100,000 addresses must not grow this without end: keep the heaviest.
        for table in (self.failures_by_source, self.failures_by_user):
            if len(table) > MAX_FAILURE_KEYS:
                kept = table.most_common(MAX_FAILURE_KEYS // 10)
                table.clear()
                table.update(dict(kept))


MAX_FAILURE_KEYS = 10_000


class RateRing:
    """Per-second counts of named series for the last `seconds` seconds.

    Fed once a second with the change of each total, so rates over 10 s and 5 min and the
    sparklines cost nothing on the event paths.
    """

    def __init__(self, seconds: int = 300) -> None:
        self.seconds = seconds
        self._slots: list[dict[str, int]] = [{} for _ in range(seconds)]
        self._stamps = [-1] * seconds

    def record(self, second: int, values: dict[str, int]) -> None:
        index = second % self.seconds
        self._slots[index] = values
        self._stamps[index] = second

    def total(self, name: str, second: int, window: int) -> int:
        """Sum over the `window` seconds before `second` (not including it)."""
        result = 0
        for past in range(second - window, second):
            index = past % self.seconds
            if self._stamps[index] == past:
                result += self._slots[index].get(name, 0)
        return result

    def series(self, name: str, second: int, points: int, step: int) -> list[int]:
        """`points` sums of `step` seconds each, oldest first, ending before `second`."""
        start = second - points * step
        return [self.total(name, start + (n + 1) * step, step) for n in range(points)]
