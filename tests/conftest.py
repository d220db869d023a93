from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailfence.config import Config
from mailfence.testing import RunningRelay, Sink, add_user, client_tls_context, relay_config

ALICE = "alice@example.com"
ALICE_PASSWORD = "correct horse battery staple"


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as running:
        yield running


StartRelay = Callable[..., RunningRelay]


@pytest.fixture
def start_relay(tmp_path: Path, sink: Sink) -> Iterator[StartRelay]:
    """Starts a relay delivering to `sink`, with alice allowed to send as *@example.com."""
    started: list[RunningRelay] = []

    def start(config: Config | None = None, **sections: Any) -> RunningRelay:
        settings = config or relay_config(tmp_path / "state", sink.port, **sections)
        if not started:
            add_user(settings, ALICE, ALICE_PASSWORD, ["*@example.com"])
        relay = RunningRelay(settings).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay: StartRelay) -> RunningRelay:
    return start_relay()


def starttls_client(relay: RunningRelay, login: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
    try:
        client.starttls(context=client_tls_context())
        if login:
            client.login(ALICE, ALICE_PASSWORD)
    except BaseException:
        client.close()  # no socket left for the collector to find (a ResourceWarning)
        raise
    return client


def implicit_client(relay: RunningRelay, login: bool = True) -> smtplib.SMTP_SSL:
    client = smtplib.SMTP_SSL(
        "127.0.0.1", relay.implicit_port, timeout=10, context=client_tls_context()
    )
    if login:
        client.login(ALICE, ALICE_PASSWORD)
    return client


class ServeProcess:
    """`mailfence serve` as a real subprocess, configured by a TOML file in `directory`."""

    def __init__(self, directory: Path, upstream_port: int, extra: str = "") -> None:
        from mailfence.testing import free_port

        self.directory = directory
        self.starttls_port = free_port()
        self.implicit_port = free_port()
        self.config_path = directory / "mailfence.toml"
        self.config_path.write_text(
            f"""
state_dir = "state"
[[listen]]
address = "127.0.0.1:{self.starttls_port}"
tls = "starttls"
[[listen]]
address = "127.0.0.1:{self.implicit_port}"
tls = "implicit"
[smtp]
hostname = "relay.test"
shutdown_timeout = "5s"
[metrics]
listen = "127.0.0.1:0"
[auth]
argon2_time_cost = 1
argon2_memory_kib = 1024
[relay]
upstream = "smtp://127.0.0.1:{upstream_port}"
retry_schedule = ["0.5s"]
connect_timeout = "2s"
{extra}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "serve.log"

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailfence", *args, "--config", str(self.config_path)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=self.directory,
        )

    def start(self, env: dict[str, str] | None = None) -> ServeProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mailfence", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.starttls_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"serve did not start:\n{self.log.read_text()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def make(upstream_port: int, extra: str = "") -> ServeProcess:
        process = ServeProcess(tmp_path, upstream_port, extra)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()
