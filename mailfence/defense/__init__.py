"""The pure decision core of the defense: counters, bans, lanes, under-attack mode.

No sockets, no SQLite, no clock reads (DESIGN.md, "Modules"): time is passed in.
"""

from mailfence.defense.bans import Ban, BanBook
from mailfence.defense.core import Action, AuthAction, AuthGate, ConnectVerdict, Defense

__all__ = ["Action", "AuthAction", "AuthGate", "Ban", "BanBook", "ConnectVerdict", "Defense"]
