"""The defense core replayed with a fake clock and no sockets: attacks in, verdicts out."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from mailfence.config import DefenseConfig
from mailfence.defense import Action, AuthAction, Defense
from mailfence.defense.bans import Ban, BanBook
from mailfence.defense.net import IPAddress

CUSTOMERS = [f"customer{n}@example.com" for n in range(20)]


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


# The replays below run faster than real time; the strangers' overall connection rate (its
# own test below) is lifted so that they exercise the per-name and per-source logic.
UNLIMITED_STRANGERS = {
    "unknown_connections_per_second": 10**9,
    "attack_unknown_connections_per_second": 10**9,
}


def defense(**changes: object) -> Defense:
    return Defense(dataclasses.replace(DefenseConfig(), **changes))  # type: ignore[arg-type]


class Replay:
    """Drives a Defense like the relay does: connect, AUTH, outcome, disconnect, tick."""

    def __init__(self, core: Defense, users: list[str] | None = None) -> None:
        self.core = core
        self.users = set(users or CUSTOMERS)
        self.now = 1_000_000.0
        self.hashed = 0
        self.refused_before_hash = 0
        self.refused_connections = 0
        self.guess = 0

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.core.tick(self.now)

    def login(self, source: str, user: str, correct: bool, password: str | None = None) -> str:
        """One connection with one AUTH. Returns what the client saw.

        Each takes 25 ms of the replay's time, so strangers stay under their overall
        connection rate (50 a second by default) unless a test says otherwise."""
        self.now += 0.025
        address = ip(source)
        verdict = self.core.on_connect(address, self.now, 0, 1000)
        if verdict.action is not Action.ALLOW:
            self.refused_connections += 1
            return str(verdict.action.value)
        try:
            gate = self.core.before_auth(address, user, self.now, 1, user in self.users)
            if gate.action is not AuthAction.PROCEED:
                self.refused_before_hash += 1
                if gate.retry_allowed:  # the relay's authenticator holds no ticket for it
                    self.core.on_auth_refused(address, user, self.now)
                return str(gate.action.value)
            if correct:
                self.core.on_auth_success(address, user, self.now)
                return "ok"
            self.hashed += user in self.users
            if password is None:
                self.guess += 1
                password = f"guess{self.guess}"
            self.core.on_auth_failure(address, user, (user, password), self.now, repeated=False)
            return "wrong"
        finally:
            self.core.on_disconnect(address)


def test_concentrated_attack_is_banned_after_a_few_guesses() -> None:
    replay = Replay(defense())
    outcomes = []
    for attempt in range(5000):
        source = f"198.51.100.{attempt % 4 + 1}"  # four addresses, many tries each
        outcomes.append(replay.login(source, CUSTOMERS[attempt % 20], correct=False))
        replay.now += 0.01
    # Each address gets at most ban_after_failures guesses, then it is refused at the door
    # (the fourth one sooner: three banned addresses get their whole /24 banned).
    assert 30 < replay.hashed <= 4 * 10
    assert replay.hashed / 5000 < 0.01
    assert outcomes[-1] == "banned"
    ban = replay.core.bans.find(ip("198.51.100.1"), replay.now)
    assert ban is not None and ban.source == "auto"
    assert ban.evidence["failures"] == 10
    assert "customer0@example.com" in ban.evidence["usernames"]
    assert ban.evidence["first_seen"] <= ban.evidence["last_seen"]


def test_several_banned_addresses_ban_their_network() -> None:
    replay = Replay(defense(**UNLIMITED_STRANGERS))
    for host in (1, 2, 3):
        for _ in range(10):
            replay.login(f"198.51.100.{host}", "nobody", correct=False)
    prefix_ban = replay.core.bans.get(ipaddress.ip_network("198.51.100.0/24"))
    assert prefix_ban is not None and "3 addresses" in prefix_ban.reason
    assert replay.login("198.51.100.77", "customer1@example.com", correct=False) == "banned"


def test_bans_escalate_and_expire() -> None:
    core = defense(ban_time=60.0, ban_escalation=4.0, ban_max_time=600.0, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    lengths = []
    for _ in range(3):
        for _ in range(10):
            replay.login("203.0.113.5", "nobody", correct=False)
        ban = core.bans.find(ip("203.0.113.5"), replay.now)
        assert ban is not None and ban.until is not None
        lengths.append(round(ban.until - replay.now))
        replay.tick(ban.until - replay.now + 1)  # the ban ends...
        assert core.bans.find(ip("203.0.113.5"), replay.now) is None
        replay.tick(core.config.failure_window)  # ...and its failures age out
    assert lengths == [60, 240, 600]  # each repeat longer, capped


def test_distributed_attack_costs_at_most_one_guess_per_source_per_name() -> None:
    replay = Replay(defense(**UNLIMITED_STRANGERS))
    seen = []
    for n in range(5000):
        source = f"127.{70 + n // 2000}.{(n // 200) % 10}.{n % 200 + 1}"
        for attempt in range(3):  # 1-3 tries per address, then it moves on
            seen.append(replay.login(source, CUSTOMERS[(n + attempt) % 20], correct=False))
        replay.now += 0.004
        replay.core.tick(replay.now)
    assert replay.core.under_attack
    assert all(replay.core.username_under_attack(u, replay.now) for u in CUSTOMERS)
    # Once the names are under attack, strangers are refused before hashing: the 5,000
    # addresses cost at most a handful of verifications each name before that.
    assert replay.hashed <= 5000 + 20 * DefenseConfig().username_attack_sources
    assert replay.refused_before_hash + replay.refused_connections >= 5000


def test_password_spray_does_not_lock_out_the_real_user() -> None:
    replay = Replay(defense(**UNLIMITED_STRANGERS))
    home = "192.0.2.10"
    assert replay.login(home, "customer3@example.com", correct=True) == "ok"  # known-good now
    for n in range(300):  # strangers spray the real name
        replay.login(f"198.18.{n // 250}.{n % 250 + 1}", "customer3@example.com", correct=False)
    assert replay.core.username_under_attack("customer3@example.com", replay.now)
    # A stranger with a failure behind it is refused for that name before hashing...
    assert replay.login("198.18.0.1", "customer3@example.com", correct=False) == "refuse"
    # ...while the real user, from a network it has logged in from, is let in as normal.
    assert replay.core.lane("customer3@example.com", ip(home), replay.now) == "known"
    assert replay.login(home, "customer3@example.com", correct=True) == "ok"
    # So is a new address of the same network.
    assert replay.login("192.0.2.200", "customer3@example.com", correct=True) == "ok"
    # A login from a network never used is refused before hashing, in a way its server's
    # retry may lift (the authenticator's retry ticket, tested end to end).
    gate = replay.core.before_auth(ip("203.0.113.7"), "customer3@example.com", replay.now, 1, True)
    assert gate.action is AuthAction.REFUSE and gate.retry_allowed


def test_ipv6_attacker_rotating_inside_one_64_is_counted_as_one_source() -> None:
    replay = Replay(defense())
    outcomes = [replay.login(f"2001:db8:1:2::{n:x}", "nobody", correct=False) for n in range(1, 40)]
    assert outcomes[:10] == ["wrong"] * 10
    assert set(outcomes[10:]) == {"banned"}
    ban = replay.core.bans.find(ip("2001:db8:1:2:ffff::1"), replay.now)
    assert ban is not None and str(ban.network) == "2001:db8:1:2::/64"
    assert replay.core.bans.find(ip("2001:db8:1:3::1"), replay.now) is None  # the next /64


def test_honeypot_name_bans_at_first_try() -> None:
    replay = Replay(defense())
    assert replay.login("203.0.113.50", "admin", correct=False) == "refuse"
    assert replay.hashed == 0
    assert replay.login("203.0.113.50", "customer1@example.com", correct=True) == "banned"


def test_honeypot_name_that_is_a_real_account_is_not_a_trap() -> None:
    replay = Replay(defense(), users=["admin"])
    assert replay.login("203.0.113.51", "admin", correct=True) == "ok"


def test_natted_customer_retrying_a_stale_password_is_not_banned() -> None:
    replay = Replay(defense())
    address = ip("192.0.2.44")
    for _ in range(500):
        # The relay's negative cache answers the same wrong password as a repeat.
        replay.core.on_connect(address, replay.now, 0, 1000)
        gate = replay.core.before_auth(address, "customer5@example.com", replay.now, 1, True)
        assert gate.action is AuthAction.PROCEED
        replay.core.on_auth_failure(
            address, "customer5@example.com", b"same", replay.now, repeated=False
        )
        replay.core.on_disconnect(address)
        replay.now += 30
    assert replay.core.bans.find(address, replay.now) is None
    # Distinct wrong passwords are what count: the same one repeated is one mistake.
    assert replay.login("192.0.2.44", "customer5@example.com", correct=True) == "ok"


def test_repeats_from_the_negative_cache_do_not_count() -> None:
    core = defense()
    for _ in range(100):
        core.on_auth_failure(ip("192.0.2.45"), "u", b"x", 1000.0, repeated=True)
    assert core.bans.find(ip("192.0.2.45"), 1000.0) is None
    assert core.counters.auth_failures_repeated == 100


def test_allowlist_wins_over_bans_and_limits() -> None:
    core = defense(allowlist=(ipaddress.ip_network("192.0.2.0/24"),), max_connections_per_ip=1)
    replay = Replay(core)
    for _ in range(50):
        assert replay.login("192.0.2.9", "nobody", correct=False) == "wrong"
    assert core.bans.find(ip("192.0.2.9"), replay.now) is None
    for _ in range(5):  # concurrent connections past the per-address limit
        verdict = core.on_connect(ip("192.0.2.9"), replay.now, 0, 1000)
        assert verdict.action is Action.ALLOW


def test_connection_limits_and_the_known_good_reserve() -> None:
    core = defense(max_connections_per_ip=2, known_good_reserved=0.2)
    stranger = ip("198.51.100.9")
    assert core.on_connect(stranger, 0.0, 0, 100).action is Action.ALLOW
    assert core.on_connect(stranger, 0.0, 1, 100).action is Action.ALLOW
    assert core.on_connect(stranger, 0.0, 2, 100).action is Action.LIMIT
    # 80 of 100 slots taken: the last 20 are for sources customers log in from.
    assert core.on_connect(ip("198.51.101.9"), 0.0, 80, 100).action is Action.LIMIT
    core.remember_known_good("customer1@example.com", ipaddress.ip_network("192.0.2.0/24"), 0.0)
    assert core.on_connect(ip("192.0.2.77"), 0.0, 95, 100).action is Action.ALLOW


def test_connection_rate_limit() -> None:
    core = defense(connection_rate_per_ip=5, connection_rate_window=60.0)
    address = ip("198.51.100.20")
    actions = []
    for second in range(8):
        actions.append(core.on_connect(address, float(second), 0, 1000).action)
        core.on_disconnect(address)
    assert actions[:5] == [Action.ALLOW] * 5
    assert actions[5:] == [Action.LIMIT] * 3
    assert core.on_connect(address, 100.0, 0, 1000).action is Action.ALLOW  # the window moved


def test_strangers_share_one_connection_rate_and_customers_are_exempt() -> None:
    core = defense(unknown_connections_per_second=50)
    core.remember_known_good("customer1@example.com", ipaddress.ip_network("192.0.2.0/24"), 0.0)

    def stranger(n: int, when: float) -> Action:
        address = ip(f"127.{70 + n // 250}.{n % 250}.1")  # no single address is over its limit
        action = core.on_connect(address, when, 0, 1000).action
        core.on_disconnect(address)
        return action

    # 160 different addresses over two seconds: about 50 a second get in, the rest are told 421.
    actions = [stranger(n, 10.0 + n / 80) for n in range(160)]
    assert 100 <= actions.count(Action.ALLOW) <= 100 + 5
    assert Action.LIMIT in actions[:80] and Action.LIMIT in actions[80:]
    # All at one instant: only a tenth of a second's worth, so their TLS handshakes do not
    # land on the event loop together.
    burst = [stranger(1000 + n, 20.0) for n in range(50)]
    assert burst.count(Action.ALLOW) == 5
    assert core.on_connect(ip("192.0.2.9"), 20.0, 0, 1000).action is Action.ALLOW  # customer
    assert stranger(2000, 20.5) is Action.ALLOW  # the bucket refills


def test_one_host_hammering_the_door_does_not_spend_the_strangers_share() -> None:
    core = defense(unknown_connections_per_second=10, connection_rate_per_ip=5)
    hammer = ip("198.51.100.66")
    hammered: list[Action] = []
    others: list[Action] = []
    # For two and a half seconds one address connects 800 times a second while other
    # strangers come a little under the shared rate (8 a second). The hammer is over its
    # own limit after a few, and those refusals must not use up the tokens strangers share.
    for step in range(20):
        start = 50.0 + step / 8
        stranger = ip(f"203.0.113.{step + 1}")
        for n in range(100):
            when = start + n / 800  # the hammer never pauses
            if n == 50:
                others.append(core.on_connect(stranger, when, 0, 1000).action)
                core.on_disconnect(stranger)
            hammered.append(core.on_connect(hammer, when, 0, 1000).action)
            core.on_disconnect(hammer)
    admitted_hammer = hammered.count(Action.ALLOW)
    assert 1 <= admitted_hammer <= 5
    # Each of the hammer's few admitted connections may have cost one stranger its turn.
    assert others.count(Action.ALLOW) >= len(others) - admitted_hammer


def test_a_source_hammering_the_door_is_banned_and_a_mail_server_retrying_is_not() -> None:
    core = defense(
        connection_rate_per_ip=5, connection_rate_window=60.0, ban_after_refused_connections=50
    )
    hammer, server = ip("198.51.100.66"), ip("198.51.100.25")
    actions: list[Action] = []
    made: list[Ban] = []
    # A bot reconnecting 100 times a second: over its rate after 5, banned after 50 refusals.
    for n in range(100):
        when = 10.0 + n / 100
        verdict = core.on_connect(hammer, when, 0, 1000)
        actions.append(verdict.action)
        made += verdict.bans
        core.on_disconnect(hammer)
    assert actions[:5] == [Action.ALLOW] * 5
    assert actions[5:55] == [Action.LIMIT] * 50  # the fiftieth refusal makes the ban...
    assert actions[55:] == [Action.BANNED] * 45  # ...and the door refuses it as banned
    assert [str(ban.network) for ban in made] == ["198.51.100.66/32"]
    ban = made[0]
    assert ban.reason == "50 connections refused in 60 s" and ban.source == "auto"
    assert ban.evidence["refused_connections"] == 50
    assert ban.evidence["first_seen"] == pytest.approx(10.05)
    # A mail server with a queue to flush, told 421 after its fifth connection, comes back
    # five minutes later, for a day: never banned.
    verdicts = []
    for retry in range(12 * 24):
        for n in range(20):  # 20 connections at once, 15 of them over its rate
            when = 100.0 + retry * 300 + n / 100
            verdicts.append(core.on_connect(server, when, 0, 1000).action)
            core.on_disconnect(server)
    assert verdicts.count(Action.LIMIT) == 15 * 12 * 24 and Action.BANNED not in verdicts
    assert core.explain(server, when)["refused_connections_in_window"] == 15


def test_refusals_the_door_process_reports_count_toward_the_same_ban() -> None:
    core = defense(ban_after_refused_connections=600, connection_rate_window=60.0)
    bot = ip("203.0.113.7")
    assert core.on_connections_refused(bot, 350, 10.0) == []
    assert core.on_connections_refused(bot, 249, 11.0) == []
    made = core.on_connections_refused(bot, 1, 12.0)
    assert [str(ban.network) for ban in made] == ["203.0.113.7/32"]
    assert made[0].evidence["first_seen"] == 10.0 and made[0].evidence["last_seen"] == 12.0
    assert core.on_connections_refused(bot, 1000, 13.0) == []  # banned already: no new ban
    # Counts older than the window no longer add up.
    slow = ip("203.0.113.8")
    assert core.on_connections_refused(slow, 599, 10.0) == []
    assert core.on_connections_refused(slow, 599, 80.0) == []
    # Three hammering addresses of one network: the network is banned, as for guessers.
    for host in (20, 21):
        core.on_connections_refused(ip(f"203.0.113.{host}"), 600, 90.0)
    assert core.bans.get(ipaddress.ip_network("203.0.113.0/24")) is not None


def test_hammering_never_bans_customers_allowlisted_sources_or_when_turned_off() -> None:
    core = defense(allowlist=(ipaddress.ip_network("192.0.2.0/24"),))
    core.remember_known_good("customer1@example.com", ipaddress.ip_network("198.51.100.0/24"), 0.0)
    for text in ("192.0.2.9", "198.51.100.200"):
        assert core.on_connections_refused(ip(text), 10_000, 10.0) == []
    off = defense(ban_after_refused_connections=0)
    assert off.on_connections_refused(ip("203.0.113.7"), 10_000, 10.0) == []
    monitor = defense(mode="monitor")
    assert monitor.on_connections_refused(ip("203.0.113.7"), 10_000, 10.0) == []
    assert len(monitor.bans) == 0 and monitor.counters.would_have["ban"] == 1


def test_the_count_of_refused_connections_is_bounded() -> None:
    from mailfence.defense.windows import CountWindow

    window: CountWindow[str] = CountWindow(60.0, max_keys=100, cap=10)
    for n in range(250):
        window.add(f"source {n}", 1, 5.0)
    assert len(window) == 100 and window.count("source 249", 5.0) == 1
    assert window.count("source 0", 5.0) == 0  # forgotten: the least recently touched
    # One key's entries are capped; what is folded away still counts while in the window.
    for second in range(30):
        window.add("bot", 10, 10.0 + second)
    assert len(window._entries["bot"]) == 10
    assert window.count("bot", 40.0) == 300
    window.expire(200.0)
    assert len(window) == 0


def test_auth_attempts_per_session() -> None:
    core = defense(auth_attempts_per_session=3)
    address = ip("198.51.100.30")
    gates = [core.before_auth(address, "u", 0.0, n, False).action for n in (1, 2, 3, 4)]
    assert gates == [AuthAction.PROCEED] * 3 + [AuthAction.DISCONNECT]


def test_under_attack_mode_has_hysteresis_and_spares_known_good() -> None:
    core = defense(attack_failures_per_minute=60, attack_exit_after=120.0, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    assert replay.login("192.0.2.10", "customer1@example.com", correct=True) == "ok"
    for n in range(80):
        replay.login(f"198.51.{n}.1", "nobody", correct=False)
    replay.tick()
    assert core.under_attack
    # Strangers get one AUTH per session; the known-good customer keeps three.
    stranger = core.before_auth(ip("203.0.113.1"), "x", replay.now, 2, False)
    assert stranger.action is AuthAction.DISCONNECT
    known = core.before_auth(ip("192.0.2.10"), "customer1@example.com", replay.now, 2, True)
    assert known.action is AuthAction.PROCEED
    replay.tick(301)  # the failures and sources age out: calm, but not for long enough yet
    assert core.under_attack
    replay.tick(60)
    assert core.under_attack
    replay.tick(61)  # calm for the full attack_exit_after
    assert not core.under_attack


def test_a_connection_flood_starts_under_attack_mode_before_any_login() -> None:
    core = defense(
        unknown_connections_per_second=50,
        attack_refused_connections_per_second=500,
        attack_exit_after=120.0,
    )
    rates: list[float] = []
    core.on_strangers_rate = rates.append

    def strangers(per_second: int, seconds: float, start: float, first: int) -> None:
        for n in range(int(per_second * seconds)):
            address = ip(f"127.{80 + (first + n) // 250}.{(first + n) % 250}.1")
            core.on_connect(address, start + n / per_second, 0, 1000)
            core.on_disconnect(address)

    # 400 strangers a second for two seconds: the shared rate refuses most, no flood yet.
    strangers(400, 2.0, 100.0, 0)
    assert not core.under_attack and core.tick(102.0) is None
    # 3,000 a second: the mode starts within the first fifth of a second, no login tried.
    strangers(3000, 0.2, 200.0, 1000)
    assert core.under_attack and rates == [10]
    assert core.tick(200.5) == "enter"
    assert core.attack_reason.startswith("500 strangers refused a second at the door; ")
    # Failed logins alone decide the end: calm for attack_exit_after, the mode ends.
    core.tick(260.0)
    assert core.under_attack and core.tick(379.0) is None
    assert core.tick(381.0) == "leave" and rates == [10, 50]


def test_a_reloaded_connection_flood_threshold_applies_to_the_relays_door() -> None:
    core = defense(unknown_connections_per_second=50)
    core.config = dataclasses.replace(core.config, attack_refused_connections_per_second=2000)

    def strangers(per_second: int, start: float, first: int) -> None:
        for n in range(per_second):  # one second's worth
            address = ip(f"127.{90 + (first + n) // 250}.{(first + n) % 250}.1")
            core.on_connect(address, start + n / per_second, 0, 1000)
            core.on_disconnect(address)

    strangers(1500, 100.0, 0)  # over the old 500, under the new 2,000
    assert not core.under_attack
    strangers(2500, 200.0, 5000)
    assert core.under_attack and core.attack_reason.startswith("2000 strangers refused")


def test_the_door_process_report_of_a_connection_flood_starts_the_mode() -> None:
    core = defense(attack_refused_connections_per_second=500)
    core.on_strangers_refused(400, 1.0, 10.0)  # under the rate
    core.on_strangers_refused(5, 0.001, 11.0)  # a fast rate, but too few to tell
    assert not core.under_attack
    core.on_strangers_refused(150, 0.2, 12.0)  # an early report: 750 a second
    assert core.under_attack and "750 strangers refused a second" in core.attack_reason
    off = defense(attack_refused_connections_per_second=0)
    off.on_strangers_refused(10_000, 1.0, 10.0)
    assert not off.under_attack


def test_under_attack_mode_starts_on_the_evidence_not_at_the_next_tick() -> None:
    core = defense(attack_failing_sources=10, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    outcomes = [replay.login(f"198.51.{n}.1", f"nobody{n}", correct=False) for n in range(12)]
    # The tenth failing source starts the mode at once: the next stranger is refused before
    # any verification, with no tick in between.
    assert outcomes == ["wrong"] * 10 + ["refuse"] * 2
    assert core.under_attack
    assert replay.core.tick(replay.now) == "enter"  # reported once, at the next tick
    assert replay.core.tick(replay.now + 1) is None


def test_under_attack_mode_makes_strangers_retry_for_every_name() -> None:
    core = defense(attack_failing_sources=10, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    home = "192.0.2.10"
    assert replay.login(home, "customer1@example.com", correct=True) == "ok"
    for n in range(10):
        replay.login(f"198.51.{n}.1", f"nobody{n}", correct=False)
    assert core.under_attack
    # No name has failed from enough sources to be under attack itself...
    assert not core.username_under_attack("customer2@example.com", replay.now)
    # ...but every stranger's first login is refused before hashing, for a real name and for
    # one that does not exist alike (the answer must not tell them apart), in a way the
    # same credentials retried from the same source may lift (the retry ticket).
    for name, exists in (("customer2@example.com", True), ("nobody@example.com", False)):
        gate = core.before_auth(ip("203.0.113.7"), name, replay.now, 1, exists)
        assert gate.action is AuthAction.REFUSE and gate.retry_allowed, name
    # A honeypot name still bans at once.
    assert core.before_auth(ip("203.0.113.8"), "admin", replay.now, 1, False).bans
    # Customers from their known networks log in as ever.
    known = core.before_auth(ip(home), "customer1@example.com", replay.now, 1, True)
    assert known.action is AuthAction.PROCEED and known.lane == "known"


def test_password_spray_reaches_the_hash_only_until_the_relay_is_under_attack() -> None:
    # Each name would need a thousand failing sources to be under attack on its own: only
    # the relay's mode stops this spray.
    core = defense(username_attack_sources=1000, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    for n in range(5000):  # one guess from each of 5,000 addresses, the real names in turn
        source = f"127.{70 + n // 2000}.{(n // 200) % 10}.{n % 200 + 1}"
        replay.login(source, CUSTOMERS[n % 20], correct=False)
    assert replay.hashed == DefenseConfig().attack_failing_sources
    assert replay.refused_before_hash == 5000 - replay.hashed


def test_strangers_refused_for_load_count_toward_the_mode_but_never_toward_a_ban() -> None:
    core = defense(attack_failing_sources=10)
    for n in range(9):
        core.on_auth_busy(ip("198.51.100.7"), float(n))  # one source, again and again
    core.on_auth_busy(ip("192.0.2.1"), 9.0)
    assert not core.under_attack  # two sources
    allowed = defense(attack_failing_sources=2, allowlist=[ipaddress.ip_network("10.0.0.0/8")])
    allowed.on_auth_busy(ip("10.0.0.1"), 0.0)
    allowed.on_auth_busy(ip("10.0.0.2"), 0.0)
    assert not allowed.under_attack  # the allowlist is never evidence
    for n in range(8):
        core.on_auth_busy(ip(f"203.0.113.{n + 1}"), 10.0)
    assert core.under_attack  # ten sources refused for load: more strangers than one lane
    assert len(core.bans) == 0


def test_under_attack_mode_lets_fewer_strangers_in_and_restores_the_rate_after() -> None:
    core = defense(
        unknown_connections_per_second=100,
        attack_unknown_connections_per_second=10,
        attack_failing_sources=3,
        attack_exit_after=60.0,
    )
    now = 1000.0
    told: list[float] = []  # what the door process would be told, as it happens
    core.on_strangers_rate = told.append

    def strangers_let_in_over_one_second(first: int) -> int:
        nonlocal now
        admitted = 0
        for n in range(200):  # 200 new strangers, 5 ms apart
            now += 0.005
            address = ip(f"198.18.{first + n // 250}.{n % 250 + 1}")
            if core.on_connect(address, now, 0, 10_000).action is Action.ALLOW:
                admitted += 1
                core.on_disconnect(address)
        return admitted

    assert strangers_let_in_over_one_second(0) >= 100
    for n in range(3):
        core.on_auth_failure(ip(f"203.0.113.{n + 1}"), "nobody", ("nobody", n), now, False)
    assert core.under_attack
    assert told == [10]  # at once, not at the next tick
    assert strangers_let_in_over_one_second(10) <= 12  # 10 a second, 1 at once
    assert core.tick(now) == "enter"
    now += 301.0  # the failures age out; calm for attack_exit_after
    core.tick(now)
    now += 61.0
    assert core.tick(now) == "leave"
    assert told == [10, 100]
    assert strangers_let_in_over_one_second(20) >= 100


def test_the_mode_never_lets_more_strangers_in_than_the_normal_rate() -> None:
    core = defense(unknown_connections_per_second=5, attack_unknown_connections_per_second=10)
    for n in range(60):
        core.on_auth_failure(ip(f"198.51.{n}.1"), "nobody", ("nobody", n), 1.0, False)
    assert core.under_attack
    assert core.strangers.rate == 5


def test_strangers_let_through_on_a_retry_do_not_keep_the_mode_on() -> None:
    core = defense(attack_failing_sources=10, attack_exit_after=60.0, **UNLIMITED_STRANGERS)
    replay = Replay(core)
    for n in range(10):
        replay.login(f"198.51.{n}.1", f"nobody{n}", correct=False)
    assert core.under_attack and replay.core.tick(replay.now) == "enter"
    # Twenty minutes of new customers, one every two minutes: while the mode lasts, each is
    # refused once (that counts), then let in on its server's retry (the authenticator's
    # ticket: that does not count).
    first_tries = []
    for n in range(10):
        address = ip(f"203.0.{n}.7")
        replay.now += 120.0
        gate = core.before_auth(address, "customer1@example.com", replay.now, 1, True)
        first_tries.append(gate.action)
        if gate.action is AuthAction.REFUSE:
            core.on_auth_refused(address, "customer1@example.com", replay.now)
        core.on_auth_success(address, "customer1@example.com", replay.now + 1)
        replay.tick(0.0)
    assert first_tries[0] is AuthAction.REFUSE and first_tries[-1] is AuthAction.PROCEED
    assert not core.under_attack  # new customers trickling in are calm: the mode ended


def test_monitor_mode_decides_but_enforces_nothing() -> None:
    core = defense(mode="monitor")
    replay = Replay(core)
    outcomes = [replay.login("198.51.100.1", "nobody", correct=False) for _ in range(50)]
    assert set(outcomes) == {"wrong"}
    assert replay.login("198.51.100.1", "admin", correct=False) == "wrong"
    assert len(core.bans) == 0
    assert core.counters.would_have["ban"] >= 1


@pytest.mark.parametrize("text", ["::ffff:198.51.100.1", "198.51.100.1"])
def test_ipv4_mapped_addresses_count_as_ipv4(text: str) -> None:
    from mailfence.defense.net import parse_ip

    core = defense()
    assert str(core.source_of(parse_ip(text))) == "198.51.100.1/32"


def test_the_address_cache_is_bounded() -> None:
    from mailfence.defense import core

    defense = Defense(DefenseConfig())
    for n in range(core.NETWORK_CACHE_SIZE + 100):
        address = ipaddress.IPv4Address(0x0A000000 + n)
        assert defense.prefix_of(address) == ipaddress.IPv4Network((address, 24), strict=False)
    assert 0 < len(defense._network_cache) <= core.NETWORK_CACHE_SIZE


def test_a_new_customer_refused_at_the_door_in_a_flood_gets_in_on_retry() -> None:
    core = defense(unknown_connections_per_second=100)
    bots = [ip(f"127.80.{n % 50}.{n // 50 + 1}") for n in range(5000)]
    customer = ip("198.51.100.200")
    sent = 0
    seen: dict[str, list[Action]] = {"customer": [], "bots": []}
    for tenth in range(600):  # 60 seconds of 1,000 bot connections a second, all at once
        now = 1000.0 + tenth / 10
        for _ in range(100):
            address = bots[sent % len(bots)]
            sent += 1
            action = core.on_connect(address, now, 0, 1000).action
            seen["bots"].append(action)
            if action is Action.ALLOW:
                core.on_disconnect(address)
        # The customer's first try, its server's retry 19.5 s later, and the next one 20 s
        # after that (under attack, the first connection let in only earns a retry ticket).
        if tenth in (5, 200, 400):
            seen["customer"].append(core.on_connect(customer, now, 0, 1000).action)
            core.on_disconnect(customer)
    assert seen["customer"] == [Action.LIMIT, Action.ALLOW, Action.ALLOW]
    # Bots reconnecting at once never count as patient: strangers stay at their rate.
    admitted = seen["bots"].count(Action.ALLOW)
    assert admitted <= 100 * 60 + 10


def test_the_door_memory_of_refused_strangers_is_bounded() -> None:
    from mailfence.defense import strangers

    core = defense(unknown_connections_per_second=1)
    for n in range(strangers.MAX_REMEMBERED_REFUSALS + 50):
        core.on_connect(ipaddress.IPv4Address(0x0B000000 + n), 5.0, 0, 1000)
    assert len(core.strangers) == strangers.MAX_REMEMBERED_REFUSALS


def test_a_clock_stepped_back_does_not_drain_the_strangers_rate() -> None:
    from mailfence.defense.windows import TokenBucket

    bucket = TokenBucket(rate=10, burst=2)
    assert bucket.take(1000.0) and bucket.take(1000.0) and not bucket.take(1000.0)
    assert not bucket.take(400.0)  # NTP stepped the clock back ten minutes
    assert bucket.take(400.1)  # refilling resumes from there, a tenth of a second later


def test_bots_turned_away_by_the_shared_rate_do_not_lock_their_neighbours_out() -> None:
    core = defense(unknown_connections_per_second=2, connection_rate_per_prefix=20)
    # A flood from one /24: far more than the strangers' shared rate lets in.
    for n in range(1000):
        bot = ip(f"198.51.100.{n % 200 + 1}")
        if core.on_connect(bot, 100.0 + n / 1000, 0, 1000).action is Action.ALLOW:
            core.on_disconnect(bot)
    # A new customer in the same /24, turned away once in the flood, retries like a mail
    # server does: the prefix's rate counts only what got in, so it is not over its limit.
    newcomer = ip("198.51.100.250")
    assert core.on_connect(newcomer, 100.9, 0, 1000).action is Action.LIMIT
    assert core.on_connect(newcomer, 112.0, 0, 1000).action is Action.ALLOW


def test_ban_book_finds_the_covering_ban_by_prefix_and_family() -> None:
    """The lookup every refusal makes: integer probes per prefix length in use, which must
    agree with what `ipaddress` says covers the address."""
    now = 1_000_000.0
    book = BanBook()
    bans = {
        text: Ban(ipaddress.ip_network(text), now + 60, text, "auto", now)
        for text in ("192.0.2.7/32", "198.51.100.0/24", "2001:db8:1:2::/64", "10.0.0.0/8")
    }
    for ban in bans.values():
        book.put(ban)
    book.put(Ban(ipaddress.ip_network("203.0.113.9/32"), now - 1, "expired", "auto", now - 100))
    expected = {
        "192.0.2.7": "192.0.2.7/32",
        "192.0.2.8": None,
        "198.51.100.254": "198.51.100.0/24",
        "198.51.101.1": None,
        "2001:db8:1:2:ffff::1": "2001:db8:1:2::/64",
        "2001:db8:1:3::1": None,
        "10.255.0.1": "10.0.0.0/8",
        "11.0.0.1": None,
        "203.0.113.9": None,  # its ban has expired
        "::a00:1": None,  # the bits of 10.0.0.1, but IPv6: never matches an IPv4 ban
    }
    for text, network in expected.items():
        found = book.find(ip(text), now)
        assert (found.reason if found else None) == network, text
    book.remove(ipaddress.ip_network("198.51.100.0/24"))
    assert book.find(ip("198.51.100.254"), now) is None
    book.replace_all([bans["2001:db8:1:2::/64"]])
    assert book.find(ip("10.255.0.1"), now) is None
    assert book.find(ip("2001:db8:1:2::5"), now) is bans["2001:db8:1:2::/64"]
