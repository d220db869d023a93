"""Every reply mailfence chooses, in one table (DESIGN.md, "Reply codes").

Tests compare against these names, never against literal strings.
"""

from __future__ import annotations

import re

# Connection-level refusals (DESIGN.md: temporary for automatic bans, so a wrongly banned
# customer retries after the ban ends; permanent only for an operator's --permanent ban).
BANNED = "421 4.7.0 Too many failed logins from your address, try again later"
BANNED_PERMANENTLY = "554 5.7.1 Your address is not allowed to use this service"
TOO_MANY_AUTH_ATTEMPTS = "421 4.7.0 Too many authentication attempts, closing connection"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TIMEOUT = "421 4.4.2 Timeout, closing connection"

# AUTH (RFC 4954).
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_TEMPORARY_FAILURE = "454 4.7.0 Temporary authentication failure"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_DISABLED = "535 5.7.8 Account disabled"
AUTH_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode base64"
AUTH_BAD_PLAIN = "501 5.5.2 Cannot split AUTH PLAIN value"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"

# Envelope.
ACCOUNT_CHANGED = "530 5.7.0 Authentication required: the account changed, log in again"
SENDER_OK = "250 2.1.0 Ok"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
SENDER_NOT_ALLOWED = "553 5.7.1 Sender address not allowed for this account"
RECIPIENT_OK = "250 2.1.5 Ok"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"

# DATA.
QUEUED = "250 2.0.0 Ok: queued as {id}"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
BARE_NEWLINE = "550 5.5.2 Message contains a bare CR or LF; send lines ending in CRLF"
SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
SPOOL_FAILED = "451 4.3.0 Local error in processing, try again later"

# The enhanced code (RFC 3463) to add to replies that aiosmtpd writes without one, since the
# relay advertises ENHANCEDSTATUSCODES and RFC 2034 §3 then asks for one on every reply.
_ENHANCED_BY_CODE = {
    "250": "2.0.0",
    "221": "2.0.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.5.0",
    "555": "5.5.4",
    "454": "4.7.0",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}( |$)")


def with_enhanced_code(reply: str) -> str:
    """'503 Error: need MAIL command' → '503 5.5.1 Error: need MAIL command'."""
    if len(reply) < 4 or reply[3] != " " or _HAS_ENHANCED.match(reply):
        return reply
    enhanced = _ENHANCED_BY_CODE.get(reply[:3])
    if enhanced is None:
        return reply
    return f"{reply[:3]} {enhanced} {reply[4:]}"
