"""The SSRF guard (SPEC §3.2): which webhook URLs are acceptable and which addresses may be contacted.

Owns URL validation (``parse_webhook_url``), DNS resolution (``resolve``, ``resolve_async``), the
public-address rule (``is_public_address``), the registration-time check (``check_url``) and
pinning (``pin``): a request aimed at the checked IP itself, the name kept for ``Host`` and TLS.
It does not send anything: webhook delivery (``delivery.py``) and feed fetches
(``shared/knowledge/fetch.py``) re-run the address check at send time and connect to the address
they checked, because a DNS answer may change between the check and the connect (DNS rebinding).

``UnsafeURL`` messages name the host and the reason, never the whole URL: its path or query may
carry a token (many webhook URLs are capability URLs) and userinfo would carry a password.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
AsyncResolver = Callable[[str, int], Awaitable[Sequence[str]]]

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

# Checked in addition to the ``ipaddress`` flags: their coverage differs between Python patch
# releases (3.11.7 calls 224.0.0.1 and 192.0.0.8 global), and this list must not depend on that.
_NON_PUBLIC_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
# Only 2000::/3 is allocated as global unicast; within it these are special-purpose.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NON_PUBLIC_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("2001::/23", "IETF protocol assignment (Teredo, ORCHID, …)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
    )
)
# IPv6 forms that carry an IPv4 address: the packet ends up at that IPv4 address, so it decides.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class UnsafeURL(ValueError):
    """A webhook URL that must not be registered or delivered to; the message says why."""


def non_public_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public internet address (``"loopback"``, ``"private"``, …), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = non_public_reason(embedded)
            return None if reason is None else f"{reason} IPv4 inside IPv6"
        if ip in _IPV4_COMPATIBLE:
            # Includes :: and ::1; IPv4-compatible addresses are deprecated (RFC 4291) and never public.
            return "unspecified" if ip.is_unspecified else "loopback" if ip.is_loopback else "reserved"
        if ip.scope_id:
            return "scoped (zone identifier)"
    listed = _listed_reason(ip, _NON_PUBLIC_V4 if isinstance(ip, ipaddress.IPv4Address) else _NON_PUBLIC_V6)
    if listed is not None:
        return listed
    reason = _flag_reason(ip)
    if reason is None and isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return "reserved"
    return reason


def is_public_address(ip: IPAddress) -> bool:
    """True when ``ip`` is a routable public unicast address a webhook may be sent to."""
    return non_public_reason(ip) is None


def parse_webhook_url(url: str) -> tuple[str, str, int]:
    """Validate a webhook URL and return ``(scheme, host, port)``.

    ``host`` is lower-case ASCII (IDNA-encoded), IPv6 literals without brackets. Raises
    ``UnsafeURL`` for anything but an absolute http(s) URL with a host, no userinfo, a port in
    1–65535 and at most ``MAX_URL_LENGTH`` characters.
    """
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"URL is longer than {MAX_URL_LENGTH} characters")
    try:
        # httpx parses it here because httpx sends it later: one parser, so the host checked
        # is the host connected to (differences between URL parsers are a classic SSRF bypass).
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise UnsafeURL("URL is malformed") from None
    scheme = parsed.scheme
    if scheme not in DEFAULT_PORTS:
        raise UnsafeURL("URL scheme must be http or https")
    if parsed.userinfo or "@" in _authority(url):
        raise UnsafeURL("URL must not contain user information (user:password@)")
    host = parsed.raw_host.decode("ascii").lower()
    if not host:
        raise UnsafeURL("URL has no host")
    if "%" in host:
        raise UnsafeURL("URL host must not carry an IPv6 zone identifier")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise UnsafeURL(f"URL port {port} is out of range 1-65535")
    return scheme, host, port


def ip_literal(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal (as ``parse_webhook_url`` returns it), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to for TCP, in resolver order without duplicates; [] if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return _unique(str(info[4][0]) for info in infos)


async def resolve_async(host: str, port: int) -> list[str]:
    """``resolve`` on the running event loop's resolver (a thread pool), without blocking the loop."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return _unique(str(info[4][0]) for info in infos)


def check_addresses(host: str, addresses: Sequence[str], *, allow_private: bool) -> None:
    """Raise ``UnsafeURL`` unless ``host`` resolved and (unless ``allow_private``) every address is public.

    Every address, not just the first: a client may connect to any of them.
    """
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve")
    if allow_private:
        return
    for address in addresses:
        ip = ip_literal(address)
        if ip is None:
            raise UnsafeURL(f"host {host!r} resolves to an unparsable address {address!r}")
        reason = non_public_reason(ip)
        if reason is not None:
            raise UnsafeURL(f"host {host!r} resolves to {address}, a {reason} address")


def check_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> list[str]:
    """The registration-time check: parse, resolve and refuse non-public destinations.

    Returns the resolved addresses. An IP-literal host is its own answer and skips the resolver.
    """
    _, host, port = parse_webhook_url(url)
    addresses = [host] if ip_literal(host) is not None else list(resolver(host, port))
    check_addresses(host, addresses, allow_private=allow_private)
    return addresses


@dataclass(frozen=True)
class PinnedTarget:
    """Where to send a request for ``url`` so that it reaches the checked address and no other."""

    url: httpx.URL  # the URL with the checked IP as its host: no DNS lookup at connect time
    host_header: str  # the URL's own authority, for the ``Host`` header
    extensions: dict[str, str]  # TLS SNI and the certificate check on the name, not the IP


def pin(url: str, address: str) -> PinnedTarget:
    """The request for ``url`` (as ``parse_webhook_url`` accepts it) aimed at ``address``.

    Use with a client that keeps no connections alive: its pool keys connections by (scheme, IP,
    port), so a kept TLS connection verified for one name could carry another name's request.
    """
    scheme, host, port = parse_webhook_url(url)
    name = f"[{host}]" if ":" in host else host
    return PinnedTarget(
        url=httpx.URL(url).copy_with(host=address),
        host_header=name if port == DEFAULT_PORTS[scheme] else f"{name}:{port}",
        extensions={} if ip_literal(host) is not None or scheme != "https" else {"sni_hostname": host},
    )


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    return None


def _flag_reason(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "non-global"
    return None


def _listed_reason(
    ip: IPAddress, table: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]
) -> str | None:
    for network, why in table:
        if ip in network:
            return why
    return None


def _authority(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return ""


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))
