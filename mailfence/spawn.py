"""Child processes the relay starts (delivery, the strangers' door), each with a channel."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
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
        with _main_script_hidden():
            process.start()
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    parent_end.setblocking(False)
    return process, parent_end


@contextlib.contextmanager
def _main_script_hidden() -> Iterator[None]:
    """multiprocessing's spawn runs the parent's main script again in the child (as
    __mp_main__) when it was started by path, in case the target lives there. Ours never
    does: targets are imported by module name. For `mailfence` that script imports the whole
    CLI (typer, rich, every command), about half a second of CPU per child at every start
    (measured: 0.92 s against 0.37 for the delivery child); hidden, the
    child imports what its target needs and nothing more. (`python -m mailfence` has a
    module name instead, which spawn already leaves alone.)"""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if main is None or script is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = script
