"""Delivery status notifications (RFC 3464) for messages that cannot be delivered."""

from __future__ import annotations

import email.utils
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    recipient: str
    code: int
    reply: str

    @property
    def status(self) -> str:
        """The RFC 3463 status: the reply's own if it carries one, else one for the code."""
        words = self.reply.split()
        if words and len(words[0]) == 3 and words[0].isdigit():
            words = words[1:]  # the basic code: "550 5.1.1 User unknown"
        first = words[0] if words else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in ("4", "5"):
            return first
        # 4.4.7: delivery time expired (a temporary failure that outlived the queue).
        return "5.0.0" if self.code >= 500 else "4.4.7"


def _header_block(original: bytes) -> bytes:
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[: end + 2]


def build_bounce(
    *,
    reporting_host: str,
    original_id: str,
    original_sender: str,
    arrival: float,
    failures: list[Failure],
    original: bytes,
    expired: bool,
) -> bytes:
    """A multipart/report; report-type=delivery-status, sent from the null sender."""
    boundary = f"mailfence-{secrets.token_hex(12)}"
    why = (
        "could not be delivered before it expired from the queue"
        if expired
        else "was refused by the receiving server"
    )
    lines = [f"Your message to these recipients {why}:", ""]
    for f in failures:
        lines.append(f"  <{f.recipient}>: {f.reply or 'no reply'}")
    lines += ["", f"The message was queued at {reporting_host} as {original_id}.", ""]
    human = "\r\n".join(lines)

    per_message = (
        f"Reporting-MTA: dns; {reporting_host}\r\n"
        f"X-Mailfence-Queue-ID: {original_id}\r\n"
        f"Arrival-Date: {email.utils.formatdate(arrival)}\r\n"
    )
    per_recipient = ""
    for f in failures:
        diagnostic = f.reply.replace("\r", " ").replace("\n", " ") if f.reply else ""
        per_recipient += (
            f"\r\nFinal-Recipient: rfc822; {f.recipient}\r\n"
            f"Action: failed\r\n"
            f"Status: {f.status}\r\n"
        )
        if diagnostic:
            per_recipient += f"Diagnostic-Code: smtp; {diagnostic}\r\n"

    headers = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_host}>\r\n"
        f"To: <{original_sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: <{secrets.token_hex(12)}@{reporting_host}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
    )
    body = (
        f"This is a MIME-encapsulated message.\r\n\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Description: Notification\r\n\r\n"
        f"{human}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"Content-Description: Delivery report\r\n\r\n"
        f"{per_message}{per_recipient}\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"Content-Description: Undelivered message headers\r\n\r\n"
    ).encode()
    return (
        headers.encode("utf-8")
        + b"\r\n"
        + body
        + _header_block(original)
        + (f"\r\n--{boundary}--\r\n".encode("ascii"))
    )
