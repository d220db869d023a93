"""The ban book: who is banned, until when, why, and how long the next ban will be."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mailfence.defense.net import IPAddress, IPNetwork

BanSource = Literal["auto", "manual"]


@dataclass
class Ban:
    network: IPNetwork
    until: float | None  # None: permanent (manual bans only)
    reason: str
    source: BanSource
    created: float
    level: int = 1  # the how-many-th automatic ban of this network (escalation)
    evidence: dict[str, Any] = field(default_factory=dict)

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now

    @property
    def permanent(self) -> bool:
        return self.until is None


class BanBook:
    """Active bans by network; a lookup costs one dict probe per prefix length in use.

    Every refusal at the door looks here, so the probe is on integers: building an
    `ip_network` per prefix length cost 4 µs each, more than the rest of a refusal's Python.
    """

    def __init__(self) -> None:
        self._bans: dict[IPNetwork, Ban] = {}
        self._lengths: dict[int, int] = {}  # (version * 1000 + prefixlen) -> bans using it
        # (version * 1000 + prefixlen, network address as an integer) -> ban
        self._by_number: dict[tuple[int, int], Ban] = {}

    @staticmethod
    def _length_key(network: IPNetwork) -> int:
        return network.version * 1000 + network.prefixlen

    @classmethod
    def _number_key(cls, network: IPNetwork) -> tuple[int, int]:
        return cls._length_key(network), int(network.network_address)

    def find(self, address: IPAddress, now: float) -> Ban | None:
        number = int(address)
        bits = address.max_prefixlen
        version = address.version
        for key in self._lengths:
            if key // 1000 != version:
                continue
            host_bits = bits - key % 1000
            ban = self._by_number.get((key, number >> host_bits << host_bits))
            if ban is not None and ban.active(now):
                return ban
        return None

    def get(self, network: IPNetwork) -> Ban | None:
        return self._bans.get(network)

    def put(self, ban: Ban) -> None:
        if ban.network not in self._bans:
            key = self._length_key(ban.network)
            self._lengths[key] = self._lengths.get(key, 0) + 1
        self._bans[ban.network] = ban
        self._by_number[self._number_key(ban.network)] = ban

    def remove(self, network: IPNetwork) -> Ban | None:
        ban = self._bans.pop(network, None)
        if ban is not None:
            del self._by_number[self._number_key(network)]
            key = self._length_key(network)
            self._lengths[key] -= 1
            if not self._lengths[key]:
                del self._lengths[key]
        return ban

    def expire(self, now: float) -> list[Ban]:
        gone = [ban for ban in self._bans.values() if not ban.active(now)]
        for ban in gone:
            self.remove(ban.network)
        return gone

    def replace_all(self, bans: list[Ban]) -> None:
        self._bans.clear()
        self._lengths.clear()
        self._by_number.clear()
        for ban in bans:
            self.put(ban)

    def active(self, now: float) -> list[Ban]:
        return [ban for ban in self._bans.values() if ban.active(now)]

    def __len__(self) -> int:
        return len(self._bans)


def escalated_duration(base: float, factor: float, cap: float, level: int) -> float:
    """The ban time for the `level`-th automatic ban: base, base*factor, ... up to cap."""
    return float(min(cap, base * factor ** max(0, level - 1)))
