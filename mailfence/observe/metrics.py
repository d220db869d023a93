"""Prometheus exposition of the relay's figures, on its own thread.

The collector reads `Observer.exported`, a dict the event loop replaces (never mutates) once
a second, so a scrape never touches live structures from another thread and costs the
relay nothing. Figures are therefore up to a second old.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from mailfence.observe.figures import LATENCY_BUCKETS

log = logging.getLogger("mailfence.metrics")

HEALTH_STATES = ("ok", "degraded", "under_attack")


class RelayCollector(Collector):
    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        if not f:
            return
        connections = CounterMetricFamily(
            "mailfence_connections",
            "Connections by outcome at the door: accepted, or the reason they were refused.",
            labels=["outcome"],
        )
        for outcome, n in sorted(f["connections"].items()):
            connections.add_metric([outcome], n)
        yield connections

        queues = CounterMetricFamily(
            "mailfence_accepted_by_queue",
            "Connections accepted from each accept queue: customers (known networks, ahead of"
            " strangers) or common.",
            labels=["queue"],
        )
        for queue, n in sorted(f["accepted_by_queue"].items()):
            queues.add_metric([queue], n)
        yield queues

        auth = CounterMetricFamily(
            "mailfence_auth",
            "AUTH attempts by outcome (ok, failed, refused before hashing, busy, disabled) and "
            "lane (known, retry, unknown, cache, gate).",
            labels=["outcome", "lane"],
        )
        for (outcome, lane), n in sorted(f["auth"].items()):
            auth.add_metric([outcome, lane], n)
        yield auth

        bans = CounterMetricFamily(
            "mailfence_bans", "Bans made, by source (auto, manual).", labels=["source"]
        )
        for source, n in sorted(f["bans"].items()):
            bans.add_metric([source], n)
        yield bans

        messages = CounterMetricFamily(
            "mailfence_messages",
            "Messages accepted or rejected at DATA, and recipients delivered, deferred or bounced.",
            labels=["outcome"],
        )
        for outcome, n in sorted(f["messages"].items()):
            messages.add_metric([outcome], n)
        yield messages

        yield GaugeMetricFamily(
            "mailfence_connections_open",
            "Connections open now (an autoscaler's signal).",
            value=f["live_connections"],
        )
        busy = GaugeMetricFamily(
            "mailfence_verify_busy", "Verification threads busy, by lane.", labels=["lane"]
        )
        for lane, n in sorted(f["pool_busy"].items()):
            busy.add_metric([lane], n)
        yield busy
        queued = GaugeMetricFamily(
            "mailfence_verify_queue_length",
            "Logins waiting for a verification thread, by lane (unknown: an alert's signal).",
            labels=["lane"],
        )
        for lane, n in sorted(f["pool_queued"].items()):
            queued.add_metric([lane], n)
        yield queued
        spool = GaugeMetricFamily(
            "mailfence_spool_messages",
            "Messages in the queue, by state: new (not tried yet) or deferred (retrying).",
            labels=["state"],
        )
        for state, n in sorted(f["spool_by_state"].items()):
            spool.add_metric([state], n)
        yield spool
        health = GaugeMetricFamily(
            "mailfence_health", "1 for the current health state.", labels=["state"]
        )
        for state in HEALTH_STATES:
            health.add_metric([state], 1 if f["health"] == state else 0)
        yield health
        door = f["door_process"]
        if door is not None:
            yield GaugeMetricFamily(
                "mailfence_door_process_up",
                "1 while the strangers' door process accepts; 0 while the relay's own doors"
                " stand in for it (starting, or died and not yet started again).",
                value=1 if door["running"] else 0,
            )
            yield CounterMetricFamily(
                "mailfence_door_process_restarts",
                "Times the strangers' door process died and was started again.",
                value=door["restarts"],
            )
        yield GaugeMetricFamily(
            "mailfence_under_attack",
            "1 while the defense is in under-attack mode.",
            value=1 if f["under_attack"] else 0,
        )

        auth_seconds = HistogramMetricFamily(
            "mailfence_auth_duration_seconds",
            "Time from AUTH to its answer, by lane.",
            labels=["lane"],
        )
        for lane, (counts, total) in sorted(f["auth_seconds"].items()):
            auth_seconds.add_metric([lane], _buckets(counts), total)
        yield auth_seconds
        counts, total = f["to_250_seconds"]
        to_250 = HistogramMetricFamily(
            "mailfence_time_to_250_seconds",
            "Time from the end of DATA to the 250 reply (the durable commit).",
        )
        to_250.add_metric([], _buckets(counts), total)
        yield to_250


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    cumulative, result = 0, []
    bounds = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    for bound, n in zip(bounds, counts, strict=True):
        cumulative += n
        result.append((bound, float(cumulative)))
    return result


class MetricsServer:
    def __init__(self, host: str, port: int, figures: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(figures))
        self.host, self.port = host, port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Binds and serves on a thread; returns the bound port. Raises OSError."""
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
