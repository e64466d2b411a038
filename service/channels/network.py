"""Where a channel may send: the network rule, checked on the addresses a name resolves to.

A channel's URL comes from the org's configuration, so it may point anywhere: at our own metadata
service, at a database on the pod network, at loopback. Only `https://` to public addresses is
allowed, unless `LEAK_RESPONDER_CHANNEL_ALLOWED_NETWORKS` names a network (then `http://` is allowed
there too). The check runs after DNS resolution and the connection goes to the address that was
checked, never to a second resolution of the name (which could answer differently: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(Exception):
    """The URL may not be sent to; `str()` says why without naming the URL."""


class ResolutionFailed(Exception):
    """The name did not resolve (now): worth another try later."""


@dataclass(frozen=True, slots=True)
class Target:
    """A checked destination: connect to `address`, speak to `host` (Host header, TLS SNI)."""

    scheme: str
    host: str
    port: int
    address: Address
    path: str

    @property
    def connect_url(self) -> str:
        literal = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"


class AddressPolicy:
    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        self.allowed = tuple(allowed)

    def permits(self, scheme: str, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return scheme in ("http", "https")
        return scheme == "https" and address.is_global

    async def resolve(self, url: str) -> Target:
        """The checked target of `url`: every address the name resolves to must be permitted (a
        name answering one public and one private address is refused), and the first is used."""
        parts = _split(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise AddressRefused("only http(s) URLs")
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await _lookup(host, port)
        refused = [a for a in addresses if not self.permits(scheme, a)]
        if refused:
            raise AddressRefused("neither https to a public address nor in an allowed network")
        path = parts.path or "/"
        if parts.query:
            path += f"?{parts.query}"
        return Target(scheme, host, port, addresses[0], path)


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise AddressRefused("malformed URL") from None
    if not parts.hostname or parts.username or parts.password:
        raise AddressRefused("URL without a host, or with credentials")
    return parts


async def _lookup(host: str, port: int) -> list[Address]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ResolutionFailed("name did not resolve") from None
    found: list[Address] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise ResolutionFailed("name resolved to nothing")
    return found
