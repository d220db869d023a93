"""Child processes the relay starts (delivery, the strangers' door), each with a channel."""

from __future__ import annotations

import socket
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from typing import Any


def spawn_with_channel(
    name: str, target: Callable[..., None], args: tuple[Any, ...], kind: int = socket.SOCK_STREAM
) -> tuple[BaseProcess, socket.socket]:
    """Starts `target(*args, channel)` in a spawned interpreter (never a fork of a threaded
    process) and returns it with the relay's end of the channel, non-blocking."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, kind)
    process = get_context("spawn").Process(
        target=target, args=(*args, child_end), name=name, daemon=True
    )
    try:
        process.start()
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    parent_end.setblocking(False)
    return process, parent_end
