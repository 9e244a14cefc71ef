"""Resolver: a parsed target to the backend addresses it names now.

This is the only place that talks to DNS. It blocks, so the asyncio front end
calls it in a worker thread. Re-resolution calls ``resolve()`` again; the
balancer applies the new address set as one event.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver

from .target import Address, Endpoint, Target

GetAddrInfo = Callable[..., list[Any]]


class ResolutionError(Exception):
    """The target's names could not be resolved to any address."""


@dataclass(frozen=True, slots=True)
class Resolution:
    addresses: tuple[Address, ...]
    # Smallest record TTL seen, in seconds; None when the source gives none.
    ttl: float | None = None


class Resolver:
    def __init__(
        self,
        target: Target,
        *,
        timeout: float = 5.0,
        getaddrinfo: GetAddrInfo = socket.getaddrinfo,
    ) -> None:
        self.target = target
        self._timeout = timeout
        self._getaddrinfo = getaddrinfo

    def resolve(self) -> Resolution:
        """All addresses of all endpoints, in target order, without duplicates.

        Raises ResolutionError when no endpoint yields an address; a partial
        answer is kept, since the names that do resolve are usable backends.
        """
        addresses: dict[Address, None] = {}
        ttls: list[float] = []
        problems: list[str] = []
        for endpoint in self.target.endpoints:
            if endpoint.is_literal:
                addresses[Address(endpoint.host, endpoint.port)] = None
                continue
            try:
                found, ttl = self._lookup(endpoint)
            except ResolutionError as exc:
                problems.append(str(exc))
                continue
            addresses.update(dict.fromkeys(found))
            if ttl is not None:
                ttls.append(ttl)
        if not addresses:
            raise ResolutionError(
                f"cannot resolve {self.target.text!r}: " + "; ".join(problems or ["no addresses"])
            )
        return Resolution(tuple(addresses), min(ttls) if ttls else None)

    def _lookup(self, endpoint: Endpoint) -> tuple[list[Address], float | None]:
        if self.target.dns_server is None:
            return self._lookup_system(endpoint), None
        return self._lookup_server(endpoint, self.target.dns_server)

    def _lookup_system(self, endpoint: Endpoint) -> list[Address]:
        # getaddrinfo honours /etc/hosts and the system's resolver setup, as
        # grpcio's own resolver does for dns:/// targets.
        try:
            infos = self._getaddrinfo(
                endpoint.host, endpoint.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError) as exc:
            raise ResolutionError(f"{endpoint.host}: {exc}") from exc
        found = []
        for info in infos:
            sockaddr = info[4]
            host = str(sockaddr[0]).split("%", 1)[0]
            found.append(Address(host, endpoint.port, endpoint.authority))
        if not found:
            raise ResolutionError(f"{endpoint.host}: no addresses")
        return found

    def _lookup_server(
        self, endpoint: Endpoint, server: Address
    ) -> tuple[list[Address], float | None]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = self._timeout
        found: list[Address] = []
        ttls: list[float] = []
        problems = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = resolver.resolve(endpoint.host, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN) as exc:
                problems.append(exc.__class__.__name__)
                continue
            except dns.exception.Timeout as exc:
                # The server is unreachable: the other type would time out too.
                raise ResolutionError(f"{endpoint.host} via DNS server {server}: {exc}") from exc
            except dns.exception.DNSException as exc:
                # One record type failing (a server refusing AAAA) must not
                # discard the other's answer, as with gRPC's own resolver.
                problems.append(f"{dns.rdatatype.to_text(rdtype)}: {exc}")
                continue
            if answer.rrset is not None:
                ttls.append(float(answer.rrset.ttl))
            found.extend(
                Address(rdata.address, endpoint.port, endpoint.authority) for rdata in answer
            )
        if not found:
            raise ResolutionError(f"{endpoint.host} via DNS server {server}: {', '.join(problems)}")
        return found, min(ttls) if ttls else None
