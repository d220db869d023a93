"""Addresses and the prefixes they are counted and banned by."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    address = ipaddress.ip_address(text)
    # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; count it as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def host_network(address: IPAddress, v6_host_prefix: int = 64) -> IPNetwork:
    """The unit one 'source' is counted as: an IPv4 address, or an IPv6 /64.

    An IPv6 attacker owns a whole /64 and can rotate through it at will, so counting single
    IPv6 addresses would count nothing.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network(address)
    return ipaddress.IPv6Network((address, v6_host_prefix), strict=False)


def prefix_network(address: IPAddress, v4_prefix: int, v6_prefix: int) -> IPNetwork:
    """The neighbourhood an address is counted in: its /24 (IPv4) or /48 (IPv6) by default."""
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((address, v4_prefix), strict=False)
    return ipaddress.IPv6Network((address, v6_prefix), strict=False)
