"""The strangers' door in a process of its own (smtp/strangers_door.py), on real sockets."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailfence.observe import control
from mailfence.smtp import replies
from mailfence.smtp.strangers_door import StrangersDoorProcess
from mailfence.testing import RunningRelay
from tests.conftest import StartRelay
from tests.test_defense_e2e import guess


def banner(relay: RunningRelay, source: str) -> bytes:
    with socket.create_connection(
        ("127.0.0.1", relay.starttls_port), timeout=10, source_address=(source, 0)
    ) as sock:
        return sock.recv(1024)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def door_process(relay: RunningRelay) -> StrangersDoorProcess:
    door = relay.server.listeners.strangers_door
    assert door is not None
    wait_for(lambda: door.ready)
    return door


def child_pid(door: StrangersDoorProcess) -> int:
    process = door._process
    assert process is not None and process.pid is not None
    return process.pid


def hold_the_relays_loop(relay: RunningRelay, seconds: float) -> None:
    relay.call(lambda: time.sleep(seconds))  # the relay answers nothing meanwhile
    time.sleep(0.1)


def test_strangers_over_their_rate_are_refused_without_the_relays_loop(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(defense={"door_process": True, "unknown_connections_per_second": 1})
    door_process(relay)
    banner(relay, "127.68.0.1")  # the one token of the burst
    hold_the_relays_loop(relay, 3.0)
    started = time.monotonic()
    answers = [banner(relay, f"127.68.1.{n}") for n in range(1, 11)]
    # Answered while the relay's loop slept: by the door process, at once.
    assert time.monotonic() - started < 2.0
    too_many = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    assert answers.count(too_many) >= 9
    counters = relay.server.defense.counters
    wait_for(lambda: counters.connections_refused["limit"] >= 9)  # in the relay's figures
    assert relay.server.listeners.accepted_from["common"] >= 11


# A thousand strangers a second let in normally, one in under-attack mode, which three
# failing sources start.
FEW_STRANGERS_UNDER_ATTACK = {
    "door_process": True,
    "unknown_connections_per_second": 1000,
    "attack_unknown_connections_per_second": 1,
    "attack_failing_sources": 3,
}


def test_under_attack_the_door_process_lets_fewer_strangers_in(start_relay: StartRelay) -> None:
    relay = start_relay(
        defense=FEW_STRANGERS_UNDER_ATTACK,
        auth={"failure_reply": "permanent"},
    )
    door_process(relay)
    assert all(banner(relay, f"127.71.0.{n}").startswith(b"220 ") for n in range(1, 21))
    # Three strangers' wrong passwords: under-attack mode, and its rate for strangers.
    codes = [guess(relay, f"127.72.{n}.1", f"bot{n}@example.com", "guess") for n in range(3)]
    assert codes == [535] * 3
    assert relay.server.defense.under_attack
    too_many = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    probes = iter(range(1, 250))

    def refused_at_the_door(network: int) -> bool:
        # A new address every time: no address's own limit can answer in the door's place.
        return banner(relay, f"127.{network}.0.{next(probes)}") == too_many

    # The door process is told within a second or two (housekeeping's tick)...
    wait_for(lambda: refused_at_the_door(73))
    # ...and lets one stranger a second in, where a thousand got in before.
    answers = [banner(relay, f"127.73.1.{n}") for n in range(1, 21)]
    assert answers.count(too_many) >= 15  # (a slow machine may let a second or two pass)
    # A door process started again (killed here) is told the mode's rate as it comes up.
    door = door_process(relay)
    first = child_pid(door)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: door._process is not None and door._process.pid != first and door.ready)
    wait_for(lambda: refused_at_the_door(74))
    answers = [banner(relay, f"127.74.1.{n}") for n in range(1, 21)]
    assert answers.count(too_many) >= 15


def test_the_door_process_follows_the_mode_at_once(start_relay: StartRelay) -> None:
    relay = start_relay(
        defense=FEW_STRANGERS_UNDER_ATTACK,
    )
    door_process(relay)
    defense = relay.server.defense

    def attacked_then_held() -> None:
        # The mode starts on evidence, and the relay's loop is then held in the same turn:
        # no housekeeping tick can tell the door process; only the mode's own news can.
        now = time.time()
        for n in range(3):
            address = ipaddress.ip_address(f"127.75.{n}.1")
            defense.on_auth_failure(address, "nobody@example.com", ("nobody", n), now, False)
        time.sleep(3.0)

    relay.call(attacked_then_held)
    time.sleep(0.2)
    assert defense.under_attack
    # Twenty strangers at once, while the relay's loop is held: what answers them now is
    # the door process. Let in, they would wait for the relay's greeting until the hold ends.
    deadline = time.monotonic() + 1.5
    answers: list[bytes] = []
    connections = [
        socket.create_connection(
            ("127.0.0.1", relay.starttls_port), timeout=10, source_address=(f"127.76.1.{n}", 0)
        )
        for n in range(1, 21)
    ]
    for connection in connections:
        with connection:
            connection.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                answers.append(connection.recv(1024))
            except TimeoutError:
                answers.append(b"")  # not answered while the loop was held: let in
    too_many = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    assert answers.count(too_many) >= 15  # a thousand a second would have let all 20 in


def test_a_ban_from_the_cli_is_enforced_by_the_door_process(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = start_relay(defense={"door_process": True})
    door_process(relay)
    config = tmp_path / "cli.toml"
    config.write_text(f'state_dir = "{relay.config.state_dir}"\n')
    ban = [sys.executable, "-m", "mailfence", "ban", "127.69.0.0/24", "--permanent"]
    banned = subprocess.run(
        [*ban, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert banned.returncode == 0, banned.stderr
    permanent = replies.BANNED_PERMANENTLY.encode() + b"\r\n"
    wait_for(lambda: banner(relay, "127.69.0.7") == permanent, timeout=3.0)
    time.sleep(1.0)  # the door process has read the ban too (it looks twice a second)
    hold_the_relays_loop(relay, 2.0)
    started = time.monotonic()
    assert banner(relay, "127.69.0.8") == permanent
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("in_a_process", [True, False], ids=["door process", "relay's door"])
def test_a_source_hammering_the_door_is_banned(start_relay: StartRelay, in_a_process: bool) -> None:
    relay = start_relay(
        defense={
            "door_process": in_a_process,
            "unknown_connections_per_second": 1,
            "ban_after_refused_connections": 30,
        }
    )
    if in_a_process:
        door_process(relay)
    too_many = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    banned = replies.BANNED.encode() + b"\r\n"
    answers: list[bytes] = []
    deadline = time.monotonic() + 10.0
    # A bot reconnecting at once; the door process reports its refusals each second, and
    # picks the relay's ban up from the database within half a second.
    while time.monotonic() < deadline and (not answers or answers[-1] != banned):
        answers.append(banner(relay, "127.75.0.9"))
        time.sleep(0.005)
    assert answers[-1] == banned
    assert answers.count(too_many) >= 30
    assert all(a in (too_many, banned) or a.startswith(b"220 ") for a in answers)
    # Its neighbour, a stranger that did nothing, is not banned with it.
    assert banner(relay, "127.75.0.10") != banned
    row = wait_for(lambda: _ban_row(relay, "127.75.0.9/32"))
    reason, evidence, source = row
    assert source == "auto" and reason.endswith("connections refused in 60 s")
    assert json.loads(evidence)["refused_connections"] >= 30


@pytest.mark.parametrize("in_a_process", [True, False], ids=["door process", "relay's door"])
def test_a_connection_flood_starts_under_attack_mode_before_any_login(
    start_relay: StartRelay, in_a_process: bool
) -> None:
    relay = start_relay(
        defense={
            "door_process": in_a_process,
            "unknown_connections_per_second": 1,
            "attack_refused_connections_per_second": 30,
        }
    )
    if in_a_process:
        door_process(relay)
    defense = relay.server.defense
    assert not defense.under_attack
    too_many = replies.TOO_MANY_CONNECTIONS.encode() + b"\r\n"
    # Strangers from 100 addresses, one connection each (no address over its own limits),
    # as fast as this client goes: far more than 30 a second, and no AUTH at all.
    answers = [banner(relay, f"127.76.{n // 200}.{n % 200 + 1}") for n in range(100)]
    assert answers.count(too_many) >= 90
    wait_for(lambda: defense.under_attack, timeout=3.0)
    assert "strangers refused a second at the door" in defense.attack_reason


def _ban_row(relay: RunningRelay, network: str) -> tuple[str, str, str] | None:
    with contextlib.closing(sqlite3.connect(relay.config.database_path)) as conn:
        row = conn.execute(
            "SELECT reason, evidence, source FROM bans WHERE network = ?", (network,)
        ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), str(row[2]))


def test_the_relay_accepts_itself_while_the_door_process_is_down(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(defense={"door_process": True})
    door = door_process(relay)
    first = child_pid(door)
    os.kill(first, signal.SIGKILL)
    # No connection is lost or left waiting meanwhile: the relay's own door takes them.
    assert banner(relay, "127.70.0.1").startswith(b"220 ")
    # And housekeeping starts a new one within a second or two.
    wait_for(lambda: door is not relay.server.listeners.strangers_door or door._process)
    again = door_process(relay)
    wait_for(lambda: child_pid(again) != first)
    assert banner(relay, "127.70.0.2").startswith(b"220 ")
    # The operator sees it: `stats --json` and the metrics.
    answer = control.request(relay.config.control_socket, "snapshot", {"sessions": 0})
    assert answer["snapshot"]["connections"]["door_process"] == {"running": True, "restarts": 1}
    url = f"http://127.0.0.1:{relay.server.metrics_port}/metrics"

    def metrics() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    figures = ("mailfence_door_process_up 1.0", "mailfence_door_process_restarts_total 1.0")
    wait_for(lambda: all(line in metrics() for line in figures))  # the next tick or two


def test_no_door_process_outlives_the_relay(start_relay: StartRelay) -> None:
    relay = start_relay(defense={"door_process": True})
    pid = child_pid(door_process(relay))
    relay.stop()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # bounded
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie not yet reaped by multiprocessing counts as gone.
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError(f"the door process {pid} is still running")


def test_monitor_mode_keeps_the_door_in_the_relay(start_relay: StartRelay) -> None:
    relay = start_relay(defense={"mode": "monitor", "door_process": True})
    assert relay.server.listeners.strangers_door is None
    answer = control.request(relay.config.control_socket, "snapshot", {"sessions": 0})
    assert answer["snapshot"]["connections"]["door_process"] is None  # not wanted: not shown


def test_the_door_process_is_on_by_default_and_can_be_turned_off(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    from mailfence.config import from_mapping

    assert from_mapping({}, "<empty>", tmp_path).defense.door_process is True
    off = start_relay(defense={"door_process": False})
    assert off.server.listeners.strangers_door is None
    assert banner(off, "127.71.0.2").startswith(b"220 ")


def test_the_door_process_memory_of_addresses_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailfence.smtp import strangers_door
    from mailfence.testing import relay_config

    monkeypatch.setattr(strangers_door, "ADDRESS_CACHE_SIZE", 100)
    config = relay_config(tmp_path)
    keeper = strangers_door._Keeper(config)
    for n in range(1, 251):
        address, prefix = keeper.parse(f"203.0.113.{n}")
        assert str(prefix) == "203.0.113.0/24" and str(address) == f"203.0.113.{n}"
    assert 0 < len(keeper._addresses) <= 100
    keeper.conn.close()


def test_the_door_process_reports_the_sources_it_refused_most_within_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailfence.smtp import strangers_door
    from mailfence.testing import relay_config

    monkeypatch.setattr(strangers_door, "LIMITED_COUNTED", 100)
    keeper = strangers_door._Keeper(relay_config(tmp_path))
    for n in range(1, 201):  # 200 addresses, the n-th refused n times
        for _ in range(n):
            keeper.note_limited(f"203.0.{n // 250}.{n % 250}")
    assert len(keeper.limited) == 100  # the first hundred; later ones are not counted
    child_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with child_end, relay_end:
        strangers_door._report(child_end, keeper)
        message = relay_end.recv(strangers_door.CHANNEL_MESSAGE_BYTES)
    assert keeper.limited == {}  # each report counts from zero
    report = json.loads(message[1:])
    assert len(report["limited"]) == strangers_door.LIMITED_REPORTED
    assert min(report["limited"].values()) == 100 - strangers_door.LIMITED_REPORTED + 1
    assert report["limited"]["203.0.0.100"] == 100
    keeper.conn.close()


def test_the_door_process_reports_a_connection_flood_early_once_a_second(
    tmp_path: Path,
) -> None:
    from mailfence.smtp import strangers_door
    from mailfence.testing import relay_config

    config = relay_config(tmp_path)
    keeper = strangers_door._Keeper(config)
    assert keeper.flood_report_at == 50  # a tenth of a second at 500 refused a second
    start = keeper.next_report
    assert keeper.report_due(start)  # the regular report; the next one a second later
    for _ in range(49):
        keeper.note_limited("203.0.113.9")
    assert not keeper.report_due(start + 0.1)
    keeper.note_limited("203.0.113.9")
    assert keeper.report_due(start + 0.1)  # early: the fiftieth refusal
    keeper.limited_total = 0  # as _report does
    for _ in range(500):
        keeper.note_limited("203.0.113.9")
    assert not keeper.report_due(start + 0.2)  # one early report between two regular ones
    assert keeper.report_due(start + 1.0)
    keeper.conn.close()


def test_top_says_when_the_door_process_is_down() -> None:
    from mailfence.cli.observe import header

    snapshot: dict[str, Any] = {
        "health": {"state": "ok", "reason": "all well"},
        "uptime": 61.0,
        "under_attack": False,
        "connections": {"open": 3, "limit": 1000, "door_process": None},
    }
    assert "DOOR PROCESS" not in header(snapshot).plain  # not wanted: nothing to say
    snapshot["connections"]["door_process"] = {"running": True, "restarts": 0}
    assert "DOOR PROCESS" not in header(snapshot).plain
    snapshot["connections"]["door_process"] = {"running": False, "restarts": 2}
    assert "DOOR PROCESS DOWN (restarts 2)" in header(snapshot).plain
