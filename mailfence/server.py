"""The relay's lifecycle: startup, the main loop's housekeeping, signals and shutdown.

Shaped like uvicorn's `Server`: `run()` → `serve()` → `startup()` → `main_loop()` →
`shutdown()`. Signal handlers only set flags; the main loop ticks every 0.1 s and acts on them.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import itertools
import logging
import math
import signal
import sqlite3
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from mailfence import config as config_module
from mailfence.auth import (
    Accounts,
    Authenticator,
    CredentialCache,
    VerificationPool,
    accounts_from_database,
    make_hasher,
)
from mailfence.config import Config, ConfigError
from mailfence.defense import Ban, Defense
from mailfence.defense.net import IPNetwork, parse_ip
from mailfence.delivery.process import DeliveryProcess
from mailfence.delivery.worker import Delivery, UpstreamPasswordError, read_upstream_password
from mailfence.observe import control as control_socket
from mailfence.observe.health import Health
from mailfence.observe.live import Observer
from mailfence.observe.logs import LEVELS, FloodLimiter
from mailfence.observe.metrics import MetricsServer
from mailfence.observe.webhooks import Webhooks
from mailfence.smtp import replies
from mailfence.smtp.handler import RelayHandler
from mailfence.smtp.listeners import ListenError, Listeners
from mailfence.smtp.tls import TLSSetupError, ensure_self_signed, server_context
from mailfence.spool import Spool
from mailfence.store import StoreError, Writer, connect, history, open_database
from mailfence.store import defense as defense_table
from mailfence.store.writer import checkpoint
from mailfence.systemd import Notifier

log = logging.getLogger("mailfence")

TICK = 0.1
SWITCH_INTERVAL = 0.001
MAX_UNCONFIRMED_BANS = 10_000  # automatic bans awaiting their commit (a failing disk)
MAX_BAN_SECONDS = 10 * 365 * 86400.0  # longer than that is what `permanent` is for
CHECKPOINT_INTERVAL = 5.0  # seconds between WAL checkpoints (the writer's own is a far bound)


def _network(value: object) -> IPNetwork:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address or network") from None


class StartupError(Exception):
    """The relay cannot start; the message is the one line to show the operator."""


def _users_signature(conn: sqlite3.Connection) -> tuple[int, float]:
    row = conn.execute("SELECT count(*), total(updated) FROM users").fetchone()
    return int(row[0]), float(row[1])


class Server:
    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        install_signals: bool = True,
        flood_limiter: FloodLimiter | None = None,
    ) -> None:
        self.config = config
        self.flood_limiter = flood_limiter
        self.notifier = Notifier.from_environment()  # systemd's Type=notify, if under it
        self.systemd_status = ""
        self.install_signals = install_signals
        self.config_path = config_path
        self.should_exit = False
        self.force_exit = False
        self.stopping = False  # shutdown has begun: nothing new starts (a reload's delivery)
        self.reload_requested = False
        self.started_at = time.monotonic()
        self.ready_event: asyncio.Event | None = None
        self.ports: list[int] = []
        self.next_cleanup = 0.0
        self.next_checkpoint = 0.0

    # --- entry points --------------------------------------------------------------------

    def run(self) -> None:
        """Blocks until the relay has stopped. Raises StartupError if it cannot start."""
        # The spool's writer thread gives up the GIL on every SQLite call and then waits a
        # whole switch interval (5 ms by default) to get it back from a busy event loop: a
        # commit of ten calls could take 50 ms under a flood. 1 ms bounds that convoy.
        sys.setswitchinterval(SWITCH_INTERVAL)
        uvloop.run(self.serve())

    async def serve(self) -> None:
        self.ready_event = asyncio.Event()
        await self.startup()
        try:
            self.ready_event.set()
            await self.main_loop()
        finally:
            await self.shutdown()

    # --- startup -------------------------------------------------------------------------

    async def startup(self) -> None:
        config = self.config
        if self.install_signals:  # only possible on the main thread
            # First thing: a SIGTERM during startup then means "stop once started".
            self._install_signal_handlers()
        try:
            conn = open_database(config.state_dir)
        except StoreError as error:
            raise StartupError(f"{config.source}: state_dir: {error}") from None
        self.writer = Writer(conn)
        self.watch_conn = connect(config.database_path)
        self.users_signature = await asyncio.to_thread(_users_signature, self.watch_conn)

        self.tls = self._tls_context()

        auth = config.auth
        self.accounts: Accounts = accounts_from_database(str(config.database_path))
        await self.accounts.reload()
        self.pool = VerificationPool(
            make_hasher(auth),
            auth.verify_threads,
            auth.verify_queue_known,
            auth.verify_queue,
            auth.verify_threads_unknown,
        )
        self.cache = CredentialCache(auth.cache_ttl, config.defense.negative_cache_ttl)
        self.authenticator = Authenticator(self.accounts, self.cache, self.pool)

        self.spool = Spool(self.writer, config.database_path, config.spool.max_messages)
        await self.spool.start()
        self.defense = Defense(config.defense)
        # Loads of the ban tables, one at a time and numbered; automatic bans not yet known
        # to be in the database, with the number of the last load that may have missed them.
        self.defense_lock = asyncio.Lock()
        self.defense_loads = 0
        self.unconfirmed_bans: dict[int, tuple[Ban, int | None]] = {}
        self.ban_numbers = itertools.count()
        # Writes of those bans not yet settled: a lift waits for them (see _settle_ban_writes).
        self.ban_writes: set[asyncio.Task[None]] = set()
        await self._load_defense_state(initial=True)
        self.background: set[asyncio.Task[None]] = set()
        self.handler = RelayHandler(config, self.authenticator, self.spool, self.defense)
        self.handler.on_bans = self._persist_bans
        self.handler.on_known_good = self._persist_known_good
        try:
            self.delivery = Delivery(config, self.spool)
        except UpstreamPasswordError as error:
            raise StartupError(str(error)) from None
        # The upstream password delivery runs with (or will, once a reload's restart is done).
        self.upstream_password = self.delivery.upstream_password
        self.listeners = Listeners(config, self.handler, self.tls, self.defense)
        self.defense.on_strangers_rate = self.listeners.strangers_rate_changed
        self.observer = Observer(
            config, self.defense, self.pool, self.spool, self.listeners, time.time()
        )
        self.observer.totals = self.handler.totals
        self.observer.tick(time.time())  # figures (and metrics) from the first second on
        self.observer.on_health_change = self._on_health_change
        self.webhooks = Webhooks(config.health.webhooks, timeout=config.health.webhook_timeout)
        self.on_health_document = self.webhooks.post
        self.control = control_socket.ControlServer(config.control_socket, self._commands())
        try:
            await self.control.start()
        except control_socket.ControlError as error:
            raise StartupError(f"{config.source}: control.socket: {error}") from None
        self.metrics: MetricsServer | None = None
        if config.metrics.listen:
            host, port = config_module.parse_address(config.metrics.listen)
            self.metrics = MetricsServer(host, port, lambda: self.observer.exported)
            try:
                self.metrics_port = self.metrics.start()
            except OSError as error:
                await self.control.close()
                raise StartupError(
                    f"{config.source}: metrics.listen: cannot listen on "
                    f"{config.metrics.listen} ({error.strerror or error}); fix: choose a free "
                    'port, or set listen = "" to turn metrics off'
                ) from None
        self.history_minute = int(time.time() // 60)
        self.history_base = self.observer.flat_totals()
        self.history_t250 = list(self.handler.totals.to_250_seconds.counts)
        # Everything loaded so far lives until exit: move it out of the collector's sight, so
        # a full collection scans only what sessions create (pauses fell from ~100 ms).
        gc.collect()
        gc.freeze()
        try:
            await self.listeners.start()
        except ListenError as error:
            await self.control.close()
            if self.metrics is not None:
                self.metrics.stop()
            raise StartupError(str(error)) from None
        self.steered: tuple[int, tuple[IPNetwork, ...]] | None = None
        await self._steer()
        self.ports = self.listeners.bound_ports()
        self.delivery_process: DeliveryProcess | None = None
        self.delivery_replacement: asyncio.Task[None] | None = None
        if config.relay.delivery_process:
            self.delivery_process = DeliveryProcess(config)
            self.spool.on_arrival = self.delivery_process.nudge
            self.delivery_process.start()
        else:
            self.delivery.start()
        described = ", ".join(
            f"{listener.tls} {listener.host}:{port}"
            for listener, port in zip(config.listen, self.ports, strict=True)
        )
        self.notifier.ready()  # the listeners are bound: systemd may start what depends on us
        self._report_status()
        log.info(
            "mailfence ready: %s; state in %s; %d users; %d queued",
            described,
            config.state_dir,
            len(self.accounts.users),
            self.spool.size,
        )

    # --- the defense's persistent state ---------------------------------------------------

    async def _load_defense_state(self, initial: bool) -> None:
        """Bans and the allowlist from the database (they change under the CLI's hand).

        One load at a time, so an older read never overwrites a newer one; and automatic
        bans this process made that the read may not have seen are kept."""
        async with self.defense_lock:
            self.defense_loads += 1
            number = self.defense_loads
            now = time.time()

            def read(conn: sqlite3.Connection) -> tuple[Any, ...]:
                conn.execute("BEGIN")  # one snapshot: the signature matches the rows
                try:
                    signature = defense_table.signature(conn)
                    bans = defense_table.active_bans(conn, now)
                    allowed = defense_table.allowlist(conn)
                    window = self.config.defense.known_good_window
                    pairs = defense_table.known_good(conn, now - window) if initial else []
                finally:
                    if conn.in_transaction:  # SQLite may have rolled back on an I/O error
                        conn.execute("COMMIT")
                return signature, bans, allowed, pairs

            signature, bans, allowed, pairs = await asyncio.to_thread(read, self.watch_conn)
            unseen = []
            for key, (ban, written_before_load) in list(self.unconfirmed_bans.items()):
                seen = written_before_load is not None and number > written_before_load
                if seen or not ban.active(time.time()):
                    del self.unconfirmed_bans[key]
                else:
                    unseen.append(ban)
            self.defense_signature = signature
            self.defense.load_bans([*unseen, *bans])  # the database's word last: it wins
            self.defense.allowlist = [*self.config.defense.allowlist, *allowed]
            for user, prefix, when in pairs:
                self.defense.remember_known_good(user, prefix, when)

    def _in_background(self, job: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(job)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def _persist_bans(self, bans: list[Ban]) -> None:
        for ban in bans:
            until = None if ban.permanent else ban.until
            self.observer.ban_recorded(str(ban.network), ban.reason, ban.source, until)
            self.control.publish(
                {"event": "ban", "network": str(ban.network), "reason": ban.reason, "until": until}
            )

        keys = []
        for ban in bans:
            keys.append(next(self.ban_numbers))
            self.unconfirmed_bans[keys[-1]] = (ban, None)
        while len(self.unconfirmed_bans) > MAX_UNCONFIRMED_BANS:
            del self.unconfirmed_bans[next(iter(self.unconfirmed_bans))]  # the oldest

        def insert(conn: sqlite3.Connection) -> tuple[Any, Any]:
            before = defense_table.signature(conn)
            defense_table.insert_bans(conn, bans)
            return before, defense_table.signature(conn)

        async def write() -> None:
            try:
                before, after = await self.writer.run(insert)
            except Exception:
                log.exception("could not record bans; they hold until restart")
                return
            # Committed: loads numbered after this one see them.
            for key in keys:
                if key in self.unconfirmed_bans:
                    self.unconfirmed_bans[key] = (self.unconfirmed_bans[key][0], self.defense_loads)
            # If nothing but these bans changed the tables since the last load (read under
            # the write lock, so no CLI change slips between), memory already holds all of
            # it: no reload of the whole ban list for the relay's own bans, which under a
            # flood came every second and took ~2.4 us a ban on the event loop. Otherwise
            # the mismatch stays, and housekeeping reloads.
            if before == self.defense_signature:
                self.defense_signature = after

        task = self._in_background(write())
        self.ban_writes.add(task)
        task.add_done_callback(self.ban_writes.discard)

    async def _settle_ban_writes(self) -> list[int]:
        """Before a lift: waits until every ban made so far is written or has failed (a lift
        queued ahead of a ban's insert would leave that ban in force in the database while
        memory forgot it), and returns their keys: the bans the lift is about. Bans made
        after this are not the operator's to lift."""
        keys = list(self.unconfirmed_bans)
        if self.ban_writes:
            await asyncio.wait(set(self.ban_writes))
        return keys

    def _unwritten_bans(self, keys: list[int], network: IPNetwork | None, now: float) -> int:
        """How many of these bans (on exactly `network`, or all) are in force with no
        database row to lift, once their writes have settled: the disk refused them. Without
        counting these, `unban` found no row and the ban held until it expired or the relay
        restarted."""
        count = 0
        for key in keys:
            ban, written = self.unconfirmed_bans.get(key, (None, 0))
            on_network = network is None or (ban is not None and ban.network == network)
            if ban is not None and written is None and ban.active(now) and on_network:
                count += 1
        return count

    def _forget_unconfirmed_bans(self, keys: list[int], network: IPNetwork | None) -> None:
        """Drops these bans (on `network`, or all) from what memory adds to the database's
        list; call it once the database's lift has committed."""
        for key in keys:
            entry = self.unconfirmed_bans.get(key)
            if entry is not None and (network is None or entry[0].network == network):
                del self.unconfirmed_bans[key]

    def _persist_known_good(self, user: str, prefix: IPNetwork, when: float) -> None:
        async def write() -> None:
            try:
                await self.writer.run(
                    lambda conn: defense_table.remember_known_good(conn, user, prefix, when)
                )
            except Exception:
                log.exception("could not record a known-good login")

        self._in_background(write())

    # --- seeing and steering ---------------------------------------------------------------

    def _collect_delivery_figures(self) -> None:
        if self.delivery_process is not None:
            reported = self.delivery_process.figures()
            restarts = self.delivery_process.restarts
        else:
            counters = self.delivery.counters
            reported = {
                "delivered": counters.delivered,
                "deferred": counters.deferred,
                "failed": counters.failed,
            }
            restarts = 0
        figures = self.observer.delivery
        figures.delivered = reported.get("delivered", 0)
        figures.deferred = reported.get("deferred", 0)
        figures.bounced = reported.get("failed", 0)
        figures.restarts = restarts

    async def _roll_up(self, minute: int) -> None:
        """Adds the figures gathered since the last roll-up to the hour of `minute` (unix
        minutes: the minute they were gathered in) in SQLite (`mailfence stats --since`).

        The tick rolls up each minute once it has ended; shutdown rolls up the minute in
        progress, so a restart loses none of them. Either way the hour is that minute's, not
        the clock's: a stop in the first seconds of an hour files the minute before it under
        the hour it belongs to."""
        flat = self.observer.flat_totals()
        changes = {name: flat[name] - self.history_base.get(name, 0) for name in flat}
        t250 = list(self.handler.totals.to_250_seconds.counts)
        t250_changes = [a - b for a, b in zip(t250, self.history_t250, strict=True)]
        hour = minute * 60 // 3600 * 3600
        wall = time.time()

        def write(conn: sqlite3.Connection) -> None:
            history.add_minute(conn, hour, changes, t250_changes)
            history.prune(conn, wall)

        await self.writer.run(write)
        # Only once written: after a failed write the next roll-up carries these figures too.
        self.history_base, self.history_t250 = flat, t250

    def _report_status(self) -> None:
        """`systemctl status` shows this line; sent only when it changes."""
        health = self.observer.health
        text = (
            f"{health.state}: {health.reason}; {self.listeners.open_connections} connections, "
            f"{self.spool.size} queued"
        )
        if text != self.systemd_status:
            self.systemd_status = text
            self.notifier.status(text)

    def _on_health_change(self, previous: Health, health: Health) -> None:
        level = logging.INFO if health.state == "ok" else logging.WARNING
        log.log(level, "health: %s -> %s: %s", previous.state, health.state, health.reason)
        snapshot = self.observer.snapshot(sessions=0)
        document = {
            "event": "health",
            "state": health.state,
            "previous": previous.state,
            "reason": health.reason,
            "time": time.time(),
            "host": self.config.smtp.hostname,
            "figures": {
                "connections_open": snapshot["connections"]["open"],
                "rates_10s": snapshot["rates"]["10s"],
                "spool": snapshot["spool"]["size"],
            },
        }
        self.control.publish(document)
        self.on_health_document(document)

    def _commands(self) -> dict[str, control_socket.Handler]:
        async def snapshot(request: dict[str, Any]) -> dict[str, Any]:
            sessions = int(request.get("sessions", 50))
            started = time.perf_counter()
            shot = self.observer.snapshot(sessions)
            return {"snapshot": shot, "build_ms": (time.perf_counter() - started) * 1000}

        async def health(request: dict[str, Any]) -> dict[str, Any]:
            h = self.observer.health
            return {"state": h.state, "reason": h.reason, "code": h.code}

        async def explain(request: dict[str, Any]) -> dict[str, Any]:
            try:
                address = parse_ip(str(request.get("ip", "")))
            except ValueError:
                raise ValueError(f"{request.get('ip')!r} is not an IP address") from None
            return {"live": self.defense.explain(address, time.time())}

        async def defense_changed(request: dict[str, Any]) -> dict[str, Any]:
            # `mailfence ban/unban/allow` wrote the database: apply it now, not within 1 s.
            forgotten = 0
            if request.get("cleared_auto") is True:  # `bans clear --auto`: memory's too
                # The CLI's lift ran outside this relay's writer: a ban the relay made
                # meanwhile may be written after it, in force. Lifting again through the
                # writer once those writes have settled ends them too; what is still
                # unwritten then is what the disk refused, held only in memory.
                keys = await self._settle_ban_writes()
                now = time.time()
                refused = self._unwritten_bans(keys, None, now)
                late = await self.writer.run(lambda conn: defense_table.lift_auto(conn, now))
                self._forget_unconfirmed_bans(keys, None)  # after the lift: a failed one keeps
                forgotten = late + refused
            await self._load_defense_state(initial=False)
            for ban in request.get("bans", []):
                self.observer.ban_recorded(
                    str(ban.get("network")), str(ban.get("reason", "")), "manual", ban.get("until")
                )
            self.control.publish({"event": "defense_changed", "time": time.time()})
            return {"bans_in_force": len(self.defense.bans), "forgotten": forgotten}

        async def ban(request: dict[str, Any]) -> dict[str, Any]:
            # The same as `mailfence ban`, for tools that hold only the socket.
            network = _network(request.get("network"))
            now = time.time()
            permanent = request.get("permanent", False) is True  # not "false", not 1
            try:
                seconds = float(request.get("seconds", 7200.0))
            except (TypeError, ValueError):
                seconds = math.nan
            # NaN would compare as never expiring: a typo must not make a permanent ban.
            if not permanent and not (0 < seconds <= MAX_BAN_SECONDS):
                raise ValueError(
                    f"seconds must be a number above 0 and at most {MAX_BAN_SECONDS:.0f} "
                    "(or permanent: true)"
                )
            reason = str(request.get("reason") or "banned by an operator")
            record = Ban(network, None if permanent else now + seconds, reason, "manual", now)

            def write(conn: sqlite3.Connection) -> None:
                defense_table.lift(conn, network, now)  # a new ban replaces the old one
                defense_table.insert_ban(conn, record)

            await self.writer.run(write)
            await self._load_defense_state(initial=False)
            self.observer.ban_recorded(str(network), reason, "manual", record.until)
            self.control.publish(
                {
                    "event": "ban",
                    "network": str(network),
                    "reason": reason,
                    "until": record.until,
                    "source": "manual",
                }
            )
            return {"network": str(network), "until": record.until}

        async def unban(request: dict[str, Any]) -> dict[str, Any]:
            network = _network(request.get("network"))
            keys = await self._settle_ban_writes()  # so the lift comes after their inserts
            now = time.time()
            held = self._unwritten_bans(keys, network, now)  # refused by the disk: memory only
            lifted = await self.writer.run(lambda conn: defense_table.lift(conn, network, now))
            self._forget_unconfirmed_bans(keys, network)  # after the lift: a failed one keeps
            lifted = lifted or held
            if not lifted:
                raise ValueError(f"no ban in force on exactly {network}")
            await self._load_defense_state(initial=False)
            self.control.publish({"event": "unban", "network": str(network)})
            return {"network": str(network), "lifted": lifted}

        async def users_changed(request: dict[str, Any]) -> dict[str, Any]:
            # `mailfence users ...` wrote the database: the account works (or stops) now.
            self.users_signature = await asyncio.to_thread(_users_signature, self.watch_conn)
            await self.accounts.reload()
            return {"users": len(self.accounts.users)}

        async def reload(request: dict[str, Any]) -> dict[str, Any]:
            self.reload_requested = True
            return {"reloading": True}

        return {
            "snapshot": snapshot,
            "health": health,
            "explain": explain,
            "ban": ban,
            "unban": unban,
            "defense-changed": defense_changed,
            "users-changed": users_changed,
            "reload": reload,
        }

    def _certificate_paths(self) -> tuple[Path, Path]:
        """The configured certificate, or the self-signed one (made on first use)."""
        config = self.config
        if config.tls.cert:
            cert = config_module.resolve_path(config, config.tls.cert)
            key = config_module.resolve_path(config, config.tls.key)
            return cert, key
        return ensure_self_signed(config.state_dir / "tls", config.smtp.hostname)

    def _tls_context(self) -> ssl.SSLContext:
        config = self.config
        cert, key = self._certificate_paths()
        try:
            return server_context(cert, key)
        except TLSSetupError as error:
            raise StartupError(
                f"{config.source}: tls.cert: {error}; fix: point tls.cert and tls.key at a "
                "readable PEM certificate and its key"
            ) from None

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_exit_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_exit_signal(self) -> None:
        # The first signal drains; a second one (an impatient Ctrl-C) skips the waiting.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def _on_reload_signal(self) -> None:
        self.reload_requested = True

    # --- the main loop -------------------------------------------------------------------

    async def main_loop(self) -> None:
        next_housekeeping = 0.0
        next_watchdog = 0.0
        watchdog_interval = self.notifier.watchdog_interval
        tending: asyncio.Task[None] | None = None
        try:
            while not self.should_exit:
                await asyncio.sleep(TICK)
                now = time.monotonic()
                # Sent from the loop itself, every tick, whatever housekeeping is doing: a
                # stalled loop stops it and systemd restarts us; a slow disk does not.
                if watchdog_interval is not None and now >= next_watchdog:
                    next_watchdog = now + watchdog_interval
                    self.notifier.watchdog()
                if (tending is None or tending.done()) and (
                    self.reload_requested or now >= next_housekeeping
                ):
                    next_housekeeping = now + 1.0
                    tending = asyncio.create_task(self._tend(now))
        finally:
            if tending is not None:
                await asyncio.wait([tending])  # shutdown closes what it uses

    async def _tend(self, now: float) -> None:
        """One round of housekeeping (and a pending reload), as its own task."""
        try:
            if self.reload_requested:
                self.reload_requested = False
                await self.reload()
            await self.housekeeping(now)
        except Exception:
            # A passing database error must not stop the relay; the next round tries again.
            log.exception("housekeeping failed; carrying on")

    async def housekeeping(self, now: float) -> None:
        if now >= self.next_checkpoint:
            self.next_checkpoint = now + CHECKPOINT_INTERVAL
            try:
                async with self.defense_lock:  # not inside a reload's read transaction
                    await asyncio.to_thread(checkpoint, self.watch_conn)
            except sqlite3.Error:
                # Only the WAL grows meanwhile (the writer's own auto-checkpoint bounds it).
                log.exception("WAL checkpoint failed; trying again in %.0f s", CHECKPOINT_INTERVAL)
        # Changes made by `mailfence users ...` in another process: picked up within a second.
        signature = await asyncio.to_thread(_users_signature, self.watch_conn)
        if signature != self.users_signature:
            self.users_signature = signature
            await self.accounts.reload()
            log.info("users reloaded: %d accounts", len(self.accounts.users))
        await self.spool.refresh_size()
        if self.delivery_process is not None:
            self.delivery_process.check()
        else:
            self.delivery.close_idle_connections(now)
        # Bans and allowlist changes made by `mailfence ban/unban/allow`: within a second.
        signature = await asyncio.to_thread(defense_table.signature, self.watch_conn)
        if signature != self.defense_signature:
            await self._load_defense_state(initial=False)
            log.info("bans and allowlist reloaded: %d bans in force", len(self.defense.bans))
        await self._steer()
        wall = time.time()
        change = self.defense.tick(wall)
        if change is not None:
            log.warning("defense: %s under-attack mode", change)
            self.control.publish({"event": "under_attack", "change": change, "time": wall})
        self.listeners.check_door_process()  # after the tick: it takes the mode's rate along
        self._collect_delivery_figures()
        self.observer.tick(wall)
        self._report_status()
        if self.flood_limiter is not None:
            self.flood_limiter.flush()  # the summary of what a flood's lines were folded into
        minute = int(wall // 60)
        if minute != self.history_minute:
            ended, self.history_minute = self.history_minute, minute
            await self._roll_up(ended)
        if now >= self.next_cleanup:
            self.next_cleanup = now + 60.0
            self.defense.housekeeping(wall)
            await self.writer.run(lambda conn: defense_table.prune(conn, wall))

    async def _steer(self) -> None:
        """Customers' networks to the customers' accept queues (smtp/steering.py), when
        they change: a first login from a new prefix, an allowlist change."""
        steered = (self.defense.known_prefix_count, tuple(self.defense.allowlist))
        if steered != self.steered:
            self.steered = steered
            networks = self.defense.trusted_networks()
            # Building and attaching a program of thousands of networks takes milliseconds.
            await asyncio.to_thread(self.listeners.steer, networks)

    async def reload(self) -> None:
        """SIGHUP: users, the certificate, and the settings that can change live."""
        self.notifier.reloading()
        try:
            await self._reload()
        finally:
            self.notifier.ready()

    async def _reload(self) -> None:
        await self.accounts.reload()
        if self.config_path is not None:
            try:
                loaded = config_module.load(self.config_path)
            except ConfigError as error:
                log.error("reload refused, keeping the running configuration: %s", error)
                return
            changed = config_module.changed_settings(self.config, loaded)
            waiting = config_module.needs_restart(changed)
            applied = [name for name in changed if name not in waiting]
            # What can change live, over what runs: the rest keeps its running value
            # everywhere, the delivery process included (a new state_dir there would
            # deliver from an empty database).
            new = config_module.keep_running(self.config, loaded, waiting)
            try:
                # Read at every reload: a rotated password changes no setting, only the file.
                password = read_upstream_password(new) if new.relay.upstream_password_file else None
            except UpstreamPasswordError as error:
                log.error("reload refused, keeping the running configuration: %s", error)
                return
            if password != self.upstream_password:
                applied.append("relay.upstream_password_file (its contents)")
            restart_delivery = any(name.startswith("relay.") for name in applied) or (
                # The child's log level is set when it starts; in-process it is shared.
                "log.level" in applied and self.delivery_process is not None
            )
            if restart_delivery:
                self._replace_delivery(new, Delivery(new, self.spool, password))
                self.upstream_password = password  # what now will run
            self._apply_config(new)
            if "defense.allowlist" in changed:  # joined with the database's allowlist there
                await self._load_defense_state(initial=False)
            if applied:
                log.info("reload applied: %s", ", ".join(applied))
            if waiting:
                log.warning(
                    "reload: %s changed; the running values stay until a restart",
                    ", ".join(waiting),
                )
        try:
            cert, key = self._certificate_paths()
            # Loading into the live context changes the certificate for new handshakes.
            self.tls.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as error:
            log.error("reload kept the old certificate: %s", error)
        log.info("reloaded: %d users", len(self.accounts.users))

    def _apply_config(self, new: Config) -> None:
        """The settings in config.LIVE_SETTINGS that are read where they are used. `new` holds
        the running values of everything else (config.keep_running), the defense's windows
        and buckets among them (config.RESTART_ONLY)."""
        self.config = new
        self.handler.config = new
        self.listeners.config = new  # and through it, every new session
        self.listeners.door_process_wanted(new)  # monitor mode, a new allowlist: restarted
        self.observer.config = new
        logging.getLogger("mailfence").setLevel(LEVELS[new.log.level.lower()])
        self.defense.config = new.defense

    def _replace_delivery(self, new: Config, replacement: Delivery) -> None:
        """Delivery with the new relay settings, in the background: the old delivery
        finishes its current messages first, and housekeeping goes on meanwhile. A stop
        that comes meanwhile wins: no new delivery starts once the relay is stopping."""
        previous = self.delivery_replacement
        # The old delivery stops within its own shutdown_timeout; the child then reports and
        # closes its database, which the margin leaves time for before it is killed.
        grace = max(self.config.smtp.shutdown_timeout, new.smtp.shutdown_timeout)
        if self.delivery_process is not None:  # the child waits for its own value
            grace = max(grace, self.delivery_process.config.smtp.shutdown_timeout)

        def wanted() -> bool:
            return not self.stopping

        async def replace() -> None:
            if previous is not None:
                await previous  # one reload after the other
            try:
                if self.delivery_process is not None:
                    if not await self.delivery_process.replace(new, grace, wanted):
                        log.info("reload's delivery restart dropped: the relay is stopping")
                        return
                    self.delivery = replacement  # the parent's own stays idle
                else:
                    old = self.delivery
                    replacement.counters = old.counters  # the figures carry on, not from zero
                    await old.stop(grace)
                    if not wanted():
                        log.info("reload's delivery restart dropped: the relay is stopping")
                        return
                    self.delivery = replacement
                    replacement.start()
            except Exception:
                # The delivery process's check() starts a child again within a second.
                log.exception("delivery could not be restarted with the new relay settings")
                return
            log.info("delivery restarted with the new relay settings")

        self.delivery_replacement = asyncio.get_running_loop().create_task(replace())

    # --- shutdown ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        deadline = time.monotonic() + (
            0.0 if self.force_exit else self.config.smtp.shutdown_timeout
        )
        self.stopping = True
        self.notifier.stopping()
        # 1. Stop accepting new connections.
        await self.listeners.stop_accepting()
        await self.control.close()
        # 2. Idle sessions are told 421 and closed; a session in the middle of a command
        #    (DATA above all) may finish it, then is closed the same way.
        while self.listeners.live and time.monotonic() < deadline and not self.force_exit:
            for session in list(self.listeners.live):
                if not session.busy:
                    session.close_with(replies.SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        # 3. Past the deadline: close whatever is left (their mail was never answered 250).
        for session in list(self.listeners.live):
            session.close_with(replies.SHUTTING_DOWN)
        await self.listeners.close()
        # 4. Delivery workers finish their current message.
        if self.delivery_replacement is not None:  # a reload's restart of delivery
            await asyncio.wait([self.delivery_replacement])
        remaining = max(1.0, deadline - time.monotonic())
        if self.delivery_process is not None:
            await asyncio.to_thread(self.delivery_process.stop, remaining)
            self.delivery_process.close()
        await self.delivery.stop(remaining)
        # The figures of the minute in progress, so `stats --since` loses nothing to a restart.
        self._collect_delivery_figures()
        try:
            await self._roll_up(self.history_minute)
        except Exception:
            log.exception("could not record the last minute's figures")
        # 5. Storage last: every write queued so far is committed before the process exits.
        if self.background:
            await asyncio.wait(self.background, timeout=5.0)
        if self.metrics is not None:
            self.metrics.stop()
        await asyncio.to_thread(self.webhooks.close, 5.0)  # the last state change goes out
        self.pool.shutdown()
        self.spool.close()
        await asyncio.to_thread(self.writer.close)
        self.watch_conn.close()
        self.notifier.close()
        log.info("mailfence stopped")
