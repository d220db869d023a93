"""Where a message goes: the configured upstream, or each recipient domain's MX."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdtypes.ANY.MX
import dns.resolver

from mailfence.config import parse_address

log = logging.getLogger("mailfence.delivery")

TLSPolicy = Literal["opportunistic", "required", "implicit"]


@dataclass(frozen=True)
class Hop:
    """One server to try: its name (for TLS and logs), where to connect, and how."""

    name: str
    address: str
    port: int
    tls: TLSPolicy
    verify: bool


class RouteError(Exception):
    """No server to try. `permanent` decides between retrying and bouncing."""

    def __init__(self, message: str, permanent: bool, code: int) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


def parse_upstream(url: str, verify: bool) -> Hop:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    if scheme == "smtps":
        return Hop(host, host, parts.port or 465, "implicit", verify)
    if scheme == "smtp+starttls":
        return Hop(host, host, parts.port or 587, "required", verify)
    return Hop(host, host, parts.port or 25, "opportunistic", verify)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _literal(domain: str) -> str | None:
    """RFC 5321 §4.1.3 address literals: user@[192.0.2.1], user@[IPv6:2001:db8::1]."""
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
        try:
            return str(ipaddress.ip_address(inner))
        except ValueError:
            return None
    return None


def _nameserver(entry: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '::1' or '[::1]:5353' → (address, port)."""
    try:
        return str(ipaddress.ip_address(entry)), 53
    except ValueError:
        return parse_address(entry)


def _routable(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
    )


class MXResolver:
    """RFC 5321 §5.1: MX records by preference; no MX means the domain's own A/AAAA.

    Addresses in loopback, private and link-local ranges are skipped unless
    `allow_private`: otherwise anyone could make the relay deliver to hosts inside its own
    network, which may trust mail that comes from it.
    """

    def __init__(
        self,
        nameservers: tuple[str, ...],
        port: int,
        timeout: float = 10.0,
        allow_private: bool = False,
    ) -> None:
        self.port = port
        self.allow_private = allow_private
        try:
            self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.resolver.NoResolverConfiguration:
            # No /etc/resolv.conf: lookups fail (and mail waits in the queue) until one
            # appears or relay.dns_servers is set; the relay itself still starts.
            log.warning("no system DNS configuration; set relay.dns_servers for MX delivery")
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = ["127.0.0.1"]
        if nameservers:
            servers = []
            for entry in nameservers:
                host, port = _nameserver(entry)
                servers.append(host)
                self.resolver.port = port
            self.resolver.nameservers = servers
        self.resolver.lifetime = timeout

    async def _addresses(self, name: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                answer = await self.resolver.resolve(name, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            found.extend(rr.to_text() for rr in answer)
        # Prefer IPv4 first: small hosts' IPv6 often lacks reverse DNS, which receivers punish.
        return sorted(found, key=lambda a: ":" in a)

    async def hops(self, domain: str) -> list[Hop]:
        literal = _literal(domain)
        if literal:
            if not self.allow_private and not _routable(literal):
                raise RouteError(f"{domain} is not a public address", True, 550)
            return [Hop(literal, literal, self.port, "opportunistic", False)]
        try:
            return await self._hops(domain)
        except RouteError:
            raise
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel) as error:
            raise RouteError(f"{domain!r} is not a valid domain: {error}", True, 550) from None
        except dns.exception.DNSException as error:
            raise RouteError(f"DNS lookup for {domain} failed: {error}", False, 451) from None

    async def _hops(self, domain: str) -> list[Hop]:
        try:
            answer = await self.resolver.resolve(domain, "MX")
            records = sorted(
                (rr for rr in answer if isinstance(rr, dns.rdtypes.ANY.MX.MX)),
                key=lambda rr: rr.preference,
            )
            if any(rr.exchange == dns.name.root for rr in records):
                # RFC 7505 null MX: the domain accepts no mail.
                raise RouteError(f"domain {domain} accepts no mail (null MX)", True, 556)
            hosts = [rr.exchange.to_text(omit_final_dot=True) for rr in records]
        except dns.resolver.NXDOMAIN:
            raise RouteError(f"domain {domain} does not exist", True, 550) from None
        except dns.resolver.NoAnswer:
            hosts = [domain]  # implicit MX
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
            raise RouteError(f"DNS lookup for {domain} failed: {error}", False, 451) from None
        result: list[Hop] = []
        private = False
        for host in hosts:
            try:
                addresses = await self._addresses(host)
            except (dns.exception.Timeout, dns.resolver.NoNameservers):
                continue
            if not self.allow_private:
                public = [a for a in addresses if _routable(a)]
                private = private or len(public) < len(addresses)
                addresses = public
            # Opportunistic TLS without verification, as MTAs do for MX delivery.
            result.extend(Hop(host, a, self.port, "opportunistic", False) for a in addresses)
        if not result and private:
            raise RouteError(f"the mail servers of {domain} are on private addresses", True, 550)
        if not result:
            raise RouteError(f"no address found for the mail servers of {domain}", False, 451)
        return result
