"""The TOML settings as frozen dataclasses.

This module only reads and validates; nothing here opens a socket or a database. Every error
names the file, the key and the fix, because the person reading it is an operator at a
terminal, not a developer with a debugger.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TLSMode = Literal["starttls", "implicit", "none"]
FailureReply = Literal["temporary", "permanent"]
BareNewline = Literal["normalize", "reject"]
DefenseMode = Literal["enforce", "monitor"]

DEFAULT_CONFIG_NAME = "mailfence.toml"
# Where `mailfence install systemd` puts the settings: commands find them without --config.
SYSTEM_CONFIG = Path("/etc/mailfence/mailfence.toml")


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line an operator can act on."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        super().__init__(f"{source}: {key}: {problem}; fix: {fix}")


@dataclass(frozen=True)
class Listener:
    address: str
    host: str
    port: int
    tls: TLSMode
    proxy_protocol: bool = False


@dataclass(frozen=True)
class TLSConfig:
    cert: str = ""
    key: str = ""


@dataclass(frozen=True)
class SMTPConfig:
    # The name in the greeting, in Received lines and in EHLO to upstreams; like Postfix's
    # myhostname it defaults to this machine's name. Set it to the name in your DNS.
    hostname: str = field(default_factory=socket.gethostname)
    max_connections: int = 1000
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: a server waits 5 minutes per command
    data_timeout: float = 600.0
    tls_handshake_timeout: float = 30.0
    shutdown_timeout: float = 30.0
    bare_newline: BareNewline = "normalize"


@dataclass(frozen=True)
class AuthConfig:
    plaintext_networks: tuple[IPNetwork, ...] = ()
    failure_reply: FailureReply = "temporary"
    verify_threads: int = 2
    verify_threads_unknown: int = 1
    verify_queue: int = 0
    verify_queue_known: int = 256
    cache_ttl: float = 3600.0
    argon2_time_cost: int = 2
    argon2_memory_kib: int = 19456
    argon2_parallelism: int = 1


@dataclass(frozen=True)
class RelayConfig:
    upstream: str = ""
    upstream_username: str = ""
    upstream_password_file: str = ""
    upstream_tls_verify: bool = True
    upstream_ca_file: str = ""
    max_message_bytes: int = 26214400
    max_recipients: int = 100
    delivery_workers: int = 8
    delivery_process: bool = True
    messages_per_connection: int = 100
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)
    max_queue_age: float = 5 * 86400.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    mx_port: int = 25
    dns_servers: tuple[str, ...] = ()
    mx_allow_private: bool = False


@dataclass(frozen=True)
class DefenseConfig:
    mode: DefenseMode = "enforce"
    allowlist: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    max_connections_per_ip: int = 20
    max_connections_per_prefix: int = 50
    connection_rate_per_ip: int = 60
    connection_rate_per_prefix: int = 300
    connection_rate_window: float = 60.0
    ban_after_refused_connections: int = 600
    unknown_connections_per_second: int = 50
    door_process: bool = True
    known_good_reserved: float = 0.2
    known_good_window: float = 30 * 86400.0
    auth_attempts_per_session: int = 3
    failure_window: float = 600.0
    ban_after_failures: int = 10
    prefix_ban_after_bans: int = 3
    ban_time: float = 900.0
    ban_escalation: float = 4.0
    ban_max_time: float = 7 * 86400.0
    honeypot_users: tuple[str, ...] = ("admin", "administrator", "root", "test", "guest", "user")
    username_attack_sources: int = 5
    negative_cache_ttl: float = 600.0
    attack_failures_per_minute: int = 60
    attack_failing_sources: int = 20
    attack_refused_connections_per_second: int = 500
    attack_exit_after: float = 300.0
    attack_auth_attempts_per_session: int = 1
    attack_max_connections_per_ip: int = 3
    attack_session_timeout: float = 30.0
    attack_unknown_connections_per_second: int = 10


@dataclass(frozen=True)
class SpoolConfig:
    max_messages: int = 100000


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "control.sock"  # relative: in state_dir


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9325"  # empty: no metrics endpoint


@dataclass(frozen=True)
class HealthConfig:
    webhooks: tuple[str, ...] = ()
    webhook_timeout: float = 5.0
    known_wait_degraded: float = 0.5  # p99 wait of the known-good lane that means degraded
    spool_degraded: float = 0.8  # share of spool.max_messages that means degraded


LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class LogConfig:
    format: LogFormat = "text"
    level: str = "info"
    flood_lines: int = 20  # per category per flood_window, then a summary
    flood_window: float = 10.0


@dataclass(frozen=True)
class Config:
    source: str = "<embedded defaults>"
    state_dir: Path = Path("./mailfence-data")
    listen: tuple[Listener, ...] = field(
        default_factory=lambda: (
            Listener("127.0.0.1:2525", "127.0.0.1", 2525, "starttls"),
            Listener("127.0.0.1:2465", "127.0.0.1", 2465, "implicit"),
        )
    )
    tls: TLSConfig = field(default_factory=TLSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def database_path(self) -> Path:
        return self.state_dir / "mailfence.sqlite3"

    @property
    def control_socket(self) -> Path:
        path = Path(self.control.socket)
        return path if path.is_absolute() else self.state_dir / path


# What a reload (SIGHUP, `systemctl reload mailfence`) applies to a running relay: these
# settings, and the sections below but for RESTART_ONLY. Every other setting keeps its
# running value until a restart, and the reload's log line names each one that changed (see
# `needs_restart`). Relay settings apply by restarting delivery (it finishes its current
# messages first); the certificate files are read again always.
LIVE_SETTINGS = frozenset(
    {
        "tls.cert",
        "tls.key",
        "smtp.hostname",
        "smtp.max_connections",
        "smtp.command_timeout",
        "smtp.data_timeout",
        "smtp.tls_handshake_timeout",
        "smtp.shutdown_timeout",
        "smtp.bare_newline",
        "auth.plaintext_networks",
        "auth.failure_reply",
        "health.known_wait_degraded",
        "health.spool_degraded",
        "log.level",
    }
)
LIVE_SECTIONS = frozenset({"relay", "defense"})
# Within those sections: what shapes state built at start (windows, buckets, prefix keys).
RESTART_ONLY = frozenset(
    {
        "relay.delivery_process",
        "defense.connection_rate_window",
        "defense.failure_window",
        "defense.unknown_connections_per_second",
        "defense.attack_unknown_connections_per_second",
        "defense.door_process",
        "defense.ipv4_prefix",
        "defense.ipv6_prefix",
        "defense.negative_cache_ttl",
        "defense.known_good_window",
    }
)


def changed_settings(old: Config, new: Config) -> list[str]:
    """The settings whose values differ, as "section.key" (or "listen", "state_dir")."""
    changed = []
    for top in fields(Config):
        if top.name == "source":
            continue
        before, after = getattr(old, top.name), getattr(new, top.name)
        if before == after:
            continue
        if is_dataclass(before) and is_dataclass(after):
            changed += [
                f"{top.name}.{item.name}"
                for item in fields(before)
                if getattr(before, item.name) != getattr(after, item.name)
            ]
        else:
            changed.append(top.name)
    return changed


def needs_restart(changed: list[str]) -> list[str]:
    return [
        name
        for name in changed
        if name in RESTART_ONLY
        or (name not in LIVE_SETTINGS and name.partition(".")[0] not in LIVE_SECTIONS)
    ]


def keep_running(running: Config, new: Config, names: list[str]) -> Config:
    """`new` with each named setting ("section.key" or a top-level name) put back to its
    running value: the configuration a reload can apply. Everything the reload hands on (the
    delivery process, health, the spool's bound) reads this one, so a setting the log says
    waits for a restart is not half applied somewhere (a new state_dir under delivery)."""
    sections: dict[str, dict[str, Any]] = {}
    top_level: dict[str, Any] = {}
    for name in names:
        section, _, key = name.partition(".")
        if key:
            sections.setdefault(section, {})[key] = getattr(getattr(running, section), key)
        else:
            top_level[name] = getattr(running, name)
    for section, values in sections.items():
        top_level[section] = replace(getattr(new, section), **values)
    return replace(new, **top_level)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """'90' or '90s' → 90.0, '5m' → 300.0, '4h', '5d'. Raises ValueError."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' → (host, port). Raises ValueError."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


class _Section:
    """Reads one TOML table, remembering which keys were used so leftovers can be refused."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem, fix)

    def _get(self, name: str) -> Any:
        self.used.add(name)
        return self.table.get(name)

    def text(self, name: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {value!r}", f'write {name} = "..."')
        if choices and value not in choices:
            raise self.fail(
                name, f"{value!r} is not one of {', '.join(choices)}", f"use one of {choices}"
            )
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int = 2**62) -> int:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be a whole number, got {value!r}", f"write {name} = 10")
        if not minimum <= value <= maximum:
            raise self.fail(
                name, f"{value} is out of range", f"use a number from {minimum} to {maximum}"
            )
        return value

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, got {value!r}", f"write {name} = 0.5")
        if not minimum <= value <= maximum:
            raise self.fail(
                name, f"{value} is out of range", f"use a number from {minimum} to {maximum}"
            )
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}", f"write {name} = true")
        return value

    def duration(self, name: str, default: float, minimum: float = 0.001) -> float:
        return self._to_duration(name, self._get(name), default, minimum)

    def _to_duration(self, name: str, value: Any, default: float, minimum: float) -> float:
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise ValueError(value)
            seconds = float(value) if isinstance(value, int | float) else parse_duration(value)
        except (ValueError, TypeError):
            raise self.fail(
                name,
                f"{value!r} is not a duration",
                'write seconds as a number or a string like "30s", "5m", "4h", "5d"',
            ) from None
        if seconds < minimum:
            raise self.fail(name, f"{value!r} is too short", f"use at least {minimum} seconds")
        return seconds

    def durations(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, list) or not value:
            raise self.fail(name, "must be a non-empty list", f'write {name} = ["1m", "5m", "1h"]')
        return tuple(self._to_duration(name, item, 0.0, 0.001) for item in value)

    def strings(self, name: str) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, "must be a list of strings", f'write {name} = ["..."]')
        return tuple(value)

    def table_of(self, name: str) -> Mapping[str, Any]:
        value = self._get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table", f"write it as a [{self.key(name)}] section")
        return cast(Mapping[str, Any], value)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(self.used), n=1)
            fix = f"did you mean {self.key(close[0])!r}?" if close else "remove it"
            fix += " (mailfence.example.toml lists every key)"
            raise self.fail(name, "unknown key", fix)


def _networks(section: _Section, name: str) -> tuple[IPNetwork, ...]:
    result = []
    for text in section.strings(name):
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise section.fail(
                name, f"{text!r} is not a network", 'write networks like "127.0.0.0/8"'
            ) from None
    return tuple(result)


def _listeners(source: str, value: Any) -> tuple[Listener, ...]:
    if value is None:
        return Config().listen
    if not isinstance(value, list) or not value:
        raise ConfigError(
            source, "listen", "must be [[listen]] tables", "see mailfence.example.toml"
        )
    result = []
    for index, table in enumerate(value):
        if not isinstance(table, dict):
            raise ConfigError(source, "listen", "must be [[listen]] tables", "see the example")
        section = _Section(source, f"listen[{index}]", table)
        address = section.text("address", "")
        try:
            host, port = parse_address(address)
        except ValueError:
            raise section.fail(
                "address", f"{address!r} is not host:port", 'write "127.0.0.1:2525" or "[::1]:2525"'
            ) from None
        tls = cast(TLSMode, section.text("tls", "starttls", ("starttls", "implicit", "none")))
        proxy = section.flag("proxy_protocol", False)
        if proxy and tls == "implicit":
            raise section.fail(
                "proxy_protocol",
                "is not supported on an implicit-TLS listener",
                "put the proxy in front of a starttls listener, or terminate TLS at the proxy",
            )
        section.done()
        result.append(Listener(address, host, port, tls, proxy))
    return tuple(result)


def _upstream_ok(url: str) -> bool:
    return (
        url == "" or re.fullmatch(r"(smtp|smtp\+starttls|smtps)://[^/:]+(:\d+)?/?", url) is not None
    )


def from_mapping(data: Mapping[str, Any], source: str, base_dir: Path) -> Config:
    """Builds a Config from parsed TOML.

    A relative `state_dir` is taken from the file's folder; other relative paths (certificate,
    key, password and CA files) from the state directory, see `resolve_path`.
    """
    top = _Section(source, "", data)
    state_dir = Path(top.text("state_dir", "./mailfence-data"))
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    listen = _listeners(source, top._get("listen"))

    sec = _Section(source, "tls", top.table_of("tls"))
    tls = TLSConfig(cert=sec.text("cert", ""), key=sec.text("key", ""))
    if bool(tls.cert) != bool(tls.key):
        raise sec.fail("cert", "cert and key must be given together", "set both, or neither")
    sec.done()

    d = SMTPConfig()
    sec = _Section(source, "smtp", top.table_of("smtp"))
    smtp = SMTPConfig(
        hostname=sec.text("hostname", "") or d.hostname,
        max_connections=sec.integer("max_connections", d.max_connections, 1),
        command_timeout=sec.duration("command_timeout", d.command_timeout),
        data_timeout=sec.duration("data_timeout", d.data_timeout),
        tls_handshake_timeout=sec.duration("tls_handshake_timeout", d.tls_handshake_timeout),
        shutdown_timeout=sec.duration("shutdown_timeout", d.shutdown_timeout, 0.0),
        bare_newline=cast(
            BareNewline, sec.text("bare_newline", d.bare_newline, ("normalize", "reject"))
        ),
    )
    sec.done()

    a = AuthConfig()
    sec = _Section(source, "auth", top.table_of("auth"))
    auth = AuthConfig(
        plaintext_networks=_networks(sec, "plaintext_networks"),
        failure_reply=cast(
            FailureReply,
            sec.text("failure_reply", a.failure_reply, ("temporary", "permanent")),
        ),
        verify_threads=sec.integer("verify_threads", a.verify_threads, 1, 256),
        verify_threads_unknown=sec.integer(
            "verify_threads_unknown", a.verify_threads_unknown, 1, 256
        ),
        verify_queue=sec.integer("verify_queue", a.verify_queue, 0, 100000),
        verify_queue_known=sec.integer("verify_queue_known", a.verify_queue_known, 0, 100000),
        cache_ttl=sec.duration("cache_ttl", a.cache_ttl, 0.0),
        argon2_time_cost=sec.integer("argon2_time_cost", a.argon2_time_cost, 1, 100),
        argon2_memory_kib=sec.integer("argon2_memory_kib", a.argon2_memory_kib, 8, 4 * 1024 * 1024),
        argon2_parallelism=sec.integer("argon2_parallelism", a.argon2_parallelism, 1, 64),
    )
    sec.done()

    r = RelayConfig()
    sec = _Section(source, "relay", top.table_of("relay"))
    upstream = sec.text("upstream", r.upstream)
    if not _upstream_ok(upstream):
        raise sec.fail(
            "upstream",
            f"{upstream!r} is not an upstream URL",
            'write "smtp://host:587", "smtp+starttls://host:587", "smtps://host:465" or ""',
        )
    relay = RelayConfig(
        upstream=upstream,
        upstream_username=sec.text("upstream_username", r.upstream_username),
        upstream_password_file=sec.text("upstream_password_file", r.upstream_password_file),
        upstream_tls_verify=sec.flag("upstream_tls_verify", r.upstream_tls_verify),
        upstream_ca_file=sec.text("upstream_ca_file", r.upstream_ca_file),
        max_message_bytes=sec.integer("max_message_bytes", r.max_message_bytes, 1024),
        max_recipients=sec.integer("max_recipients", r.max_recipients, 1, 100000),
        delivery_workers=sec.integer("delivery_workers", r.delivery_workers, 1, 1000),
        delivery_process=sec.flag("delivery_process", r.delivery_process),
        messages_per_connection=sec.integer(
            "messages_per_connection", r.messages_per_connection, 1, 100000
        ),
        retry_schedule=sec.durations("retry_schedule", r.retry_schedule),
        max_queue_age=sec.duration("max_queue_age", r.max_queue_age),
        connect_timeout=sec.duration("connect_timeout", r.connect_timeout),
        command_timeout=sec.duration("command_timeout", r.command_timeout),
        mx_port=sec.integer("mx_port", r.mx_port, 1, 65535),
        dns_servers=sec.strings("dns_servers"),
        mx_allow_private=sec.flag("mx_allow_private", r.mx_allow_private),
    )
    if relay.upstream_username and relay.upstream.startswith("smtp://"):
        raise sec.fail(
            "upstream",
            "smtp:// may fall back to plain text, which would send upstream_username's password"
            " in the clear",
            'use "smtp+starttls://" or "smtps://" with upstream credentials',
        )
    if relay.upstream_username and not relay.upstream_password_file:
        raise sec.fail(
            "upstream_password_file",
            "upstream_username is set but no password file is",
            "put the password in a file readable only by mailfence and name it here",
        )
    sec.done()

    sec = _Section(source, "spool", top.table_of("spool"))
    spool = SpoolConfig(max_messages=sec.integer("max_messages", SpoolConfig.max_messages, 1))
    sec.done()
    defense = _defense(_Section(source, "defense", top.table_of("defense")))

    sec = _Section(source, "control", top.table_of("control"))
    control = ControlConfig(socket=sec.text("socket", ControlConfig.socket) or "control.sock")
    sec.done()

    sec = _Section(source, "metrics", top.table_of("metrics"))
    metrics = MetricsConfig(listen=sec.text("listen", MetricsConfig.listen))
    if metrics.listen:
        try:
            parse_address(metrics.listen)
        except ValueError:
            raise sec.fail(
                "listen", f"{metrics.listen!r} is not host:port", 'write "127.0.0.1:9325", or ""'
            ) from None
    sec.done()

    h = HealthConfig()
    sec = _Section(source, "health", top.table_of("health"))
    webhooks = sec.strings("webhooks")
    for url in webhooks:
        if not url.startswith(("http://", "https://")):
            raise sec.fail("webhooks", f"{url!r} is not an http(s) URL", 'write "https://..."')
    health = HealthConfig(
        webhooks=webhooks,
        webhook_timeout=sec.duration("webhook_timeout", h.webhook_timeout),
        known_wait_degraded=sec.duration("known_wait_degraded", h.known_wait_degraded),
        spool_degraded=sec.number("spool_degraded", h.spool_degraded, 0.01, 1.0),
    )
    sec.done()

    lg = LogConfig()
    sec = _Section(source, "log", top.table_of("log"))
    log_config = LogConfig(
        format=cast(LogFormat, sec.text("format", lg.format, ("text", "json"))),
        level=sec.text("level", lg.level, ("debug", "info", "warning", "error")),
        flood_lines=sec.integer("flood_lines", lg.flood_lines, 1),
        flood_window=sec.duration("flood_window", lg.flood_window, 1.0),
    )
    sec.done()
    top.done()
    return Config(
        source,
        state_dir,
        listen,
        tls,
        smtp,
        auth,
        relay,
        spool,
        defense,
        control,
        metrics,
        health,
        log_config,
    )


def _defense(sec: _Section) -> DefenseConfig:
    d = DefenseConfig()
    honeypots = sec.strings("honeypot_users") if "honeypot_users" in sec.table else None
    result = DefenseConfig(
        mode=cast(DefenseMode, sec.text("mode", d.mode, ("enforce", "monitor"))),
        allowlist=_networks(sec, "allowlist"),
        trusted_proxies=_networks(sec, "trusted_proxies"),
        ipv4_prefix=sec.integer("ipv4_prefix", d.ipv4_prefix, 8, 32),
        ipv6_prefix=sec.integer("ipv6_prefix", d.ipv6_prefix, 16, 128),
        max_connections_per_ip=sec.integer("max_connections_per_ip", d.max_connections_per_ip, 1),
        max_connections_per_prefix=sec.integer(
            "max_connections_per_prefix", d.max_connections_per_prefix, 1
        ),
        connection_rate_per_ip=sec.integer("connection_rate_per_ip", d.connection_rate_per_ip, 1),
        connection_rate_per_prefix=sec.integer(
            "connection_rate_per_prefix", d.connection_rate_per_prefix, 1
        ),
        connection_rate_window=sec.duration("connection_rate_window", d.connection_rate_window),
        ban_after_refused_connections=sec.integer(
            "ban_after_refused_connections", d.ban_after_refused_connections, 0
        ),
        unknown_connections_per_second=sec.integer(
            "unknown_connections_per_second", d.unknown_connections_per_second, 1
        ),
        door_process=sec.flag("door_process", d.door_process),
        known_good_reserved=sec.number("known_good_reserved", d.known_good_reserved, 0.0, 0.9),
        known_good_window=sec.duration("known_good_window", d.known_good_window),
        auth_attempts_per_session=sec.integer(
            "auth_attempts_per_session", d.auth_attempts_per_session, 1
        ),
        failure_window=sec.duration("failure_window", d.failure_window),
        ban_after_failures=sec.integer("ban_after_failures", d.ban_after_failures, 1),
        prefix_ban_after_bans=sec.integer("prefix_ban_after_bans", d.prefix_ban_after_bans, 0),
        ban_time=sec.duration("ban_time", d.ban_time),
        ban_escalation=sec.number("ban_escalation", d.ban_escalation, 1.0, 100.0),
        ban_max_time=sec.duration("ban_max_time", d.ban_max_time),
        honeypot_users=d.honeypot_users if honeypots is None else honeypots,
        username_attack_sources=sec.integer(
            "username_attack_sources", d.username_attack_sources, 1
        ),
        negative_cache_ttl=sec.duration("negative_cache_ttl", d.negative_cache_ttl, 0.0),
        attack_failures_per_minute=sec.integer(
            "attack_failures_per_minute", d.attack_failures_per_minute, 1
        ),
        attack_failing_sources=sec.integer("attack_failing_sources", d.attack_failing_sources, 1),
        attack_refused_connections_per_second=sec.integer(
            "attack_refused_connections_per_second",
            d.attack_refused_connections_per_second,
            0,
            10_000,
        ),
        attack_exit_after=sec.duration("attack_exit_after", d.attack_exit_after),
        attack_auth_attempts_per_session=sec.integer(
            "attack_auth_attempts_per_session", d.attack_auth_attempts_per_session, 1
        ),
        attack_max_connections_per_ip=sec.integer(
            "attack_max_connections_per_ip", d.attack_max_connections_per_ip, 1
        ),
        attack_session_timeout=sec.duration("attack_session_timeout", d.attack_session_timeout),
        attack_unknown_connections_per_second=sec.integer(
            "attack_unknown_connections_per_second", d.attack_unknown_connections_per_second, 1
        ),
    )
    sec.done()
    return result


def default_path() -> Path | None:
    """./mailfence.toml if present, else /etc/mailfence/mailfence.toml if present, else None
    (the embedded defaults)."""
    for candidate in (Path(DEFAULT_CONFIG_NAME), SYSTEM_CONFIG):
        if candidate.exists():
            return candidate
    return None


def load(path: Path | None) -> Config:
    """Loads `path`, or the default file (see `default_path`), or the embedded defaults."""
    if path is None:
        path = default_path()
        if path is None:
            return Config()
    source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "does not exist", "check the --config path") from None
    except OSError as error:
        raise ConfigError(
            source, "(file)", f"cannot be read ({error.strerror})", "check its permissions"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, "(syntax)", str(error), "correct the TOML syntax") from None
    return from_mapping(data, source, path.resolve().parent)


def resolve_path(config: Config, value: str) -> Path:
    """A path from the config; relative ones are taken from the state directory."""
    path = Path(value)
    return path if path.is_absolute() else config.state_dir / path
