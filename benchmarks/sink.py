"""A counting SMTP sink, for when Postfix's `smtp-sink` is not installed.

    .venv/bin/python benchmarks/sink.py PORT [--seconds 600]

Listens on 127.0.0.1:PORT, accepts every message and throws it away, and accepts any AUTH
(without TLS). Like `smtp-sink -c` it writes "sess=S quit=Q mesg=N" records ended by CR to
stdout, which is how throughput.py reads the count. It stops by itself after --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import uvloop
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

REPORT_INTERVAL = 0.02


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.sessions = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 2.0.0 Ok"


def accept_any(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: LoginPassword
) -> AuthResult:
    return AuthResult(success=True)


async def serve(port: int, seconds: float) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()

    def build() -> SMTP:
        counter.sessions += 1
        return SMTP(
            counter,
            hostname="sink.bench",
            authenticator=accept_any,
            auth_require_tls=False,
            auth_required=False,
        )

    server = await loop.create_server(build, host="127.0.0.1", port=port, backlog=1024)
    reported = -1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(REPORT_INTERVAL)
        if counter.messages != reported:
            reported = counter.messages
            sys.stdout.write(f"sess={counter.sessions} quit=0 mesg={reported}\r")
            sys.stdout.flush()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.seconds))


if __name__ == "__main__":
    main()
