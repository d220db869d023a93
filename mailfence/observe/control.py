"""The control socket: a Unix socket in the state directory, mode 0600.

One JSON object per line each way. A client sends one request, {"cmd": "snapshot", ...},
and reads one answer, {"ok": true, ...} or {"ok": false, "error": "..."}; the "events"
command instead streams one event per line until the client goes away. Only the server's
own user (and root) can connect: the file's mode, the state directory's 0700 and the
peer's credentials (SO_PEERCRED) see to that. So the socket may steer the relay: ban,
unban, reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("mailfence.control")

MAX_REQUEST_BYTES = 64 * 1024
MAX_CLIENTS = 32
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, with its terminating NUL
PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
SHUTTING_DOWN = "the server is shutting down; nothing was done (try again once it is back)"
COMMAND_GRACE = 10.0  # seconds close() waits for commands still being carried out
EVENT_QUEUE = 256  # per subscriber; a slow reader loses the oldest events, never the relay

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The socket cannot be opened (another server holds it, or the path is unusable)."""


class ControlServer:
    def __init__(self, path: Path, commands: dict[str, Handler]) -> None:
        self.path = path
        self.commands = commands
        self.clients = 0
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._server: asyncio.AbstractServer | None = None
        # Commands being carried out (a ban being written, say): close() lets them finish
        # before the server goes on to close the database under them.
        self._running: set[asyncio.Task[dict[str, Any]]] = set()
        # Set by close(): a client that connected before it may still send a command, which
        # must not start while the server closes the database under it.
        self._closing = False

    async def start(self) -> None:
        path = self.path
        if path.exists() or path.is_symlink():
            if _answers(path):
                raise ControlError(
                    f"another mailfence is running (its control socket {path} answers); "
                    "stop it first, or give this one its own state_dir"
                )
            path.unlink()  # left behind by a server that was killed
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ControlError(
                f"the control socket path {path} is longer than the {MAX_SOCKET_PATH} bytes a "
                "Unix socket allows; set [control] socket to a shorter path"
            )
        # Created 0600 from the start (no moment when another user could connect).
        previous_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=MAX_REQUEST_BYTES
            )
            os.chmod(path, 0o600)
        except OSError as error:
            raise ControlError(f"cannot listen on {path}: {error.strerror or error}") from None
        finally:
            os.umask(previous_umask)

    def publish(self, event: dict[str, Any]) -> None:
        """Sends an event to every `events` subscriber, never blocking."""
        for queue in self.subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        if self._running:
            await asyncio.wait(set(self._running), timeout=COMMAND_GRACE)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _peer_is_trusted(writer):
            with contextlib.suppress(ConnectionError):
                await _send(writer, {"ok": False, "error": "not allowed: another user"})
            writer.close()
            return
        if self.clients >= MAX_CLIENTS:
            await _send(writer, {"ok": False, "error": "too many control clients"})
            writer.close()
            return
        self.clients += 1
        try:
            await self._one_request(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("control request failed")
        finally:
            self.clients -= 1
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (ValueError, asyncio.LimitOverrunError, TimeoutError):
            await _send(writer, {"ok": False, "error": "bad request: one JSON object per line"})
            return
        command = str(request.get("cmd", ""))
        if command == "events":
            await self._stream_events(reader, writer)
            return
        handler = self.commands.get(command)
        if handler is None:
            known = ", ".join(sorted([*self.commands, "events"]))
            await _send(writer, {"ok": False, "error": f"unknown cmd {command!r}; known: {known}"})
            return
        if self._closing:
            await _send(writer, {"ok": False, "error": SHUTTING_DOWN})
            return
        task = asyncio.ensure_future(handler(request))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            # Shielded: a client hanging up does not abandon a command half carried out.
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody waits for the answer now; a failure must still reach the log.
            task.add_done_callback(functools.partial(_log_failure, command))
            raise
        except ValueError as error:
            answer = {"ok": False, "error": str(error)}
        except Exception as error:
            log.exception("control command %r failed", command)
            answer = {"ok": False, "error": f"{command} failed in the server: {error}"}
        await _send(writer, {"ok": True} | answer if "ok" not in answer else answer)

    async def _stream_events(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE)
        self.subscribers.add(queue)
        gone = asyncio.ensure_future(reader.read(1))  # EOF: the client left
        try:
            await _send(writer, {"ok": True, "event": "subscribed"})
            while True:
                getting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    getting.cancel()
                    return
                await _send(writer, getting.result())
        finally:
            self.subscribers.discard(queue)
            gone.cancel()


def _log_failure(command: str, task: asyncio.Task[dict[str, Any]]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("control command %r failed", command, exc_info=error)


def _peer_is_trusted(writer: asyncio.StreamWriter) -> bool:
    """The socket is 0600 already; the kernel's word on who connected is a second lock
    (a socket file moved or made group-readable by mistake still admits only us and root)."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    except OSError:
        return False
    _pid, uid, _gid = PEERCRED.unpack(credentials)
    return uid in (0, os.getuid())


async def _send(writer: asyncio.StreamWriter, document: dict[str, Any]) -> None:
    writer.write(json.dumps(document, default=str).encode() + b"\n")
    await writer.drain()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


# --- the client side (the CLI) ---------------------------------------------------------------


class NotRunning(Exception):
    """No server answers on the control socket."""


def request(
    path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One request, one answer. Raises NotRunning when no server listens there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise NotRunning(f"no mailfence server is running (no answer on {path})") from error
        except PermissionError as error:
            raise NotRunning(
                f"cannot reach the server's control socket {path}: permission denied "
                "(run as the user the server runs as)"
            ) from error
        # A server at its client bound answers and closes without reading: read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(json.dumps({"cmd": command, **(arguments or {})}).encode() + b"\n")
        with conn.makefile("rb") as stream:
            line = stream.readline(16 * 1024 * 1024)
    if not line:
        raise NotRunning(f"the server closed the control socket {path} without answering")
    answer: dict[str, Any] = json.loads(line)
    return answer
