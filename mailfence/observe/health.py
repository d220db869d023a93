"""One word for the relay's state, with the reason: ok, degraded or under_attack.

Pure: the live figures in, a verdict out, computed once a second. `mailfence status` exits
with the state's code, so monitoring can use it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

OK, DEGRADED, UNDER_ATTACK = "ok", "degraded", "under_attack"
EXIT_CODES = {OK: 0, DEGRADED: 1, UNDER_ATTACK: 2}


@dataclass(frozen=True)
class Health:
    state: str
    reason: str

    @property
    def code(self) -> int:
        return EXIT_CODES[self.state]


@dataclass(frozen=True)
class HealthFigures:
    under_attack: bool
    attack_reason: str
    known_wait_p99: float | None  # seconds customers' logins waited for a thread (recent)
    known_wait_limit: float
    spool_size: int
    spool_max: int
    spool_share_limit: float
    delivered_5m: int
    deferred_5m: int
    delivery_restarted_5m: bool
    spool_failed_5m: int = 0  # messages refused with 451: the spool could not be written
    last_spool_error: str = ""


def assess(figures: HealthFigures) -> Health:
    problems = []
    if figures.known_wait_p99 is not None and figures.known_wait_p99 > figures.known_wait_limit:
        problems.append(
            f"customers' logins wait {figures.known_wait_p99 * 1000:.0f} ms (p99) for a "
            "verification thread"
        )
    if figures.spool_size > figures.spool_max * figures.spool_share_limit:
        problems.append(
            f"queue {figures.spool_size} of {figures.spool_max} messages "
            f"({figures.spool_size / figures.spool_max:.0%})"
        )
    if figures.deferred_5m > 0 and figures.delivered_5m == 0 and figures.spool_size > 0:
        problems.append(
            f"delivery failing: {figures.deferred_5m} deferred, none delivered in 5 min"
        )
    if figures.spool_failed_5m > 0:
        problems.append(
            f"the spool cannot be written ({figures.last_spool_error}): "
            f"{figures.spool_failed_5m} message(s) refused with 451 in 5 min; is the disk full?"
        )
    if figures.delivery_restarted_5m:
        problems.append("the delivery process restarted in the last 5 min")
    if figures.under_attack:
        reason = figures.attack_reason
        if problems:
            reason += "; also " + "; ".join(problems)
        return Health(UNDER_ATTACK, reason)
    if problems:
        return Health(DEGRADED, "; ".join(problems))
    return Health(OK, "all figures normal")
