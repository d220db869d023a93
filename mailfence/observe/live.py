"""The live state of a running relay, as the operator sees it: figures, health, a snapshot.

`Observer.tick()` runs once a second on the event loop: it turns totals into per-second
rates, reassesses health and prepares the figures Prometheus reads from its own thread. A
snapshot (for `top`, `stats`, `status`) is built on request, bounded however many
connections are open: the session list is cut to what the caller can show.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mailfence.observe.figures import Histogram, RateRing, Totals, quantile
from mailfence.observe.health import Health, HealthFigures, assess

if TYPE_CHECKING:
    from mailfence.auth import VerificationPool
    from mailfence.config import Config
    from mailfence.defense import Defense
    from mailfence.smtp.listeners import Listeners
    from mailfence.spool import Spool

SNAPSHOT_VERSION = 1
MAX_SESSIONS_SHOWN = 500
SPARK_POINTS, SPARK_STEP = 30, 10  # the last five minutes, ten seconds a point

# The series kept per second: rates over 10 s and 5 min, sparklines and the minute roll-up.
SERIES = (
    "connections",
    "connections_refused",
    "auth_ok",
    "auth_failed",
    "auth_refused",
    "auth_cached",
    "accepted",
    "delivered",
    "deferred",
    "bounced",
    "bans",
    "spool_failed",
)


@dataclass
class DeliveryFigures:
    """What the delivery side reports (from its own process, through the nudge socket)."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    restarts: int = 0


class Observer:
    def __init__(
        self,
        config: Config,
        defense: Defense,
        pool: VerificationPool,
        spool: Spool,
        listeners: Listeners,
        started: float,
    ) -> None:
        self.config = config
        self.defense = defense
        self.pool = pool
        self.spool = spool
        self.listeners = listeners
        self.started = started  # wall clock
        self.totals = Totals()
        self.delivery = DeliveryFigures()
        self.ring = RateRing(300)
        self._previous: dict[str, int] = {}
        self._restart_seen_at: float | None = None
        self._restarts_seen = 0
        self.health = Health("ok", "starting")
        self.on_health_change: Callable[[Health, Health], None] | None = None
        self.exported: dict[str, Any] = {}  # read by the metrics thread; replaced, never mutated
        self.recent_bans: list[dict[str, Any]] = []
        self.manual_bans = 0

    # --- once a second -------------------------------------------------------------------

    def flat_totals(self) -> dict[str, int]:
        auth = self.totals.auth
        counters = self.defense.counters
        return {
            "connections": counters.connections_allowed,
            "connections_refused": sum(counters.connections_refused.values()),
            "auth_ok": sum(n for (outcome, _), n in auth.items() if outcome == "ok"),
            "auth_failed": sum(n for (outcome, _), n in auth.items() if outcome == "failed"),
            "auth_refused": sum(
                n for (outcome, _), n in auth.items() if outcome in ("refused", "busy")
            ),
            "auth_cached": sum(n for (_, lane), n in auth.items() if lane == "cache"),
            "accepted": self.totals.messages["accepted"],
            "delivered": self.delivery.delivered,
            "deferred": self.delivery.deferred,
            "bounced": self.delivery.bounced,
            "bans": counters.bans_made,
            "spool_failed": self.totals.messages["spool_failed"],
        }

    def tick(self, now: float) -> None:
        second = int(now)
        flat = self.flat_totals()
        self.ring.record(
            second - 1, {name: flat[name] - self._previous.get(name, 0) for name in SERIES}
        )
        self._previous = flat
        if self.delivery.restarts != self._restarts_seen:
            self._restarts_seen = self.delivery.restarts
            self._restart_seen_at = now
        health = assess(self._health_figures(second, now))
        if health.state != self.health.state:
            previous, self.health = self.health, health
            if self.on_health_change is not None:
                self.on_health_change(previous, health)
        else:
            self.health = health  # the reason may have changed
        self.exported = self._export(flat)

    def _health_figures(self, second: int, now: float) -> HealthFigures:
        config = self.config
        known_waits = list(self.pool.recent_waits["known"])
        return HealthFigures(
            under_attack=self.defense.under_attack,
            attack_reason=self.defense.attack_reason,
            known_wait_p99=_p99(known_waits),
            known_wait_limit=config.health.known_wait_degraded,
            spool_size=self.spool.size,
            spool_max=config.spool.max_messages,
            spool_share_limit=config.health.spool_degraded,
            delivered_5m=self.ring.total("delivered", second, 300),
            deferred_5m=self.ring.total("deferred", second, 300),
            delivery_restarted_5m=self._restart_seen_at is not None
            and now - self._restart_seen_at < 300,
            spool_failed_5m=self.ring.total("spool_failed", second, 300),
            last_spool_error=self.totals.last_spool_error,
        )

    def _export(self, flat: dict[str, int]) -> dict[str, Any]:
        counters = self.defense.counters
        to_250 = self.totals.to_250_seconds
        return {
            "connections": {"accepted": counters.connections_allowed}
            | {reason: n for reason, n in counters.connections_refused.items()},
            "auth": dict(self.totals.auth),
            "bans": {"auto": counters.bans_made, "manual": self.manual_bans},
            "messages": {
                "accepted": flat["accepted"],
                "rejected": self.totals.messages["rejected"],
                "spool_failed": flat["spool_failed"],
                "delivered": flat["delivered"],
                "deferred": flat["deferred"],
                "bounced": flat["bounced"],
            },
            "live_connections": self.listeners.open_connections,
            "accepted_by_queue": dict(self.listeners.accepted_from),
            "door_process": self._door_process(),
            "pool_busy": dict(self.pool.busy_by_lane),
            "pool_queued": {lane: len(q) for lane, q in self.pool.waiting.items()},
            "spool_size": self.spool.size,
            "spool_by_state": dict(self.spool.by_state),
            "health": self.health.state,
            "under_attack": self.defense.under_attack,
            "auth_seconds": {
                lane: (list(h.counts), h.total) for lane, h in self.totals.auth_seconds.items()
            },
            "to_250_seconds": (list(to_250.counts), to_250.total),
        }

    def _door_process(self) -> dict[str, Any] | None:
        """The strangers' door process: None where it is not wanted (turned off, monitor
        mode, no strangers' queue); else whether it is accepting, and how often it died."""
        door = self.listeners.strangers_door
        if door is None or not door.wanted:
            return None
        return {"running": door.ready, "restarts": door.restarts}

    def ban_recorded(self, network: str, reason: str, source: str, until: float | None) -> None:
        """A ban made or applied by this server (automatic, or an operator's through it)."""
        entry = {"network": network, "reason": reason, "source": source, "until": until}
        self.recent_bans.insert(0, entry | {"at": time.time()})
        del self.recent_bans[20:]
        if source == "manual":
            self.manual_bans += 1

    # --- on request ----------------------------------------------------------------------

    def snapshot(self, sessions: int = 50) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        flat = self.flat_totals()
        rates = {
            window: {
                name: round(self.ring.total(name, second, seconds) / seconds, 2) for name in SERIES
            }
            for window, seconds in (("10s", 10), ("5m", 300))
        }
        series = {name: self.ring.series(name, second, SPARK_POINTS, SPARK_STEP) for name in SERIES}
        pool = self.pool
        live = self.listeners.live
        # Both bounded whatever the number of sessions: the oldest are the first entries of
        # the live dict, and phases are counted as they change.
        shown = list(itertools.islice(live, max(0, min(sessions, MAX_SESSIONS_SHOWN))))
        monotonic = time.monotonic()
        by_state = {phase: n for phase, n in self.listeners.phases.items() if n > 0}
        return {
            "version": SNAPSHOT_VERSION,
            "time": now,
            "uptime": now - self.started,
            "health": {"state": self.health.state, "reason": self.health.reason},
            "under_attack": self.defense.under_attack,
            "connections": {
                "open": self.listeners.open_connections,
                "sessions": len(live),
                "limit": self.config.smtp.max_connections,
                "by_state": by_state,
                # Accepted from each accept queue (smtp/steering.py): "customers" counts those
                # that skipped the strangers' queue at the door.
                "accepted_by_queue": dict(self.listeners.accepted_from),
                "door_process": self._door_process(),
            },
            "totals": flat,
            "rates": rates,
            "series": series,
            "pool": {
                "threads": pool.threads,
                "unknown_threads": pool.unknown_threads,
                "busy": pool.busy,
                "busy_by_lane": dict(pool.busy_by_lane),
                "queued": {lane: len(q) for lane, q in pool.waiting.items()},
                "wait_p99_ms": {
                    lane: _ms(_p99(list(waits))) for lane, waits in pool.recent_waits.items()
                },
            },
            "spool": {
                "size": self.spool.size,
                "max": self.config.spool.max_messages,
                "by_state": dict(self.spool.by_state),
            },
            "time_to_250_p99_ms": _ms(self.totals.to_250_seconds.quantile(0.99)),
            "top_sources": _top(self.totals.failures_by_source, "source"),
            "top_users": _top(self.totals.failures_by_user, "user"),
            "recent_bans": list(self.recent_bans[:10]),
            "sessions": [
                {
                    "source": str(s.address),
                    "user": s.user_name,
                    "state": s.phase,
                    "tls": s.encrypted,
                    "age": round(monotonic - s.started, 1),
                    "bytes": s.bytes_in,
                }
                for s in shown
            ],
        }


def _top(counter: Any, key: str, n: int = 10) -> list[dict[str, Any]]:
    return [{key: name, "failures": count} for name, count in counter.most_common(n)]


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def _ms(seconds: float | None) -> float | None:
    if seconds is None or seconds == float("inf"):
        return None
    return round(seconds * 1000, 1)


__all__ = ["SERIES", "DeliveryFigures", "Histogram", "Observer", "quantile"]
