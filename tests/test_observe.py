"""Seeing and steering a running relay: the control socket, top, stats, status, metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import smtplib
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailfence.observe import control
from mailfence.observe import live as live_module
from mailfence.store import connect, history
from mailfence.testing import RunningRelay, Sink, client_tls_context

from .conftest import ALICE, ALICE_PASSWORD, StartRelay


def cli(relay: RunningRelay, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{relay.config.state_dir}"\n')
    return subprocess.run(
        [sys.executable, "-m", "mailfence", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "160", "LINES": "60"},
    )


def session(relay: RunningRelay, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10, source_address=(source, 0))
    client.starttls(context=client_tls_context())
    client.ehlo()
    return client


def auth(client: smtplib.SMTP, user: str, password: str) -> int:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + blob)[0]


def send(relay: RunningRelay, n: int) -> None:
    client = session(relay)
    assert auth(client, ALICE, ALICE_PASSWORD) == 235
    client.sendmail(ALICE, ["bob@example.org"], f"Subject: {n}\r\n\r\nhello\r\n")
    client.quit()


def snapshot(relay: RunningRelay, sessions: int = 50) -> dict[str, Any]:
    answer = control.request(relay.config.control_socket, "snapshot", {"sessions": sessions})
    assert answer["ok"], answer
    result: dict[str, Any] = answer["snapshot"]
    return result


def wait_for_the_tick(relay: RunningRelay, accepted: int) -> None:
    """Until a tick has folded `accepted` messages into the rates and the exported figures
    (once a second, later on a busy machine)."""
    wait_for(lambda: round(snapshot(relay)["rates"]["10s"]["accepted"] * 10) >= accepted)


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def scripted_load(relay: RunningRelay) -> smtplib.SMTP:
    """Three messages, two wrong passwords from 127.44.0.7, one session left open."""
    for n in range(3):
        send(relay, n)
    wrong = session(relay, "127.44.0.7")
    assert auth(wrong, ALICE, "wrong one") == 454
    assert auth(wrong, ALICE, "wrong two") == 454
    wrong.quit()
    return session(relay, "127.45.0.9")  # stays open: top must list it


def test_snapshot_counts_what_happened(relay: RunningRelay, sink: Sink) -> None:
    idle = scripted_load(relay)
    sink.wait_for(3)
    wait_for(lambda: snapshot(relay)["totals"]["delivered"] == 3)
    shot = snapshot(relay)
    totals = shot["totals"]
    assert totals["auth_ok"] == 3 and totals["auth_failed"] == 2 and totals["accepted"] == 3
    assert totals["connections"] == 5  # 3 senders, the wrong one, the idle one
    assert shot["top_sources"] == [{"source": "127.44.0.7/32", "failures": 2}]
    assert shot["top_users"] == [{"user": ALICE, "failures": 2}]
    assert [s["source"] for s in shot["sessions"]] == ["127.45.0.9"]
    assert shot["sessions"][0]["tls"] is True and shot["sessions"][0]["bytes"] > 0
    assert shot["health"]["state"] == "ok"
    # Rates over the last 10 s see the same events (one-second ticks, so wait for one).
    assert shot["rates"]["10s"]["accepted"] == pytest.approx(0.3)
    assert sum(shot["series"]["auth_failed"]) == 2
    idle.quit()


def test_top_once_shows_the_numbers(relay: RunningRelay, sink: Sink, tmp_path: Path) -> None:
    idle = scripted_load(relay)
    wait_for_the_tick(relay, accepted=3)
    result = cli(relay, tmp_path, "top", "--once")
    assert result.returncode == 0, result.stderr
    screen = result.stdout
    assert "OK" in screen.splitlines()[0]
    rows = {line.split("│")[1].strip(): line for line in screen.splitlines() if "│" in line}
    assert "0.3" in rows["messages accepted"].split("│")[2]
    assert "0.2" in rows["AUTH failed"].split("│")[2]
    assert "127.44.0.7/32" in screen and ALICE in screen
    assert "127.45.0.9" in screen and "live connections: 1 sessions" in screen
    idle.quit()


def test_stats_json_schema_live_and_history(
    relay: RunningRelay, sink: Sink, tmp_path: Path
) -> None:
    send(relay, 1)
    wait_for_the_tick(relay, accepted=1)
    result = cli(relay, tmp_path, "stats", "--json", "--since", "24h")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["version"] == 1 and isinstance(document["history"], list)
    live = document["live"]
    assert set(live) == {
        "version",
        "time",
        "uptime",
        "health",
        "under_attack",
        "connections",
        "totals",
        "rates",
        "series",
        "pool",
        "spool",
        "time_to_250_p99_ms",
        "top_sources",
        "top_users",
        "recent_bans",
    }
    assert set(live["totals"]) == set(live_module.SERIES) == set(live["rates"]["10s"])
    assert all(len(points) == live_module.SPARK_POINTS for points in live["series"].values())
    assert live["totals"]["accepted"] == 1
    assert set(live["pool"]["queued"]) == {"known", "retry", "unknown"}
    assert live["time_to_250_p99_ms"] is not None


def test_stats_history_works_without_a_server(tmp_path: Path) -> None:
    state = tmp_path / "state"
    from mailfence.store import open_database

    conn = open_database(state)
    now = time.time()
    hour = int(now) // 3600 * 3600
    with conn:
        history.add_minute(conn, hour - 7200, {"connections": 5, "auth_failed": 2}, [0, 3, 1])
        history.add_minute(conn, hour, {"connections": 1, "accepted": 2}, [1, 0, 0])
        history.add_minute(conn, hour, {"connections": 2, "accepted": 1}, [0, 0, 2])
        history.add_minute(conn, hour - 40 * 86400, {"connections": 9}, [])
        history.prune(conn, now)
    conn.close()
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{state}"\n')
    run = [sys.executable, "-m", "mailfence", "stats", "--json", "--config", str(config)]
    result = subprocess.run([*run, "--since", "24h"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["live"] is None
    rows = document["history"]
    assert [r["hour"] for r in rows] == [hour - 7200, hour]  # the 40-day-old row was pruned
    assert rows[1]["connections"] == 3 and rows[1]["accepted"] == 3
    assert rows[1]["p99_to_250_ms"] == pytest.approx(5.0)  # the third bucket: ≤ 5 ms
    assert rows[0]["auth_failed"] == 2
    # Live figures need the server: one line, exit 1.
    result = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("mailfence: no mailfence server is running")


def test_the_relay_rolls_up_a_minute_into_history(relay: RunningRelay, sink: Sink) -> None:
    send(relay, 1)
    wait_for_the_tick(relay, accepted=1)
    server = relay.server
    done: list[bool] = []

    def roll_up() -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(server._roll_up(server.history_minute))
        task.add_done_callback(lambda t: done.append(t.exception() is None))

    relay.call(roll_up)
    wait_for(lambda: bool(done))
    assert done == [True]
    conn = connect(relay.config.database_path)
    rows = history.since(conn, time.time() - 3600)
    conn.close()
    assert sum(r["accepted"] for r in rows) == 1 and sum(r["auth_ok"] for r in rows) == 1


def test_a_failed_roll_up_keeps_its_figures_for_the_next(relay: RunningRelay, sink: Sink) -> None:
    """A roll-up the database refused (a real SQLite error, from a trigger) loses nothing:
    the next roll-up writes that minute's figures with its own."""
    send(relay, 1)
    wait_for_the_tick(relay, accepted=1)
    server = relay.server
    outcomes: list[BaseException | None] = []

    def roll_up() -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(server._roll_up(server.history_minute))
        task.add_done_callback(lambda t: outcomes.append(t.exception()))

    with sqlite3.connect(relay.config.database_path, timeout=10) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_history BEFORE INSERT ON stats_hourly"
            " BEGIN SELECT RAISE(ABORT, 'disk full (test)'); END"
        )
    relay.call(roll_up)
    wait_for(lambda: len(outcomes) == 1)
    assert isinstance(outcomes[0], sqlite3.Error)
    with sqlite3.connect(relay.config.database_path, timeout=10) as conn:
        conn.execute("DROP TRIGGER refuse_history")
    relay.call(roll_up)
    wait_for(lambda: len(outcomes) == 2)
    assert outcomes[1] is None
    conn = connect(relay.config.database_path)
    rows = history.since(conn, time.time() - 3600)
    conn.close()
    assert sum(r["accepted"] for r in rows) == 1 and sum(r["auth_ok"] for r in rows) == 1


def test_a_stop_just_after_the_hour_files_the_last_minute_under_its_own_hour(
    relay: RunningRelay, sink: Sink
) -> None:
    """The relay last rolled up in the final minute of the previous hour; it stops before its
    tick notices the new one. What it counted since belongs to the previous hour."""
    if time.time() % 60 > 55:  # the test's own few seconds must not cross a real minute
        time.sleep(61 - time.time() % 60)
    this_hour = int(time.time()) // 3600 * 3600
    send(relay, 1)
    # As if the last roll-up was in the previous hour's last minute. Whether the relay's
    # tick or its shutdown rolls up next, the figures belong to that minute's hour.
    relay.call(lambda: setattr(relay.server, "history_minute", this_hour // 60 - 1))
    relay.stop()
    conn = connect(relay.config.database_path)
    rows = history.since(conn, this_hour - 3600)
    conn.close()
    assert [(r["hour"], r["accepted"]) for r in rows if r["accepted"]] == [(this_hour - 3600, 1)]


def test_metrics_parse_and_move(relay: RunningRelay, sink: Sink) -> None:
    port = relay.server.metrics_port

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    before = scrape()
    assert before["mailfence_health{state=ok}"] == 1
    send(relay, 1)
    wrong = session(relay, "127.44.0.8")
    assert auth(wrong, ALICE, "nope") == 454
    wrong.quit()
    # The next tick exports both (once a second, later on a busy machine).
    wait_for(lambda: scrape().get("mailfence_auth_total{lane=unknown,outcome=failed}") == 1)
    after = scrape()
    assert after["mailfence_messages_total{outcome=accepted}"] == 1
    assert after["mailfence_auth_total{lane=unknown,outcome=ok}"] == 1
    assert after["mailfence_auth_total{lane=unknown,outcome=failed}"] == 1
    assert after["mailfence_connections_total{outcome=accepted}"] >= 2
    assert after["mailfence_accepted_by_queue_total{queue=common}"] >= 2  # nobody known yet
    assert after["mailfence_time_to_250_seconds_count{}"] == 1
    assert after["mailfence_auth_duration_seconds_count{lane=unknown}"] == 2
    assert "mailfence_verify_queue_length{lane=unknown}" in after
    assert "mailfence_connections_open{}" in after


def test_status_exit_codes(start_relay: StartRelay, tmp_path: Path) -> None:
    relay = start_relay(defense={"attack_failures_per_minute": 3, "attack_failing_sources": 1000})
    ok = cli(relay, tmp_path, "status")
    assert (ok.returncode, ok.stdout.split(":")[0]) == (0, "ok")
    for n in range(3):
        client = session(relay, f"127.46.{n}.1")
        assert auth(client, "nobody@example.com", f"guess {n}") == 454
        client.quit()
    wait_for(lambda: cli(relay, tmp_path, "status").returncode == 2)
    attacked = cli(relay, tmp_path, "status")
    assert attacked.stdout.startswith("under_attack: 3 failed logins/min")
    relay.stop()
    gone = cli(relay, tmp_path, "status")
    assert gone.returncode == 3 and "no mailfence server is running" in gone.stderr


def test_degraded_and_back_with_one_webhook_post_per_change(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    posts: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        dead_upstream = socket.socket()
        dead_upstream.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        relay = start_relay(
            relay={"upstream": f"smtp://127.0.0.1:{dead_upstream.getsockname()[1]}"},
            spool={"max_messages": 4},
            health={
                "webhooks": (f"http://127.0.0.1:{receiver.server_port}/hook",),
                "spool_degraded": 0.5,
            },
        )
        for n in range(3):  # 3 of 4 queued: over half full
            send(relay, n)
        wait_for(lambda: cli(relay, tmp_path, "status").returncode == 1)
        degraded = cli(relay, tmp_path, "status")
        assert degraded.stdout.startswith("degraded: queue 3 of 4 messages")
        # Tried and refused by the dead upstream: deferred, as the snapshot and metrics say.
        wait_for(lambda: snapshot(relay)["spool"]["by_state"] == {"new": 0, "deferred": 3})
        for message in json.loads(cli(relay, tmp_path, "queue", "list", "--json").stdout):
            assert cli(relay, tmp_path, "queue", "delete", message["id"]).returncode == 0
        wait_for(lambda: cli(relay, tmp_path, "status").returncode == 0)
        wait_for(lambda: len(posts) == 2)
        time.sleep(1.5)  # and no more than one each
        assert [(p["previous"], p["state"]) for p in posts] == [
            ("ok", "degraded"),
            ("degraded", "ok"),
        ]
        assert posts[0]["reason"].startswith("queue 3 of 4 messages")
        assert posts[0]["figures"]["spool"] == 3
        dead_upstream.close()
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_control_socket_is_private_and_single(relay: RunningRelay) -> None:
    path = relay.config.control_socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = RunningRelay(relay.config)
    with pytest.raises(Exception, match="another mailfence is running"):
        second.start()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_control_socket_answers_only_its_own_user_even_if_opened_up(relay: RunningRelay) -> None:
    path = relay.config.control_socket
    # An operator's mistake: the socket opened to everyone, reachable through a directory
    # anyone can enter (a hard link in one; pytest's own directories are private).
    path.chmod(0o666)
    public = Path(tempfile.mkdtemp(prefix="mailfence-public-"))
    public.chmod(0o755)
    exposed = public / "control.sock"
    os.link(path, exposed)
    script = (
        "import os, sys\n"
        "from mailfence.observe import control\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "print(control.request(__import__('pathlib').Path(sys.argv[1]), 'snapshot'))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, str(exposed)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        shutil.rmtree(public)
    assert "not allowed: another user" in result.stdout, result.stderr
    assert control.request(path, "health")["ok"]  # its own user still gets in


def test_control_socket_path_too_long_names_the_fix(tmp_path: Path) -> None:
    import asyncio

    long_path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(control.ControlError, match=r"set \[control\] socket to a shorter path"):
        asyncio.run(control.ControlServer(long_path, {}).start())


def test_stale_control_socket_is_replaced(start_relay: StartRelay, tmp_path: Path) -> None:
    relay = start_relay()
    path = relay.config.control_socket
    relay.stop()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # a socket file nobody listens on, as a killed server leaves
    leftover.close()
    again = RunningRelay(relay.config).start()
    try:
        assert control.request(path, "health")["state"] == "ok"
    finally:
        again.stop()


def test_control_requests_are_bounded(relay: RunningRelay) -> None:
    path = str(relay.config.control_socket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(b"x" * (control.MAX_REQUEST_BYTES + 10) + b"\n")
        answer = json.loads(conn.makefile("rb").readline())
    assert answer == {"ok": False, "error": "bad request: one JSON object per line"}
    assert control.request(relay.config.control_socket, "nonsense")["ok"] is False
    # More clients than the bound at once: the extra one is told so, the others still work.
    held = []
    try:
        for _ in range(control.MAX_CLIENTS):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
            held.append(conn)
        wait_for(lambda: relay.server.control.clients == control.MAX_CLIENTS)
        answer = control.request(relay.config.control_socket, "health")
        assert answer == {"ok": False, "error": "too many control clients"}
    finally:
        for conn in held:
            conn.close()
    wait_for(lambda: relay.server.control.clients == 0)
    assert control.request(relay.config.control_socket, "health")["ok"] is True


def test_snapshot_session_list_is_bounded(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients = [session(relay, f"127.47.0.{n}") for n in range(1, 4)]
    assert len(snapshot(relay, sessions=2)["sessions"]) == 2
    monkeypatch.setattr(live_module, "MAX_SESSIONS_SHOWN", 1)
    shot = snapshot(relay, sessions=10_000)
    assert len(shot["sessions"]) == 1 and shot["connections"]["sessions"] == 3
    assert shot["sessions"][0]["source"] == "127.47.0.1"  # the oldest first
    assert sum(shot["connections"]["by_state"].values()) == 3
    for client in clients:
        client.quit()
    wait_for(lambda: snapshot(relay)["connections"]["sessions"] == 0)
    assert snapshot(relay)["connections"]["by_state"] == {}


def test_events_stream_bans(relay: RunningRelay, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(relay.config.control_socket))
        conn.sendall(b'{"cmd": "events"}\n')
        stream = conn.makefile("rb")
        assert json.loads(stream.readline())["event"] == "subscribed"
        result = cli(relay, tmp_path, "ban", "127.48.0.0/24", "--for", "1h")
        assert result.returncode == 0 and "applied by the running server" in result.stdout
        event = json.loads(stream.readline())
        assert event["event"] == "defense_changed"
    shot = snapshot(relay)
    assert shot["recent_bans"][0]["network"] == "127.48.0.0/24"
    assert shot["recent_bans"][0]["source"] == "manual"


def test_explain_shows_live_counters(relay: RunningRelay, tmp_path: Path) -> None:
    client = session(relay, "127.49.0.3")
    assert auth(client, ALICE, "bad 1") == 454
    assert auth(client, "bob@example.com", "bad 2") == 454
    result = cli(relay, tmp_path, "explain", "127.49.0.3", "--json")
    client.quit()
    live = json.loads(result.stdout)["live"]
    assert live["distinct_wrong_passwords"] == 2
    assert live["usernames_tried"] == [ALICE, "bob@example.com"]
    assert live["open_connections_from_source"] == 1
    assert live["refused_connections_in_window"] == 0
    text = cli(relay, tmp_path, "explain", "127.49.0.3").stdout
    assert "2 distinct wrong password(s)" in text
    assert "refused 0 time(s) in that window (ban at 600)" in text


def test_a_new_user_can_log_in_as_soon_as_the_command_returns(
    relay: RunningRelay, tmp_path: Path
) -> None:
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailfence",
            "users",
            "add",
            "dave@example.com",
            "--password-stdin",
            "--config",
            str(_cli_config(relay, tmp_path)),
        ],
        input="dave's password\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    assert "dave@example.com" in relay.server.accounts.users  # told, not polled
    client = session(relay, "127.50.0.1")
    assert auth(client, "dave@example.com", "dave's password") == 235
    client.quit()
    assert control.request(relay.config.control_socket, "users-changed")["users"] == 2


def _cli_config(relay: RunningRelay, tmp_path: Path) -> Path:
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{relay.config.state_dir}"\n')
    return config


def test_control_socket_bans_and_unbans_at_once(relay: RunningRelay) -> None:
    from .test_defense_e2e import banner

    path = relay.config.control_socket
    answer = control.request(
        path, "ban", {"network": "127.51.0.9", "seconds": 3600, "reason": "from a script"}
    )
    assert answer["ok"] and answer["network"] == "127.51.0.9/32"
    assert banner(relay, "127.51.0.9").startswith(b"421 ")  # no second's wait
    assert snapshot(relay)["recent_bans"][0]["reason"] == "from a script"
    assert control.request(path, "unban", {"network": "127.51.0.9"})["lifted"] == 1
    assert banner(relay, "127.51.0.9").startswith(b"220 ")
    again = control.request(path, "unban", {"network": "127.51.0.9"})
    assert again == {"ok": False, "error": "no ban in force on exactly 127.51.0.9/32"}
    bad = control.request(path, "ban", {"network": "not-an-address"})
    assert bad["ok"] is False and "is not an address" in bad["error"]
    for seconds in (float("nan"), float("inf"), "soon", -5):
        refused = control.request(path, "ban", {"network": "127.53.0.1", "seconds": seconds})
        assert refused["ok"] is False and "seconds must be a number" in refused["error"]
    typo = control.request(path, "ban", {"network": "127.53.0.2", "permanent": "false"})
    assert typo["ok"] and typo["until"] is not None  # only JSON true makes a ban permanent
    permanent = control.request(path, "ban", {"network": "127.52.0.0/24", "permanent": True})
    assert permanent["until"] is None
    assert banner(relay, "127.52.0.4").startswith(b"554 ")


def test_control_close_lets_a_running_command_finish(tmp_path: Path) -> None:
    """A command in progress (a ban being written) is not cut off when the server stops: the
    server closes the database only after close() returns."""
    import asyncio

    finished: list[str] = []

    async def slow_ban(request: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        finished.append(str(request.get("network")))
        return {}

    async def main() -> None:
        server = control.ControlServer(tmp_path / "control.sock", {"ban": slow_ban})
        await server.start()
        loop = asyncio.get_running_loop()
        asking = loop.run_in_executor(
            None, lambda: control.request(tmp_path / "control.sock", "ban", {"network": "x"})
        )
        for _ in range(100):  # bounded: until the command is under way (1 s at most)
            if server._running:
                break
            await asyncio.sleep(0.01)
        assert server._running and not finished
        await server.close()
        assert finished == ["x"]
        with contextlib.suppress(control.NotRunning, OSError):
            await asking

    asyncio.run(main())


def test_control_command_sent_after_close_is_refused(tmp_path: Path) -> None:
    """A client that connected before the server began to stop, and sends its command after:
    the command is not carried out (the database is about to close), and it is told why."""
    import asyncio

    carried_out: list[str] = []

    async def ban(request: dict[str, Any]) -> dict[str, Any]:
        carried_out.append(str(request.get("network")))
        return {}

    async def main() -> None:
        path = tmp_path / "control.sock"
        server = control.ControlServer(path, {"ban": ban})
        await server.start()
        reader, writer = await asyncio.open_unix_connection(str(path))
        await asyncio.sleep(0.05)  # accepted: the server is reading its request
        await server.close()
        writer.write(json.dumps({"cmd": "ban", "network": "x"}).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), 5.0))
        writer.close()
        assert carried_out == []
        assert answer == {"ok": False, "error": control.SHUTTING_DOWN}

    asyncio.run(main())


def test_control_command_abandoned_by_shutdown_still_logs_its_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The request's task is cancelled (the server is stopping) while its command goes on,
    shielded; when the command then fails, nobody reads its answer, so the log must say so."""
    import asyncio

    release = asyncio.Event()

    async def failing_ban(request: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        raise RuntimeError("disk I/O error")

    async def main() -> None:
        path = tmp_path / "control.sock"
        server = control.ControlServer(path, {"ban": failing_ban})
        await server.start()
        _reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(json.dumps({"cmd": "ban", "network": "x"}).encode() + b"\n")
        for _ in range(100):  # bounded: until the command is under way (1 s at most)
            if server._running:
                break
            await asyncio.sleep(0.01)
        command = next(iter(server._running))
        requests = [
            task
            for task in asyncio.all_tasks()
            if task is not asyncio.current_task() and task is not command
        ]
        assert requests, "the request's own task should be running"
        for task in requests:
            task.cancel()
        await asyncio.sleep(0.05)
        assert not command.done()  # shielded: cancelling the request left the command going
        release.set()
        await asyncio.sleep(0.05)
        assert command.done()
        writer.close()
        await server.close()

    with caplog.at_level("ERROR", logger="mailfence.control"):
        asyncio.run(main())
    failures = [r for r in caplog.records if "control command 'ban' failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and "disk I/O error" in str(failures[0].exc_info[1])
