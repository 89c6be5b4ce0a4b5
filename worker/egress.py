"""Where a webhook may connect: the SSRF guard.

A webhook URL is chosen by a client, but the delivery is made from inside the operator's network.
Unchecked, a client could make Jobcast POST to the cloud metadata service (169.254.169.254), to
Redis on localhost, or to anything else on the private network. So:

- **Only public unicast addresses.** Loopback, private (RFC 1918, IPv6 unique-local), link-local,
  multicast, unspecified, reserved, shared (100.64.0.0/10), documentation and benchmarking ranges
  are refused, for IPv4 and IPv6. The source is the IANA IPv4 and IPv6 Special-Purpose Address
  Registries: the standard library's ``ipaddress`` implements them as they stood when its Python
  was released, and :data:`SPECIAL_PURPOSE` is the one table of the ranges registered since (or
  missing from older patch releases), each with its source. A range added to the registries is
  added there. An IPv6 address that embeds an IPv4 one (IPv4-mapped
  ``::ffff:a.b.c.d``, 6to4 ``2002::/16``) is judged by the IPv4 address.
- **Checked on the address actually connected to.** :class:`GuardedBackend` is an httpcore network
  backend: when httpcore opens a connection to ``(host, port)`` it resolves the host itself, drops
  every non-public address and connects to one it checked. There is no second resolution, so DNS
  rebinding (a name answering public at check time, private at connect time) has nothing to slip
  into. httpcore then starts TLS over that socket with the URL's host name for SNI and certificate
  verification, and the Host header is the URL's, so virtual hosts and HTTPS work as usual. (Doing
  this with httpx would mean reaching into its transport's private pool; httpcore takes the backend
  as a documented argument, and follows no redirects by construction.)
- **Refused at submission where already knowable**: a host that is an IP literal, or a name that
  resolves (within a short timeout) to non-public addresses only. A name that does not resolve is
  accepted — its DNS record may not exist yet — and is checked again at every attempt.

``JOBCAST_WEBHOOK_ALLOW_PRIVATE=1`` switches all of this off, for development and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

import httpcore

logger = logging.getLogger(__name__)

#: How long the submission check waits for a name to resolve before accepting it unchecked.
SUBMIT_RESOLVE_TIMEOUT_S = 2.0

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Properties of ``ipaddress`` addresses that make one non-public, with the name we give them.
_NON_PUBLIC = (
    ("is_loopback", "loopback"),
    ("is_unspecified", "unspecified"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_site_local", "site-local"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


#: Special-purpose ranges that are not globally reachable and that Python 3.11's ``ipaddress`` does
#: not (always) report: (network, why, source). Checked after the ``ipaddress`` properties above.
SPECIAL_PURPOSE: tuple[tuple[IPNetwork, str, str], ...] = (
    (ipaddress.ip_network("3fff::/20"), "documentation", "RFC 9637 (IANA IPv6 Special-Purpose Registry, 2024)"),
    (ipaddress.ip_network("5f00::/16"), "segment routing (SRv6) SIDs", "RFC 9602 (IANA IPv6 Special-Purpose, 2024)"),
    (ipaddress.ip_network("64:ff9b:1::/48"), "local-use IPv4/IPv6 translation", "RFC 8215"),
    (ipaddress.ip_network("100::/64"), "discard-only", "RFC 6666"),
    # Two /32s inside it (192.0.0.9 PCP anycast, 192.0.0.10 TURN anycast) are global, but never a
    # webhook receiver: the whole /24 is refused.
    (ipaddress.ip_network("192.0.0.0/24"), "IETF protocol assignments", "RFC 6890 (IANA IPv4 Special-Purpose)"),
    (ipaddress.ip_network("192.88.99.0/24"), "deprecated 6to4 relay anycast", "RFC 7526"),
)


class DestinationRefused(Exception):
    """A webhook destination is not a public address; the message names the address and why."""


def refusal(address: str) -> str | None:
    """Why ``address`` is not public (``"loopback"``, ``"link-local"``, ...), or None when it is."""
    ip: IPAddress = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            reason = refusal(str(embedded))
            return f"{reason} (IPv4 {embedded} inside IPv6)" if reason else None
    for attribute, reason in _NON_PUBLIC:
        if getattr(ip, attribute, False):
            return reason
    for network, reason, _source in SPECIAL_PURPOSE:
        if ip.version == network.version and ip in network:
            return reason
    if not ip.is_global:
        return "not globally routable"
    return None


def ip_literal(host: str) -> str | None:
    """``host`` as a normalised IP address when it is one (brackets allowed), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of the name ``host`` in resolver order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def addresses_of(host: str, port: int, resolver: Resolver) -> list[str]:
    """An IP literal is its own address; a name is resolved."""
    literal = ip_literal(host)
    return [literal] if literal is not None else await resolver(host, port)


def _describe(host: str, refused: dict[str, str]) -> str:
    what = ", ".join(f"{address} ({reason})" for address, reason in refused.items())
    if list(refused) == [ip_literal(host)]:
        return f"{host} is not a public address: {what}"
    return f"{host} resolves only to non-public addresses: {what}"


def public_addresses(host: str, addresses: Iterable[str]) -> list[str]:
    """The public ones of ``addresses``; :class:`DestinationRefused` when there are none."""
    allowed, refused = [], {}
    for address in addresses:
        reason = refusal(address)
        if reason is None:
            allowed.append(address)
        else:
            refused[address] = reason
    if not allowed:
        raise DestinationRefused(_describe(host, refused) if refused else f"{host} has no address")
    return allowed


async def check_destination(
    host: str, port: int, *, resolver: Resolver = resolve, timeout_s: float = SUBMIT_RESOLVE_TIMEOUT_S
) -> None:
    """The submission check: :class:`DestinationRefused` when ``host`` is, or resolves only to,
    non-public addresses. A name that does not resolve in time is let through (checked at delivery)."""
    try:
        async with asyncio.timeout(timeout_s):
            addresses = await addresses_of(host, port, resolver)
    except (OSError, TimeoutError) as exc:  # socket.gaierror is an OSError
        logger.info("webhook host %s not resolvable at submission (%s); it is checked at delivery", host, exc)
        return
    public_addresses(host, addresses)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to public addresses it resolved itself.

    ``inner`` makes the actual connections (httpcore's anyio backend by default); ``resolver`` is
    :func:`resolve` unless a test replaces it. :class:`DestinationRefused` is raised before any
    connection is attempted; with ``allow_private`` every address is allowed.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        inner: httpcore.AsyncNetworkBackend | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self._allow_private = allow_private
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self._resolve = resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await addresses_of(host, port, self._resolve)
        except (OSError, UnicodeError) as exc:  # UnicodeError: not a valid host name (idna)
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not self._allow_private:
            addresses = public_addresses(host, addresses)
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:  # the checked addresses, in resolver order, until one answers
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("webhooks are delivered over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
