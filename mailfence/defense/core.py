"""The decision core: events and a clock in, verdicts out.

Nothing here reads a clock, a socket or a database. The server feeds it what happens
(a connection, an AUTH attempt and its outcome, a tick) with the time, and acts on what it
answers. Tests replay attacks minute by minute with a fake clock.

Shed the bots, never the customers: every refusal here is cheap (no hashing) and temporary
(4xx), and a (user, source prefix) pair that has logged in before is never slowed by what
strangers do.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from mailfence.config import DefenseConfig
from mailfence.defense.bans import Ban, BanBook, escalated_duration
from mailfence.defense.net import IPAddress, IPNetwork, host_network, prefix_network
from mailfence.defense.strangers import StrangersDoor
from mailfence.defense.windows import CountWindow, DistinctWindow, EventWindow

log = logging.getLogger("mailfence.defense")

ATTACK_RATE_WINDOW = 60.0
ATTACK_SOURCES_WINDOW = 300.0
LEVEL_MEMORY = 7 * 86400.0  # a repeat offender within a week gets a longer ban
MAX_REMEMBERED_LEVELS = 100_000
NETWORK_CACHE_SIZE = 65_536
MAX_FLOOD_THRESHOLD = 10_000  # attack_refused_connections_per_second's upper bound


class Action(enum.Enum):
    ALLOW = "allow"
    BANNED = "banned"  # automatic (temporary) ban: 421
    BANNED_PERMANENT = "banned_permanent"  # manual permanent ban: 554
    LIMIT = "limit"  # over a connection limit: 421


class AuthAction(enum.Enum):
    PROCEED = "proceed"
    REFUSE = "refuse"  # 454 4.7.0, no hashing
    DISCONNECT = "disconnect"  # 421 4.7.0 and close: this session has used its attempts


Lane = str  # "known" | "unknown"


@dataclass(frozen=True)
class ConnectVerdict:
    action: Action
    reason: str = ""
    ban: Ban | None = None
    known_good: bool = False
    bans: tuple[Ban, ...] = ()  # made by this refusal (a source hammering the door)


@dataclass(frozen=True)
class AuthGate:
    action: AuthAction
    lane: Lane = "unknown"
    reason: str = ""
    # A refusal a mail server's retry may lift: the same user and password again from the
    # same source (the authenticator's retry ticket). Bots guess anew and never qualify.
    retry_allowed: bool = False
    bans: tuple[Ban, ...] = ()  # made by this check (a honeypot name): to record and announce


@dataclass
class DefenseCounters:
    connections_allowed: int = 0
    connections_refused: Counter[str] = field(default_factory=Counter)
    auth_refused: Counter[str] = field(default_factory=Counter)
    auth_failures_counted: int = 0
    auth_failures_repeated: int = 0
    bans_made: int = 0
    would_have: Counter[str] = field(default_factory=Counter)  # monitor mode


class Defense:
    def __init__(self, config: DefenseConfig) -> None:
        self.config = config
        self.bans = BanBook()
        self.allowlist: list[IPNetwork] = list(config.allowlist)
        # (user, prefix) -> time of the last successful login from that prefix.
        self.known_good: dict[tuple[str, IPNetwork], float] = {}
        # Prefixes with a known-good pair, in the order they became known (never removed).
        self._known_prefixes: Counter[IPNetwork] = Counter()
        self.live_sources: Counter[IPNetwork] = Counter()
        self.live_prefixes: Counter[IPNetwork] = Counter()
        window = config.failure_window
        self._rate_source: EventWindow[IPNetwork] = EventWindow(config.connection_rate_window)
        self._rate_prefix: EventWindow[IPNetwork] = EventWindow(config.connection_rate_window)
        # Strangers' connections refused by a limit, per source: toward a ban for hammering.
        self._refused: CountWindow[IPNetwork] = CountWindow(config.connection_rate_window)
        self.strangers = StrangersDoor(config.unknown_connections_per_second)
        # Both fixed at start, like the door they set. The mode never lets more strangers
        # in than the normal rate does.
        self._strangers_rate = config.unknown_connections_per_second
        self._attack_strangers_rate = min(
            config.attack_unknown_connections_per_second, self._strangers_rate
        )
        self._failures: DistinctWindow[IPNetwork] = DistinctWindow(window)
        self._failing_sources_by_user: DistinctWindow[str] = DistinctWindow(window)
        self._banned_in_prefix: DistinctWindow[IPNetwork] = DistinctWindow(window)
        self._first_seen: OrderedDict[IPNetwork, float] = OrderedDict()
        self._global_failures: EventWindow[str] = EventWindow(ATTACK_RATE_WINDOW, cap=1_000_000)
        self._global_sources: DistinctWindow[str] = DistinctWindow(
            ATTACK_SOURCES_WINDOW, cap=1_000_000
        )
        # Strangers refused by their shared rate, over the last second: a connection flood.
        # Capped at the largest threshold the configuration allows, so a reload may change it.
        self._strangers_refused: EventWindow[str] = EventWindow(1.0, cap=MAX_FLOOD_THRESHOLD)
        self._levels: OrderedDict[IPNetwork, tuple[int, float]] = OrderedDict()
        self.under_attack = False
        self.attack_reason = ""
        self._flood_reason = ""  # the mode started on a connection flood (reported with it)
        self._calm_since: float | None = None
        self._change: str | None = None  # a change of mode the next tick reports
        # Told of every change of the strangers' rate as it happens (the mode starting on
        # evidence, or ending), so whoever else admits strangers follows at once.
        self.on_strangers_rate: Callable[[float], None] | None = None
        self.counters = DefenseCounters()
        self._network_cache: dict[IPAddress, tuple[IPNetwork, IPNetwork]] = {}

    @property
    def monitor(self) -> bool:
        return self.config.mode == "monitor"

    # --- addresses ---------------------------------------------------------------------

    def _networks(self, address: IPAddress) -> tuple[IPNetwork, IPNetwork]:
        """(source, prefix) of an address. Building an ip_network costs ~4 µs, more than
        the rest of a refusal, and a flood repeats the same few thousand addresses."""
        networks = self._network_cache.get(address)
        if networks is None:
            config = self.config
            networks = (
                host_network(address, config.ipv6_prefix),
                prefix_network(address, config.ipv4_prefix, config.ipv6_prefix),
            )
            if len(self._network_cache) >= NETWORK_CACHE_SIZE:
                self._network_cache.clear()  # bounded; refilling costs only the misses
            self._network_cache[address] = networks
        return networks

    def source_of(self, address: IPAddress) -> IPNetwork:
        return self._networks(address)[0]

    def prefix_of(self, address: IPAddress) -> IPNetwork:
        return self._networks(address)[1]

    def allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allowlist)

    def is_known_good_source(self, address: IPAddress) -> bool:
        return self._known_prefixes[self.prefix_of(address)] > 0

    @property
    def known_prefix_count(self) -> int:
        return len(self._known_prefixes)

    def trusted_networks(self) -> list[IPNetwork]:
        """The networks the door exempts from strangers' limits: the allowlist, then the
        prefixes customers have logged in from, the latest to become known first."""
        return [*self.allowlist, *reversed(self._known_prefixes)]

    def lane(self, username: str, address: IPAddress, now: float) -> Lane:
        last = self.known_good.get((username, self.prefix_of(address)))
        fresh = last is not None and now - last <= self.config.known_good_window
        return "known" if fresh else "unknown"

    # --- connections -------------------------------------------------------------------

    def on_connect(
        self,
        address: IPAddress,
        now: float,
        live_total: int,
        max_total: int,
        strangers_checked: bool = False,
    ) -> ConnectVerdict:
        """Decides at accept time, before TLS or any session exists. `strangers_checked`:
        the strangers' door already let this one in (in its own process, strangers_door.py)."""
        verdict = self._connect_verdict(address, now, live_total, max_total, strangers_checked)
        if verdict.action is Action.LIMIT:  # never an allowlisted source or a customers' network
            bans = self._refused_toward_ban(address, 1, now)
            if bans:
                verdict = ConnectVerdict(verdict.action, verdict.reason, bans=tuple(bans))
        if verdict.action is not Action.ALLOW:
            self.counters.connections_refused[verdict.action.value] += 1
            if self.monitor:
                self.counters.would_have[f"refuse connection: {verdict.reason}"] += 1
                log.info("monitor: would refuse %s: %s", address, verdict.reason)
                verdict = ConnectVerdict(Action.ALLOW, verdict.reason, None, verdict.known_good)
        if verdict.action is Action.ALLOW:
            self.counters.connections_allowed += 1
            source, prefix = self._networks(address)
            self.live_sources[source] += 1
            self.live_prefixes[prefix] += 1
        return verdict

    def _connect_verdict(
        self,
        address: IPAddress,
        now: float,
        live_total: int,
        max_total: int,
        strangers_checked: bool = False,
    ) -> ConnectVerdict:
        if self.allowed(address):
            return ConnectVerdict(Action.ALLOW, "allowlisted", known_good=True)
        ban = self.bans.find(address, now)
        if ban is not None:
            action = Action.BANNED_PERMANENT if ban.permanent else Action.BANNED
            return ConnectVerdict(action, f"banned: {ban.reason}", ban)
        source, prefix = self._networks(address)
        if self._known_prefixes[prefix] > 0:
            # Customers' networks: no limits (counted all the same, for `explain`).
            self._rate_source.add(source, now)
            self._rate_prefix.add(prefix, now)
            return ConnectVerdict(Action.ALLOW, known_good=True)
        config = self.config
        # The stranger's own limits come first: one host hammering the door is refused on its
        # own account and never spends the tokens other strangers share.
        per_source = (
            config.attack_max_connections_per_ip
            if self.under_attack
            else config.max_connections_per_ip
        )
        if self.live_sources[source] >= per_source:
            return ConnectVerdict(Action.LIMIT, "too many connections from this address")
        if self.live_prefixes[prefix] >= config.max_connections_per_prefix:
            return ConnectVerdict(Action.LIMIT, "too many connections from this network")
        # The rate windows count connections let in, and those refused by that very window
        # (so a host that keeps hammering stays out until it pauses). Refusals by the
        # shared rate below are not counted: that would lock a neighbour out with them.
        if self._rate_source.count(source, now) >= config.connection_rate_per_ip:
            self._rate_source.add(source, now)
            return ConnectVerdict(Action.LIMIT, "connecting too often from this address")
        if self._rate_prefix.count(prefix, now) >= config.connection_rate_per_prefix:
            self._rate_prefix.add(prefix, now)
            return ConnectVerdict(Action.LIMIT, "connecting too often from this network")
        # A share of the slots is kept for sources customers have logged in from.
        if live_total >= max_total * (1.0 - config.known_good_reserved):
            return ConnectVerdict(Action.LIMIT, "slots left are reserved for known sources")
        # All strangers together, last: a flood from thousands of addresses never reaches any
        # one address's limit, but each admitted connection costs a TLS handshake.
        if not strangers_checked and not self.strangers.admit(address, now):
            if self.config.attack_refused_connections_per_second and not self.under_attack:
                refused = self._strangers_refused.add("all", now)
                self.on_strangers_refused(refused, 1.0, now)
            return ConnectVerdict(Action.LIMIT, "too many new connections from strangers")
        self._rate_source.add(source, now)
        self._rate_prefix.add(prefix, now)
        return ConnectVerdict(Action.ALLOW)

    def on_connections_refused(self, address: IPAddress, count: int, now: float) -> list[Ban]:
        """A stranger refused `count` connections by a limit (here, or in the strangers' door
        process, which reports each second). A mail server told 421 comes back minutes later;
        a source refused hundreds of times a minute is a bot reconnecting at once, and each
        connection a limit still lets through costs a TLS handshake on the customers' event
        loop. Returns the bans this caused."""
        if self.allowed(address) or self.is_known_good_source(address):
            return []
        return self._refused_toward_ban(address, count, now)

    def _refused_toward_ban(self, address: IPAddress, count: int, now: float) -> list[Ban]:
        threshold = self.config.ban_after_refused_connections
        if not threshold:
            return []
        source = self.source_of(address)
        refused = self._refused.add(source, count, now)
        if refused < threshold or self.bans.find(address, now) is not None:
            return []
        evidence: dict[str, object] = {
            "refused_connections": refused,
            "window_seconds": self.config.connection_rate_window,
            "first_seen": self._refused.first(source, now) or now,
            "last_seen": now,
        }
        window = self.config.connection_rate_window
        return self._ban(source, now, f"{refused} connections refused in {window:.0f} s", evidence)

    def on_disconnect(self, address: IPAddress) -> None:
        source, prefix = self._networks(address)
        for counter, key in ((self.live_sources, source), (self.live_prefixes, prefix)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    # --- authentication ----------------------------------------------------------------

    def before_auth(
        self,
        address: IPAddress,
        username: str,
        now: float,
        attempt: int,
        user_exists: bool,
    ) -> AuthGate:
        """Cheap checks before any hashing. `attempt` counts this session's AUTH commands."""
        lane = self.lane(username, address, now)
        gate = self._auth_gate(address, username, now, attempt, user_exists, lane)
        if gate.action is not AuthAction.PROCEED:
            self.counters.auth_refused[gate.reason] += 1
            if self.monitor:
                self.counters.would_have[f"refuse auth: {gate.reason}"] += 1
                log.info(
                    "monitor: would refuse AUTH from %s for %r: %s", address, username, gate.reason
                )
                return AuthGate(AuthAction.PROCEED, lane, gate.reason)
        return gate

    def _auth_gate(
        self,
        address: IPAddress,
        username: str,
        now: float,
        attempt: int,
        user_exists: bool,
        lane: Lane,
    ) -> AuthGate:
        config = self.config
        if self.allowed(address):
            return AuthGate(AuthAction.PROCEED, lane)
        budget = (
            config.attack_auth_attempts_per_session
            if self.under_attack and lane == "unknown"
            else config.auth_attempts_per_session
        )
        if attempt > budget:
            return AuthGate(AuthAction.DISCONNECT, lane, "too many AUTH attempts in one session")
        if self.bans.find(address, now) is not None:
            return AuthGate(AuthAction.REFUSE, lane, "source banned")
        if not user_exists and username.lower() in config.honeypot_users:
            made = self._ban(
                self.source_of(address), now, "honeypot user name tried", {"usernames": [username]}
            )
            return AuthGate(AuthAction.REFUSE, lane, "honeypot user name", bans=tuple(made))
        if lane != "unknown":
            return AuthGate(AuthAction.PROCEED, lane)
        # Strangers are refused without hashing for a name under attack, and for every name
        # while the relay is under attack (whether the name exists or not, so the answer
        # does not tell). A customer logging in for the first time is one of them: its
        # server's retry (the same password from the same source) is let through to the hash.
        if self.under_attack:
            reason = "under attack: strangers retry"
        elif self.username_under_attack(username, now):
            reason = "user name under attack"
        else:
            return AuthGate(AuthAction.PROCEED, lane)
        return AuthGate(AuthAction.REFUSE, lane, reason, retry_allowed=True)

    def username_under_attack(self, username: str, now: float) -> bool:
        count = self._failing_sources_by_user.count(username, now)
        return count >= self.config.username_attack_sources

    def on_auth_failure(
        self,
        address: IPAddress,
        username: str,
        fingerprint: Hashable,
        now: float,
        repeated: bool,
    ) -> list[Ban]:
        """Counts a wrong password. Returns the bans this failure caused."""
        if self.allowed(address):
            return []
        if repeated:
            # The same user with the same wrong password again (a client retrying a stale
            # password): one mistake, not an attack.
            self.counters.auth_failures_repeated += 1
            return []
        self.counters.auth_failures_counted += 1
        source = self.source_of(address)
        self._first_seen.setdefault(source, now)
        if len(self._first_seen) > 100_000:
            self._first_seen.popitem(last=False)
        self._failures.add(source, (username, fingerprint), now)
        if self.lane(username, address, now) == "unknown":
            self._failing_sources_by_user.add(username, source, now)
        self._attack_evidence(source, now)
        failures = self._failures.count(source, now)
        if failures < self.config.ban_after_failures or self.bans.find(address, now):
            return []
        names = sorted(
            {
                str(token[0])
                for token in self._failures.tokens(source, now)
                if isinstance(token, tuple)
            }
        )
        evidence = {
            "failures": failures,
            "window_seconds": self.config.failure_window,
            "usernames": names[:20],
            "first_seen": self._first_seen.get(source, now),
            "last_seen": now,
        }
        return self._ban(source, now, f"{failures} wrong passwords", evidence)

    def on_auth_refused(self, address: IPAddress, username: str, now: float) -> None:
        """A stranger's login refused before hashing (a name under attack, under-attack
        mode), once the refusal stands: a retry the authenticator lets through is not
        counted. Still evidence of the attack: keeps the name and the relay's mode hot
        although nothing is hashed any more."""
        source = self.source_of(address)
        self._failing_sources_by_user.add(username, source, now)
        self._attack_evidence(source, now)

    def on_auth_busy(self, address: IPAddress, now: float) -> None:
        """A stranger's login refused because the strangers' share of the verification pool
        is taken: more strangers are logging in than the relay verifies. Evidence toward
        entering under-attack mode (more of them come than one lane can take only in a
        flood), never toward a ban (no password was found wrong), nor toward staying in it:
        in the mode, strangers' first tries never reach the pool anyway."""
        if not self.under_attack and not self.allowed(address):
            self._attack_evidence(self.source_of(address), now)

    def on_strangers_refused(self, count: int, seconds: float, now: float) -> None:
        """Strangers refused for their shared rate: `count` over the last `seconds` (the
        relay's own door, or the strangers' door process's report). Thousands a second is a
        connection flood, never a small host's background: under-attack mode starts on it
        at once, before the flood's first guesses reach argon2 (their failed logins would
        start it only after `attack_failures_per_minute` of them). Toward entering the mode
        only, like a busy verification thread: failed logins decide when it ends."""
        threshold = self.config.attack_refused_connections_per_second
        if not threshold or self.under_attack or seconds <= 0:
            return
        per_second = count / max(seconds, 0.1)  # a tenth of a second's worth at least
        if per_second >= threshold:
            self._flood_reason = f"{per_second:.0f} strangers refused a second at the door"
            self._enter_on(self._flood_reason)

    def _attack_evidence(self, source: IPNetwork, now: float) -> None:
        """A failed or refused login, toward under-attack mode. The mode starts here, at
        once, rather than at the next tick: in a flood's first second, strangers still
        reach argon2 until it does."""
        self._global_failures.add("all", now)
        self._global_sources.add("all", source, now)
        if not self.under_attack:
            rate, sources = self._attack_figures(now)
            if self._hot(rate, sources):
                self._enter(rate, sources)

    def on_auth_success(self, address: IPAddress, username: str, now: float) -> bool:
        """Remembers a known-good pair. True when it is new (worth persisting now)."""
        key = (username, self.prefix_of(address))
        previous = self.known_good.get(key)
        self.remember_known_good(username, key[1], now)
        return previous is None or now - previous > 86400.0

    def remember_known_good(self, username: str, prefix: IPNetwork, when: float) -> None:
        key = (username, prefix)
        if key not in self.known_good:
            self._known_prefixes[prefix] += 1
        self.known_good[key] = max(when, self.known_good.get(key, 0.0))

    # --- bans ----------------------------------------------------------------------------

    def _ban(
        self, network: IPNetwork, now: float, reason: str, evidence: dict[str, object]
    ) -> list[Ban]:
        if self.monitor:
            self.counters.would_have["ban"] += 1
            log.info("monitor: would ban %s: %s", network, reason)
            return []
        level, last = self._levels.get(network, (0, 0.0))
        level = level + 1 if now - last <= LEVEL_MEMORY else 1
        self._levels[network] = (level, now)
        self._levels.move_to_end(network)
        if len(self._levels) > MAX_REMEMBERED_LEVELS:
            self._levels.popitem(last=False)
        config = self.config
        duration = escalated_duration(
            config.ban_time, config.ban_escalation, config.ban_max_time, level
        )
        ban = Ban(network, now + duration, reason, "auto", now, level, dict(evidence))
        self.bans.put(ban)
        self.counters.bans_made += 1
        made = [ban]
        # Several banned addresses in one neighbourhood: ban the neighbourhood.
        if config.prefix_ban_after_bans and network.num_addresses == 1:
            prefix = self.prefix_of(network.network_address)
            self._banned_in_prefix.add(prefix, network, now)
            banned_here = self._banned_in_prefix.count(prefix, now)
            existing = self.bans.get(prefix)
            if banned_here >= config.prefix_ban_after_bans and (
                existing is None or not existing.active(now)
            ):
                members = [str(n) for n in self._banned_in_prefix.tokens(prefix, now)]
                made += self._ban(
                    prefix,
                    now,
                    f"{banned_here} addresses of this network banned",
                    {"banned_addresses": members[:50]},
                )
        return made

    def add_ban(self, ban: Ban) -> None:
        """A ban from elsewhere (the database, an operator)."""
        self.bans.put(ban)
        if ban.source == "auto":
            self._levels[ban.network] = (
                max(ban.level, self._levels.get(ban.network, (0, 0.0))[0]),
                ban.created,
            )

    def load_bans(self, bans: Iterable[Ban]) -> None:
        bans = list(bans)
        self.bans.replace_all(bans)
        for ban in bans:
            if ban.source == "auto":
                level, _ = self._levels.get(ban.network, (0, 0.0))
                self._levels[ban.network] = (max(level, ban.level), ban.created)

    # --- the operator's view ----------------------------------------------------------------

    def explain(self, address: IPAddress, now: float) -> dict[str, object]:
        """What the live counters say about one address (`mailfence explain IP`)."""
        source, prefix = self._networks(address)
        ban = self.bans.find(address, now)
        names = sorted(
            {str(t[0]) for t in self._failures.tokens(source, now) if isinstance(t, tuple)}
        )
        level, last_ban = self._levels.get(source, (0, 0.0))
        return {
            "address": str(address),
            "source": str(source),
            "prefix": str(prefix),
            "allowlisted": self.allowed(address),
            "ban_in_force": None
            if ban is None
            else {"network": str(ban.network), "reason": ban.reason, "until": ban.until},
            "open_connections_from_source": self.live_sources.get(source, 0),
            "open_connections_from_prefix": self.live_prefixes.get(prefix, 0),
            "connections_in_rate_window": {
                "source": self._rate_source.count(source, now),
                "prefix": self._rate_prefix.count(prefix, now),
                "window_seconds": self.config.connection_rate_window,
            },
            "refused_connections_in_window": self._refused.count(source, now),
            "ban_after_refused_connections": self.config.ban_after_refused_connections,
            "distinct_wrong_passwords": self._failures.count(source, now),
            "failure_window_seconds": self.config.failure_window,
            "ban_after_failures": self.config.ban_after_failures,
            "usernames_tried": names[:20],
            "usernames_under_attack": [n for n in names if self.username_under_attack(n, now)],
            "first_failure": self._first_seen.get(source),
            "ban_level": level,
            "last_ban": last_ban or None,
            "known_good_users_from_prefix": sorted(
                user for (user, net), _ in self.known_good.items() if net == prefix
            )[:20],
            "under_attack_mode": self.under_attack,
        }

    # --- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> str | None:
        """Once a second: expiry and under-attack mode. Returns 'enter'/'leave' on a change
        since the last tick (the mode may have started in between, on evidence)."""
        self.bans.expire(now)
        config = self.config
        rate, sources = self._attack_figures(now)
        if not self.under_attack and self._hot(rate, sources):
            self._enter(rate, sources)
        if self.under_attack:
            self.attack_reason = _attack_reason(rate, sources)
            if self._flood_reason and not self._hot(rate, sources):
                self.attack_reason = f"{self._flood_reason}; {self.attack_reason}"
        change, self._change = self._change, None
        if change is not None:
            return change
        if self.under_attack:
            calm = (
                rate < config.attack_failures_per_minute / 2
                and sources < config.attack_failing_sources / 2
            )
            if not calm:
                self._calm_since = None
            elif self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= config.attack_exit_after:
                self.under_attack = False
                self._calm_since = None
                self._flood_reason = ""
                self._set_strangers_rate(self._strangers_rate)
                log.warning("attack over: %.0f failed logins/min from %d sources", rate, sources)
                return "leave"
        return None

    def _attack_figures(self, now: float) -> tuple[float, int]:
        """(failed logins per minute, distinct failing sources) for under-attack mode."""
        rate = self._global_failures.count("all", now) * 60.0 / ATTACK_RATE_WINDOW
        return rate, self._global_sources.count("all", now)

    def _hot(self, rate: float, sources: int) -> bool:
        config = self.config
        return rate >= config.attack_failures_per_minute or sources >= config.attack_failing_sources

    def _enter(self, rate: float, sources: int) -> None:
        self._enter_on(_attack_reason(rate, sources))

    def _enter_on(self, reason: str) -> None:
        self.under_attack = True
        self._calm_since = None
        self._change = "enter"
        # Each stranger let in costs a TLS handshake on the customers' event loop, and in
        # this mode it gets one AUTH, refused unless it is a retry: let fewer in.
        self._set_strangers_rate(self._attack_strangers_rate)
        self.attack_reason = reason
        log.warning("under attack: %s", reason)

    def _set_strangers_rate(self, per_second: float) -> None:
        self.strangers.set_rate(per_second)
        if self.on_strangers_rate is not None:
            self.on_strangers_rate(per_second)

    def housekeeping(self, now: float) -> None:
        """Every minute or so: forget windows that have emptied."""
        for window in (self._rate_source, self._rate_prefix):
            window.expire(now)
        self._refused.expire(now)
        for distinct in (self._failures, self._failing_sources_by_user, self._banned_in_prefix):
            distinct.expire(now)


def _attack_reason(rate: float, sources: int) -> str:
    return f"{rate:.0f} failed logins/min from {sources} sources"
