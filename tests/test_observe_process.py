"""The operator's view of a real `mailfence serve` process: full-screen top under tmux, and
the JSON log a flood leaves behind."""

from __future__ import annotations

import base64
import json
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailfence.testing import Sink, client_tls_context

from .conftest import ServeProcess

ServeFactory = Callable[..., ServeProcess]
PASSWORD = "s3cret-Password-never-logged"


TMUX = shutil.which("tmux") or "tmux"


def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TMUX, "-L", "mailfence-test", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is installed by .ci/run")
def test_top_full_screen_under_tmux(serve_process: ServeFactory, sink: Sink) -> None:
    relay = serve_process(sink.port).start()
    command = f"{sys.executable} -m mailfence top --config {relay.config_path}"
    assert tmux("new-session", "-d", "-s", "top", "-x", "150", "-y", "50", command).returncode == 0
    try:
        deadline = time.monotonic() + 20
        screen = ""
        while "live connections" not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = tmux("capture-pane", "-p", "-t", "top").stdout
        assert "live connections" in screen, screen
        assert "mailfence  OK" in screen and "verification pool" in screen
        # It refreshes: a session opened now shows up in the live connections.
        client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
        client.ehlo()
        while "127.0.0.1" not in screen and time.monotonic() < deadline:
            time.sleep(0.2)
            screen = tmux("capture-pane", "-p", "-t", "top").stdout
        assert "127.0.0.1" in screen, screen
        client.quit()
        # q leaves cleanly: the program exits, so tmux's session ends.
        tmux("send-keys", "-t", "top", "q")
        while tmux("has-session", "-t", "top").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tmux("has-session", "-t", "top").returncode != 0
    finally:
        tmux("kill-server")


def _auth(client: smtplib.SMTP, user: str, password: str) -> int:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + blob)[0]


@pytest.mark.slow
def test_json_log_sessions_and_flood_summary(
    serve_process: ServeFactory, sink: Sink, tmp_path: Path
) -> None:
    relay = serve_process(
        sink.port,
        # A window the ten logins below fit in on a busy machine (each is one argon2 hash).
        extra='[log]\nformat = "json"\nflood_lines = 3\nflood_window = "5s"\n'
        "[defense]\nban_after_failures = 1000\nconnection_rate_per_ip = 1000\n",
    )
    added = relay.cli("users", "add", "carol@example.com", "--password-stdin", stdin=PASSWORD)
    assert added.returncode == 0, added.stderr
    relay.start()
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
    client.starttls(context=client_tls_context())
    client.ehlo()
    assert _auth(client, "carol@example.com", PASSWORD) == 235
    client.sendmail("carol@example.com", ["x@example.org"], "Subject: hi\r\n\r\nhello\r\n")
    client.quit()
    for n in range(10):  # a small flood of wrong logins from one address, one session each
        bot = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10)
        bot.starttls(context=client_tls_context())
        bot.ehlo()
        _auth(bot, "carol@example.com", f"guess {n}")
        bot.quit()
    time.sleep(6.0)  # the flood window ends; the summary is written on the next tick
    relay.signal(15)
    assert relay.wait(30) == 0
    lines = [json.loads(line) for line in relay.log.read_text().splitlines() if line.strip()]
    assert PASSWORD not in relay.log.read_text()
    sessions = [line for line in lines if line.get("event") == "session"]
    customer = [s for s in sessions if s["user"] == "carol@example.com"]
    assert len(customer) == 1
    assert customer[0]["tls"] is True and customer[0]["auth"] == "ok"
    assert len(customer[0]["messages"]) == 1
    queued = [line for line in lines if line.get("event") == "queued"]
    assert [q["id"] for q in queued] == customer[0]["messages"]
    # The delivery process logs the same way: one object per attempt, with each result.
    deliveries = [line for line in lines if line.get("event") == "delivery"]
    assert [(d["id"], d["delivered"]) for d in deliveries] == [(queued[0]["id"], 1)]
    assert deliveries[0]["results"]["x@example.org"].startswith("delivered 250")
    # Ten failed logins: three lines, then a summary that counts the other seven.
    failed = [line for line in lines if line.get("event") == "auth" and line["outcome"] == "failed"]
    assert len(failed) == 3
    summaries = {line["category"]: line for line in lines if line.get("event") == "flood_summary"}
    assert summaries["auth failed"]["suppressed"] == 7
    assert summaries["auth failed"]["top_sources"][0]["peer"] == "127.0.0.1"
    assert all(line["level"] in ("info", "warning", "error") for line in lines)
    # The minute in progress was written to the history at shutdown: nothing lost to a stop.
    stats = relay.cli("stats", "--json", "--since", "2h")
    assert stats.returncode == 0, stats.stderr
    rows = json.loads(stats.stdout)["history"]
    totals = {key: sum(row[key] for row in rows) for key in ("accepted", "delivered", "auth_ok")}
    assert totals == {"accepted": 1, "delivered": 1, "auth_ok": 1}
    assert sum(row["auth_failed"] for row in rows) == 10
