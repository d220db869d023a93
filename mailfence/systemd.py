"""systemd's notification protocol (sd_notify), without any systemd library.

Under `Type=notify` systemd passes the path of a datagram socket in NOTIFY_SOCKET; the service
sends it newline-separated `KEY=value` lines: `READY=1` once it serves, `STATUS=...` for
`systemctl status`, `WATCHDOG=1` at least every WatchdogSec, `STOPPING=1` when it shuts down
and `RELOADING=1` when it reloads. The protocol is one datagram per message, so this is a
non-blocking `sendto` and nothing more. Outside systemd (no NOTIFY_SOCKET) every method does
nothing, and a failure to send is never the relay's problem: it is logged at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("mailfence.systemd")


class Notifier:
    """Sends sd_notify messages to the socket systemd gave this process, if any."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        # `address` as for socket.sendto: a filesystem path, or bytes starting with NUL for
        # the abstract namespace. None: not started by systemd, nothing is ever sent.
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them."""
        env = os.environ if environ is None else environ
        return cls(_socket_address(env.get("NOTIFY_SOCKET", "")), _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1, in seconds: half of WatchdogSec, as systemd advises.

        None when systemd expects no keep-alives from this process.
        """
        if self.watchdog_usec is None or not self.enabled:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    # --- the messages --------------------------------------------------------------------

    def ready(self) -> None:
        self.notify("READY=1")

    def status(self, text: str) -> None:
        # One line: a newline would start another KEY=value assignment.
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def reloading(self) -> None:
        # Type=notify-reload (systemd >= 253) wants the monotonic time of the reload, so it
        # can tell this reload's READY=1 from an older one; earlier versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def notify(self, *assignments: str) -> None:
        """Sends KEY=value lines as one datagram. Never blocks, never raises."""
        if self.address is None:
            return
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as error:
            log.debug("sd_notify %r to %r failed: %s", message, self.address, error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # The abstract namespace: a leading NUL instead of the '@' systemd writes.
        return b"\0" + value[1:].encode()
    if value:
        # e.g. "vsock:..." (systemd >= 254, for virtual machines): not needed on a host.
        log.debug("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process (WATCHDOG_PID unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) not in (os.getpid(), _onefile_bootloader()):
                return None
        except ValueError:
            return None
    return usec


def _onefile_bootloader() -> int | None:
    """The pid systemd knows as the main process when we are a PyInstaller one-file binary.

    Its bootloader unpacks the program and runs it as a child of the same executable, so
    systemd's main PID (and WATCHDOG_PID) is our parent's. The unit has NotifyAccess=all so
    that systemd takes the child's messages.
    """
    if not getattr(sys, "frozen", False):
        return None
    parent = os.getppid()
    try:
        same = os.readlink(f"/proc/{parent}/exe") == os.readlink("/proc/self/exe")
    except OSError:
        return None
    return parent if same else None
