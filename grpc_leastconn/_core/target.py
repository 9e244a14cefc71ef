"""Target parsing: the user's target string (or list) to endpoints to resolve.

Pure: no sockets. Follows the gRPC naming convention (doc/naming.md in
grpc/grpc): ``ipv4:``/``ipv6:`` address lists, ``dns:[//authority/]host[:port]``
and a bare ``host[:port]`` meaning ``dns:///host[:port]``. Unlike grpcio, a
Python list or tuple of ``"host:port"`` strings is accepted too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

# gRPC naming: "If no port is specified, 443 is used".
DEFAULT_PORT = 443

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# Schemes grpcio knows whose targets do not start with "/".
_UNSUPPORTED_SCHEMES = frozenset({"unix", "unix-abstract", "vsock", "xds", "passthrough"})
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class Address:
    """One resolved backend: an IP literal and a port."""

    host: str
    port: int
    # The DNS name (and port) the address was resolved from, as the user wrote
    # it; its backend channel uses it as :authority and TLS name. None for IP
    # literals.
    authority: str | None = None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def channel_target(self) -> str:
        """The target of this address's backend channel.

        An explicit ipv4:/ipv6: target keeps C-core from resolving again.
        """
        return f"ipv6:{self}" if self.is_ipv6 else f"ipv4:{self}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host (IP literal or DNS name) and port named by the target."""

    host: str
    port: int
    # What the user wrote, used as :authority and TLS name for DNS names.
    authority: str

    @property
    def is_literal(self) -> bool:
        return _ip_literal(self.host) is not None


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed target: what to resolve, and where to ask."""

    text: str
    endpoints: tuple[Endpoint, ...]
    # The DNS server named by a dns://HOST:PORT/ authority; None = system resolver.
    dns_server: Address | None = None

    @property
    def needs_dns(self) -> bool:
        return not all(endpoint.is_literal for endpoint in self.endpoints)


def parse_target(target: str | Sequence[str]) -> Target:
    """Parse a target; raise ValueError/TypeError naming the bad part."""
    if isinstance(target, str):
        return _parse_string(target)
    if isinstance(target, (list, tuple)):
        return _parse_list(target)
    raise TypeError(
        f"target must be a str or a list/tuple of 'host:port' strings, not {type(target).__name__}"
    )


def _parse_list(items: Sequence[object]) -> Target:
    if not items:
        raise ValueError("target list is empty: give at least one 'host:port'")
    endpoints = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"target list item {index} must be a 'host:port' str, not {type(item).__name__}"
            )
        endpoints.append(parse_host_port(item, context=f"target list item {index}"))
    text = ",".join(str(item) for item in items)
    return Target(text=text, endpoints=_unique(endpoints))


def _parse_string(text: str) -> Target:
    if not text.strip():
        raise ValueError("target is empty")
    if text != text.strip():
        raise ValueError(f"target {text!r} has leading or trailing whitespace")
    scheme, sep, rest = text.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        return _parse_ip_list(text, scheme, rest)
    if sep and scheme == "dns":
        return _parse_dns(text, rest)
    looks_like_uri = bool(sep) and rest.startswith("/") and _SCHEME.fullmatch(scheme) is not None
    if looks_like_uri or (sep and scheme in _UNSUPPORTED_SCHEMES):
        raise ValueError(
            f"target {text!r}: unsupported scheme {scheme!r} "
            "(supported: dns, ipv4, ipv6, or a bare host:port)"
        )
    # gRPC naming: a target with no known scheme is a DNS name.
    endpoint = parse_host_port(text, context=f"target {text!r}")
    return Target(text=text, endpoints=(endpoint,))


def _parse_ip_list(text: str, scheme: str, rest: str) -> Target:
    if not rest:
        raise ValueError(f"target {text!r}: no address after '{scheme}:'")
    endpoints = []
    for part in rest.split(","):
        context = f"target {text!r}: address {part!r}"
        endpoint = parse_host_port(part, context=context)
        ip = _ip_literal(endpoint.host)
        wanted = 4 if scheme == "ipv4" else 6
        if ip is None or ip.version != wanted:
            raise ValueError(f"{context} is not an IPv{wanted} address")
        endpoints.append(endpoint)
    return Target(text=text, endpoints=_unique(endpoints))


def _parse_dns(text: str, rest: str) -> Target:
    dns_server = None
    if rest.startswith("//"):
        authority, slash, name = rest[2:].partition("/")
        if not slash:
            raise ValueError(f"target {text!r}: expected 'dns://[DNS_HOST:DNS_PORT]/host:port'")
        if authority:
            server = parse_host_port(
                authority, context=f"target {text!r}: DNS server {authority!r}", default_port=53
            )
            if not server.is_literal:
                raise ValueError(f"target {text!r}: DNS server {authority!r} must be an IP address")
            dns_server = Address(server.host, server.port)
    else:
        name = rest
    if not name:
        raise ValueError(f"target {text!r}: no host name after 'dns:'")
    endpoint = parse_host_port(name, context=f"target {text!r}")
    return Target(text=text, endpoints=(endpoint,), dns_server=dns_server)


def parse_host_port(text: str, *, context: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    if not text:
        raise ValueError(f"{context}: empty address")
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"{context}: missing ']' after IPv6 address")
        if _ip_literal(host) is None or ":" not in host:
            raise ValueError(f"{context}: {host!r} is not an IPv6 address")
        if tail and not tail.startswith(":"):
            raise ValueError(f"{context}: unexpected {tail!r} after ']'")
        port = _parse_port(tail[1:], context) if tail else default_port
    elif text.count(":") > 1:
        # A bare IPv6 literal has no port (gRPC naming requires brackets with one).
        if _ip_literal(text) is None:
            raise ValueError(f"{context}: {text!r} is neither host:port nor an IPv6 address")
        host, port = text, default_port
    else:
        host, sep, port_text = text.partition(":")
        port = _parse_port(port_text, context) if sep else default_port
        if not host:
            raise ValueError(f"{context}: missing host before ':'")
        _check_host(host, context)
    ip = _ip_literal(host)
    host = str(ip) if ip is not None else host.lower().rstrip(".")
    return Endpoint(host=host, port=port, authority=text)


def _parse_port(text: str, context: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{context}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{context}: port {port} is out of range 1-65535")
    return port


def _check_host(host: str, context: str) -> None:
    if _ip_literal(host) is not None:
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{context}: {host!r} is not a valid host name or IP address")


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _unique(endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
    seen: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        seen.setdefault((endpoint.host, endpoint.port), endpoint)
    return tuple(seen.values())
