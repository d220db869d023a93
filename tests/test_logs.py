"""Log lines as JSON, and floods folded into summaries, replayed with a fake clock."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from mailfence.observe.logs import (
    MAX_TRACKED,
    BoundedCounter,
    FloodLimiter,
    JsonFormatter,
    configure_logging,
)

AUTH_REFUSED = "auth refused"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def flood_record(peer: str, user: str = "admin") -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "mailfence.smtp",
            "levelno": logging.INFO,
            "msg": "auth refused",
            "flood": AUTH_REFUSED,
            "fields": {"peer": peer, "user": user},
        }
    )


@pytest.fixture
def limited() -> tuple[FloodLimiter, Collect, Clock]:
    clock = Clock()
    handler = Collect()
    limiter = FloodLimiter(lines=20, window=10.0, clock=clock)
    limiter.attach(handler)
    return limiter, handler, clock


@pytest.fixture
def mailfence_logger() -> Iterator[logging.Logger]:
    """The "mailfence" logger, put back as it was: other tests rely on it propagating."""
    from mailfence.observe import logs

    logger = logging.getLogger("mailfence")
    saved = logger.handlers[:], logger.level, logger.propagate
    active = logs._active  # configure_logging makes its limiter the hot paths' one
    yield logger
    for handler in logger.handlers:
        handler.close()
    logger.handlers[:], logger.level, logger.propagate = saved
    logs._active = active


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_fields(mailfence_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    log = logging.getLogger("mailfence.smtp")
    log.debug("not at info")
    log.info("accepted %s", "msg-1", extra={"fields": {"peer": "192.0.2.7", "size": 1234}})
    try:
        raise RuntimeError("upstream went away")
    except RuntimeError:
        log.exception("delivery failed", extra={"fields": {"queue_id": "q1"}})
    first, second = json_lines(stream)
    assert first["level"] == "info" and first["logger"] == "mailfence.smtp"
    assert first["message"] == "accepted msg-1"
    assert first["peer"] == "192.0.2.7" and first["size"] == 1234
    assert str(first["time"]).endswith("Z") and len(str(first["time"])) == 24
    assert second["level"] == "error" and second["queue_id"] == "q1"
    assert "RuntimeError: upstream went away" in str(second["exception"])


def test_json_never_raises_on_odd_input() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no")

    record = logging.makeLogRecord(
        {
            "msg": "%d items",
            "args": ("many",),  # a wrong format argument
            "fields": {
                "level": "forged",
                "address": object(),
                "tags": {"a"},
                "ratio": float("nan"),
                "table": {(1, 2): "tuple key"},
                "odd": Unprintable(),
            },
        }
    )
    document = json.loads(JsonFormatter().format(record))
    assert document["level"] != "forged"
    assert "%d items" in str(document["message"])
    assert str(document["address"]).startswith("<object object")
    assert document["odd"] == "<unprintable Unprintable>"


def test_text_format(mailfence_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("text", "warning", stream)
    logging.getLogger("mailfence.defense").info("quiet")
    logging.getLogger("mailfence.defense").warning("banned %s", "198.51.100.0/24")
    assert stream.getvalue().rstrip().endswith("WARNING mailfence.defense: banned 198.51.100.0/24")


def test_configure_twice_keeps_one_handler(mailfence_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("text", "info", first)
    configure_logging("json", "info", second)
    assert len(mailfence_logger.handlers) == 1 and not mailfence_logger.propagate
    logging.getLogger("mailfence").info("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in json_lines(second)] == ["once"]


def test_a_flood_is_cut_and_summarised(limited: tuple[FloodLimiter, Collect, Clock]) -> None:
    limiter, handler, clock = limited
    peers = ["127.66.0.5"] * 15 + ["127.66.0.9"] * 7 + ["127.66.0.1"] * 3
    for peer in peers:
        handler.handle(flood_record(peer))
    assert len(handler.records) == 20
    clock.now += 9.9
    assert limiter.flush() == []
    clock.now += 0.1
    (summary,) = limiter.flush()
    assert handler.records[-1] is summary
    assert summary.name == "mailfence.flood" and summary.levelno == logging.WARNING
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["event"] == "flood_summary" and fields["category"] == AUTH_REFUSED
    # The first 20 passed (15 from .5, 5 from .9); the 5 suppressed: 2 from .9, 3 from .1.
    assert fields["suppressed"] == 5
    assert fields["top_sources"] == [
        {"peer": "127.66.0.1", "count": 3},
        {"peer": "127.66.0.9", "count": 2},
    ]
    assert fields["top_users"] == [{"user": "admin", "count": 5}]
    assert summary.getMessage() == (
        "flood: 5 'auth refused' lines suppressed in the last 10 s; "
        "top sources 127.66.0.1 (3), 127.66.0.9 (2); top users admin (5)"
    )
    # A new window: the category may speak again, and a quiet window has no summary.
    handler.handle(flood_record("127.66.0.5"))
    assert handler.records[-1].getMessage() == "auth refused"
    clock.now += 10
    assert limiter.flush() == []


def test_the_window_also_ends_on_the_next_record(
    limited: tuple[FloodLimiter, Collect, Clock],
) -> None:
    _, handler, clock = limited
    for _ in range(21):
        handler.handle(flood_record("192.0.2.1"))
    clock.now += 10
    handler.handle(flood_record("192.0.2.1"))
    summary, record = handler.records[-2:]
    assert summary.getMessage().startswith("flood: 1 'auth refused' lines suppressed")
    assert record.getMessage() == "auth refused"


def test_other_records_are_never_suppressed(
    limited: tuple[FloodLimiter, Collect, Clock],
) -> None:
    limiter, handler, _ = limited
    for n in range(100):
        handler.handle(flood_record("192.0.2.1"))
        handler.handle(logging.makeLogRecord({"msg": f"delivered {n}"}))
    assert sum(record.getMessage().startswith("delivered") for record in handler.records) == 100
    assert limiter.suppressed[AUTH_REFUSED].lines == 80


def test_memory_stays_bounded_whatever_the_flood(
    limited: tuple[FloodLimiter, Collect, Clock],
) -> None:
    limiter, _, clock = limited
    heavy = "203.0.113.66"
    record = flood_record("")
    others = 0
    for n in range(200_000):
        # 100,000 distinct addresses: one in every fifth record, the rest spread thin.
        if n % 5:
            peer, others = f"10.{others % 99_999}", others + 1
        else:
            peer = heavy
        record.fields = {"peer": peer}
        limiter.filter(record)
        if n >= 20:
            assert len(limiter.suppressed[AUTH_REFUSED].peers) <= MAX_TRACKED
    clock.now += 10
    (summary,) = limiter.flush()
    fields = summary.fields  # type: ignore[attr-defined]
    assert fields["suppressed"] == 200_000 - 20  # the total stays exact
    assert fields["top_sources"][0]["peer"] == heavy  # the heavy one is still named
    assert not fields["exact_counts"]
    assert "lower bounds" in summary.getMessage()


def test_the_counter_is_exact_below_its_bound() -> None:
    counter = BoundedCounter(bound=3)
    for key in "abacab":
        counter.add(key)
    assert counter.most_common(2) == [("a", 3), ("b", 2)] and counter.exact
    counter.add("d")  # a fourth key: every count pays one
    assert counter.most_common(3) == [("a", 2), ("b", 1)] and not counter.exact


def test_hot_paths_skip_records_the_limiter_would_drop(
    mailfence_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailfence.observe import logs

    stream = io.StringIO()
    limiter = configure_logging("json", "info", stream, flood_lines=2, flood_window=60.0)
    assert logs._active is limiter
    written = 0
    for n in range(5):
        fields = {"peer": f"192.0.2.{n % 2}", "user": "admin"}
        if not logs.suppressed("auth refused", fields):
            mailfence_logger.info("refused", extra={"flood": "auth refused", "fields": fields})
            written += 1
    assert written == 2 and len(json_lines(stream)) == 2
    lost = limiter.suppressed["auth refused"]
    assert lost.lines == 3 and dict(lost.peers.counts) == {"192.0.2.0": 2, "192.0.2.1": 1}
    # Without a configured limiter (tests, libraries), nothing is ever suppressed.
    monkeypatch.setattr(logs, "_active", None)
    assert not logs.suppressed("auth refused", {})
