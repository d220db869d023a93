"""The strangers' shared door: how many new connections all unknown sources together get.

A flood from thousands of addresses never reaches any one address's limit, but each admitted
connection costs a TLS handshake; so strangers (neither allowlisted nor from a network a
customer has logged in from) share one rate. A stranger turned away by it that comes back the
way a mail server does (PATIENT_RETRY_AFTER seconds later, not at once) gets a door of its
own, so a customer's first connection during a flood gets in on a retry.

Pure: the clock is an argument. It needs nothing but the address, so it can stand wherever
the strangers' connections are accepted.
"""

from __future__ import annotations

from mailfence.defense.net import IPAddress
from mailfence.defense.windows import TokenBucket

PATIENT_RETRY_AFTER = 10.0  # seconds: a mail server's retry, not a bot's reconnect
PATIENT_MEMORY = 3600.0
MAX_REMEMBERED_REFUSALS = 100_000


# A tenth of a second's worth at once: the TLS handshakes of admitted strangers are spread
# out instead of arriving on the event loop together.
BURST_SECONDS = 0.1


class StrangersDoor:
    def __init__(self, per_second: float) -> None:
        self._rate = TokenBucket(per_second, per_second * BURST_SECONDS)
        # The patient door has a rate of its own: bots could learn to wait, too.
        patient = max(1.0, per_second / 5)
        self._patient_rate = TokenBucket(patient, patient)
        self._refused: dict[IPAddress, float] = {}  # stranger -> its last refusal here

    @property
    def rate(self) -> float:
        return self._rate.rate

    def set_rate(self, per_second: float) -> None:
        """A new shared rate (under-attack mode's, or back to normal); the patient door's
        stays as it is, so a customer's retry gets in through it all the same."""
        self._rate.set_rate(per_second, per_second * BURST_SECONDS)

    def admit(self, address: IPAddress, now: float) -> bool:
        return self._rate.take(now) or self._patient(address, now)

    def _patient(self, address: IPAddress, now: float) -> bool:
        # A bot reconnecting at once keeps resetting its clock and never qualifies.
        last = self._refused.pop(address, None)
        patient = last is not None and PATIENT_RETRY_AFTER <= now - last <= PATIENT_MEMORY
        admitted = patient and self._patient_rate.take(now)
        # Remembered when let in too: a mail server's next retry, minutes later, finds this
        # door again (in under-attack mode its first admission only earns a retry ticket,
        # which the next one redeems).
        self._refused[address] = now
        if len(self._refused) > MAX_REMEMBERED_REFUSALS:
            del self._refused[next(iter(self._refused))]  # dicts keep order: the oldest
        return admitted

    def __len__(self) -> int:
        """Strangers remembered as refused (bounded by MAX_REMEMBERED_REFUSALS)."""
        return len(self._refused)
