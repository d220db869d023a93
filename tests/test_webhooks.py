"""Webhooks against a real loopback HTTP receiver: delivery, retries, a hung receiver, the bound."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mailfence.observe.webhooks import THREAD_NAME, Webhooks

WAIT = 10.0  # the most any test waits for something that should take milliseconds
HANG = "hang"  # an answer that holds the request until the receiver is released


class Receiver(ThreadingHTTPServer):
    """Records each POST and answers from `answers` in turn (then 200); HANG holds the request
    until `release` is set, then answers 200."""

    def __init__(self, answers: list[int | str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, object]]] = []  # type, agent, document
        self.arrived = threading.Condition()
        self.holding = 0
        self.release = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook/secret-token"

    def wait_for(self, count: int) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.requests) >= count, WAIT)

    def documents(self) -> list[dict[str, object]]:
        with self.arrived:
            return [document for _, _, document in self.requests]

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()
        self._thread.join(WAIT)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # answering a client that gave up fails; that is the point of those tests


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        receiver = self.server
        with receiver.arrived:
            receiver.requests.append(
                (self.headers["Content-Type"], self.headers["User-Agent"], json.loads(body))
            )
            answer = receiver.answers.pop(0) if receiver.answers else 200
            receiver.holding += answer == HANG
            receiver.arrived.notify_all()
        if answer == HANG:
            receiver.release.wait(WAIT)
            with receiver.arrived:
                receiver.holding -= 1
            answer = 200
        self.send_response(int(answer))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; these tests talk to loopback directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    receivers: list[Receiver] = []

    def start(*answers: int | str) -> Receiver:
        receivers.append(Receiver(list(answers)))
        return receivers[-1]

    yield start
    for receiver in receivers:
        receiver.stop()


@pytest.fixture
def webhooks_factory() -> Iterator[Callable[..., Webhooks]]:
    started: list[Webhooks] = []

    def make(*urls: str, **settings: float) -> Webhooks:
        started.append(Webhooks(urls, **settings))  # type: ignore[arg-type]
        return started[-1]

    yield make
    for hooks in started:
        hooks.close(WAIT)


def test_one_post_per_document_to_every_url(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    first, second = receiver_factory(), receiver_factory()
    hooks = webhooks_factory(first.url, second.url)
    hooks.post({"state": "degraded", "reasons": ["spool 85% full"]})
    hooks.close(WAIT)  # sends what is queued, then stops
    for receiver in (first, second):
        assert receiver.requests == [
            (
                "application/json",
                "mailfence",
                {"state": "degraded", "reasons": ["spool 85% full"]},
            )
        ]
    assert (hooks.sent, hooks.failed, hooks.dropped) == (2, 0, 0)


def test_a_failed_attempt_is_retried(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    receiver = receiver_factory(500)
    hooks = webhooks_factory(receiver.url, backoff=0.05)
    hooks.post({"state": "ok"})
    assert receiver.wait_for(2)
    assert eventually(lambda: hooks.sent == 1)
    assert receiver.documents() == [{"state": "ok"}, {"state": "ok"}]
    assert hooks.failed == 0


def test_a_receiver_that_always_fails_is_given_up_after_the_retries(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    receiver = receiver_factory(503, 503, 503, 503)
    hooks = webhooks_factory(receiver.url, retries=3, backoff=0.01)
    hooks.post({"state": "ok"})
    assert eventually(lambda: hooks.failed == 1)
    assert len(receiver.requests) == 3
    assert hooks.sent == 0


def test_a_hung_receiver_does_not_block_post(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    receiver = receiver_factory(HANG)
    hooks = webhooks_factory(receiver.url, timeout=0.3, retries=1)
    hooks.post({"n": 1})
    assert receiver.wait_for(1)
    hooks.post({"n": 2})  # the thread is stuck in the first POST; this only queues
    assert receiver.holding == 1 and not receiver.release.is_set()
    # The first attempt is abandoned at the timeout while the receiver still holds it ...
    assert eventually(lambda: hooks.failed == 1)
    assert receiver.holding == 1
    # ... and the next document goes out.
    assert receiver.wait_for(2)
    assert eventually(lambda: hooks.sent == 1)
    assert receiver.documents() == [{"n": 1}, {"n": 2}]


def test_a_full_queue_drops_the_oldest(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    receiver = receiver_factory(HANG)
    hooks = webhooks_factory(receiver.url, timeout=WAIT, retries=1, max_pending=3)
    hooks.post({"n": 0})
    assert receiver.wait_for(1)  # the thread now waits on the receiver with document 0
    for n in range(1, 10):
        hooks.post({"n": n})
        assert hooks.pending <= 3
    assert hooks.pending == 3
    assert hooks.dropped == 6
    receiver.release.set()
    assert receiver.wait_for(4)
    assert eventually(lambda: hooks.sent == 4)
    assert receiver.documents() == [{"n": 0}, {"n": 7}, {"n": 8}, {"n": 9}]


def test_close_gives_up_on_what_it_cannot_send_in_time(
    receiver_factory: Callable[..., Receiver], webhooks_factory: Callable[..., Webhooks]
) -> None:
    receiver = receiver_factory(HANG)
    hooks = webhooks_factory(receiver.url, timeout=WAIT, retries=1)
    hooks.post({"n": 0})
    assert receiver.wait_for(1)
    hooks.post({"n": 1})
    hooks.close(0.05)
    assert hooks.dropped == 1 and hooks.pending == 0
    hooks.post({"n": 2})  # after close: ignored
    assert hooks.pending == 0
    receiver.release.set()


def test_no_url_means_no_thread() -> None:
    before = sum(thread.name == THREAD_NAME for thread in threading.enumerate())
    hooks = Webhooks([])
    hooks.post({"state": "ok"})
    assert hooks.pending == 0
    assert sum(thread.name == THREAD_NAME for thread in threading.enumerate()) == before
    hooks.close(1.0)


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Webhooks(["file:///etc/passwd"])
