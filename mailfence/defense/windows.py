"""Sliding-window counters with a bound on how many keys they remember.

Time is always passed in: the same code runs under the server's clock and a test's fake one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EventWindow(Generic[K]):
    """How many events per key in the last `window` seconds (each key keeps at most `cap`)."""

    def __init__(self, window: float, max_keys: int = 100_000, cap: int = 10_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self.cap = cap
        self._events: OrderedDict[K, deque[float]] = OrderedDict()

    def _trim(self, events: deque[float], now: float) -> None:
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()

    def add(self, key: K, now: float) -> int:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._events.popitem(last=False)  # forget the least recently touched key
            events = self._events[key] = deque(maxlen=self.cap)
        else:
            self._events.move_to_end(key)
        self._trim(events, now)
        events.append(now)
        return len(events)

    def count(self, key: K, now: float) -> int:
        events = self._events.get(key)
        if events is None:
            return 0
        self._trim(events, now)
        return len(events)

    def total(self, now: float) -> int:
        return sum(self.count(key, now) for key in list(self._events))

    def expire(self, now: float) -> None:
        for key in list(self._events):
            if not self.count(key, now):
                del self._events[key]

    def __len__(self) -> int:
        return len(self._events)


class CountWindow(Generic[K]):
    """The sum of counts per key in the last `window` seconds.

    For events that arrive already counted (the strangers' door reports each second how many
    times it refused an address): one entry per report, not one per event.
    """

    def __init__(self, window: float, max_keys: int = 100_000, cap: int = 1_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self.cap = cap
        self._entries: OrderedDict[K, deque[tuple[float, int]]] = OrderedDict()
        self._sums: dict[K, int] = {}

    def _trim(self, key: K, entries: deque[tuple[float, int]], now: float) -> None:
        horizon = now - self.window
        while entries and entries[0][0] <= horizon:
            self._sums[key] -= entries.popleft()[1]

    def add(self, key: K, count: int, now: float) -> int:
        """Adds `count` events at `now`; returns the key's sum in the window."""
        entries = self._entries.get(key)
        if entries is None:
            if len(self._entries) >= self.max_keys:
                forgotten, _ = self._entries.popitem(last=False)  # the least recently touched
                del self._sums[forgotten]
            entries = self._entries[key] = deque()
            self._sums[key] = 0
        else:
            self._entries.move_to_end(key)
        self._trim(key, entries, now)
        if len(entries) >= self.cap:  # bounded: the oldest entry folds into the next one
            _, oldest = entries.popleft()
            entries[0] = (entries[0][0], entries[0][1] + oldest)
        entries.append((now, count))
        self._sums[key] += count
        return self._sums[key]

    def count(self, key: K, now: float) -> int:
        entries = self._entries.get(key)
        if entries is None:
            return 0
        self._trim(key, entries, now)
        return self._sums[key]

    def first(self, key: K, now: float) -> float | None:
        """When the key's oldest count still in the window was added."""
        entries = self._entries.get(key)
        if entries is None:
            return None
        self._trim(key, entries, now)
        return entries[0][0] if entries else None

    def expire(self, now: float) -> None:
        for key in list(self._entries):
            if not self.count(key, now):
                del self._entries[key]
                del self._sums[key]

    def __len__(self) -> int:
        return len(self._entries)


class DistinctWindow(Generic[K]):
    """How many distinct tokens per key were seen in the last `window` seconds.

    Used for 'distinct wrong passwords' and 'distinct failing sources': repeating the same
    thing does not make it count twice.
    """

    def __init__(self, window: float, max_keys: int = 100_000, cap: int = 1_000) -> None:
        self.window = window
        self.max_keys = max_keys
        self.cap = cap
        self._seen: OrderedDict[K, OrderedDict[Hashable, float]] = OrderedDict()

    def add(self, key: K, token: Hashable, now: float) -> bool:
        """Records `token` for `key`; True if it was not already counted in the window."""
        tokens = self._seen.get(key)
        if tokens is None:
            if len(self._seen) >= self.max_keys:
                self._seen.popitem(last=False)
            tokens = self._seen[key] = OrderedDict()
        else:
            self._seen.move_to_end(key)
        self._trim(tokens, now)
        new = token not in tokens
        tokens[token] = now
        tokens.move_to_end(token)
        if len(tokens) > self.cap:
            tokens.popitem(last=False)
        return new

    def _trim(self, tokens: OrderedDict[Hashable, float], now: float) -> None:
        horizon = now - self.window
        while tokens:
            oldest = next(iter(tokens))
            if tokens[oldest] > horizon:
                break
            del tokens[oldest]

    def count(self, key: K, now: float) -> int:
        tokens = self._seen.get(key)
        if tokens is None:
            return 0
        self._trim(tokens, now)
        return len(tokens)

    def tokens(self, key: K, now: float) -> list[Hashable]:
        tokens = self._seen.get(key)
        if tokens is None:
            return []
        self._trim(tokens, now)
        return list(tokens)

    def expire(self, now: float) -> None:
        for key in list(self._seen):
            if not self.count(key, now):
                del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


class TokenBucket:
    """A rate with a small burst: `rate` per second, at most `burst` at once.

    Used where a sliding window would let a whole second's allowance through in one
    instant (a flood's first millisecond), which then lands on the event loop together.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self._tokens = float("inf")  # full: set_rate caps it at the burst
        self._stamp: float | None = None
        self.set_rate(rate, burst)

    def set_rate(self, rate: float, burst: float) -> None:
        """A new rate and burst; tokens saved beyond the new burst are dropped."""
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = min(self._tokens, self.burst)

    def take(self, now: float) -> bool:
        if self._stamp is not None:
            # A clock stepped back must not drain the bucket (and refuse everyone for as long).
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
