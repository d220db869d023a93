"""A listening socket accepted by hand, a few connections per turn of the event loop.

With `loop.create_server`, libuv accepts every pending connection in one go and the loop then
runs all their `connection_made` calls back to back. During a flood the accept queue holds a
few hundred bots' connections at any time, so each such burst held every session (the
customers' included) for milliseconds. A door accepts at most ACCEPT_BATCH connections per
turn and gives each to a callback that refuses it on the spot or hands it to the event loop;
sessions that are ready run between two batches.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mailfence.smtp")

# Connections accepted per turn of the event loop, from each queue. Each turn of a flood
# holds a batch of refusals (~0.1 ms each) before the sessions that are ready run: in
# `benchmarks/flood.py` (distributed mode, runs interleaved), customers' p99 to the AUTH reply
# was 26.0 and 26.3 ms with 16, 29.3 and 23.4 with 8, 18.0 and 21.1 with 4, 15.5-20.3 with 2
# and 19.3-20.9 with 1, which also cost the most CPU per refusal; the bots were answered as
# fast with 4 as with 16.
ACCEPT_BATCH = 4
# Out of file descriptors (or kernel memory): stop accepting this long, then try again. The
# connections wait in the kernel's backlog meanwhile, instead of the loop spinning on accept.
ACCEPT_PAUSE = 0.1
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Errors that accept(2) on Linux reports for one pending connection (a network error, a
# firewall's verdict): that connection is lost, the next ones are fine.
_LOST_ONE = {
    errno.EPERM,
    errno.EPROTO,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETDOWN,
    errno.ENETUNREACH,
}

Accepted = Callable[[socket.socket, Any], None]  # (connection, peer address as accept gives it)


def open_listening_sockets(
    host: str, port: int, backlog: int, customers_queue: bool = False
) -> list[tuple[socket.socket, socket.socket | None]]:
    """Non-blocking listening sockets for (host, port), one per address it resolves to, as
    `loop.create_server` makes them (SO_REUSEADDR; IPv6 sockets IPv6-only). Like it, an
    address of a family this kernel lacks (IPv6 disabled, say) is skipped, not fatal.

    Each comes with its customers' queue (steering.py) when `customers_queue` is set and the
    kernel allows it, else None."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    opened: list[socket.socket] = []
    pairs: list[tuple[socket.socket, socket.socket | None]] = []
    unsupported: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as error:
                unsupported = error
                continue
            opened.append(sock)
            if customers_queue and port:
                # SO_REUSEPORT would let this socket share the port with another relay
                # started by mistake: make sure nobody listens there first.
                _bind_alone(family, kind, proto, address)
            shared = _listen(sock, address, backlog, reuse_port=customers_queue)
            customers = _customers_queue(sock, backlog) if shared else None
            if customers is not None:
                opened.append(customers)
            pairs.append((sock, customers))
    except OSError:
        for sock in opened:
            sock.close()
        raise
    if not pairs:
        raise unsupported or OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    return pairs


def _set_options(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _listen(sock: socket.socket, address: Any, backlog: int, reuse_port: bool) -> bool:
    """Binds and listens; returns whether SO_REUSEPORT was set (if asked for and allowed)."""
    _set_options(sock)
    if reuse_port:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError as error:
            log.warning("one accept queue on %s, no customers' queue: %s", address, error)
            reuse_port = False
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return reuse_port


def _bind_alone(family: int, kind: int, proto: int, address: Any) -> None:
    """Raises EADDRINUSE when some socket listens on `address`, whatever its options."""
    with socket.socket(family, kind, proto) as probe:
        _set_options(probe)
        probe.bind(address)


def _customers_queue(common: socket.socket, backlog: int) -> socket.socket | None:
    """A second socket in `common`'s SO_REUSEPORT group, listened after it; None if the
    kernel will not have it (the relay then runs with one queue, as before)."""
    sock = socket.socket(common.family, common.type, common.proto)
    try:
        _listen(sock, common.getsockname(), backlog, reuse_port=True)
    except OSError as error:
        sock.close()
        log.warning("one accept queue on %s, no customers' queue: %s", common.getsockname(), error)
        return None
    return sock


class Door:
    """Accepts from one listening socket on the running loop; see the module docstring."""

    def __init__(self, sock: socket.socket, accepted: Accepted) -> None:
        self.sock = sock
        self.accepted = accepted
        self.paused = False  # out of resources: not watching the socket for a moment
        self.held = False  # another process accepts from this socket (strangers_door.py)
        self.closed = False
        self._pauses_unreported = 0  # pauses since the last warning (one per episode)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self.accept_batch)

    def hold(self) -> None:
        """Stops accepting, keeping the socket (another process accepts from it meanwhile)."""
        if self.held or self.closed or self._loop is None:
            return
        self.held = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if not self.paused:
            self._loop.remove_reader(self.sock.fileno())
        self.paused = False

    def resume(self) -> None:
        if self.held and not self.closed and self._loop is not None:
            self.held = False
            self._loop.add_reader(self.sock.fileno(), self.accept_batch)

    def accept_batch(self) -> int:
        """Accepts up to ACCEPT_BATCH waiting connections; returns how many it accepted."""
        for count in range(ACCEPT_BATCH):
            try:
                connection, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return count
            except ConnectionAbortedError:
                continue  # reset while in the backlog: nothing to answer
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._pause(error)
                    return count
                if error.errno in _LOST_ONE:
                    log.debug("accept: one connection lost: %s", error)
                    continue
                raise
            if self._pauses_unreported:
                log.warning(
                    "accepting again on %s after %d pauses", self.name, self._pauses_unreported
                )
                self._pauses_unreported = 0
            self.accepted(connection, peer)
        return ACCEPT_BATCH

    def _pause(self, error: OSError) -> None:
        if self.paused or self.held or self.closed or self._loop is None:
            return
        if not self._pauses_unreported:  # once per episode, not ten times a second
            log.warning(
                "cannot accept on %s: %s; pausing %.1f s at a time until it can (raise"
                " LimitNOFILE, or lower smtp.max_connections)",
                self.name,
                error.strerror or error,
                ACCEPT_PAUSE,
            )
        self._pauses_unreported += 1
        self.paused = True
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self.paused = False
        self._resume = None
        if not self.closed and not self.held and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self.accept_batch)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
        if self._loop is not None and not self.paused and not self.held:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def refuse(connection: socket.socket, reply: bytes) -> None:
    """Answers a just-accepted connection with one line and closes it: no transport, no
    protocol object. The reply fits any fresh socket's send buffer; MSG_DONTWAIT makes sure
    a send never blocks the loop all the same."""
    try:  # noqa: SIM105 (a plain try costs nothing here; contextlib.suppress does, per refusal)
        connection.send(reply, socket.MSG_DONTWAIT)
    except OSError:
        pass  # the client is already gone: nothing to tell it
    connection.close()
