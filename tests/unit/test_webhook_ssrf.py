"""The SSRF guard: every non-public address kind, URL validation, and the registration check."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import pytest

from shared.webhooks.ssrf import (
    Resolver,
    UnsafeURL,
    check_url,
    is_public_address,
    non_public_reason,
    parse_webhook_url,
    resolve,
    resolve_async,
)

PUBLIC_V4 = "93.184.215.14"


def resolving_to(*addresses: str) -> Resolver:
    def resolver(host: str, port: int) -> Sequence[str]:
        return list(addresses)

    return resolver


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.0.0.5",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "169.254.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "100.64.0.1",
        "100.127.255.254",
        "198.18.0.1",
        "198.19.255.255",
        "192.0.2.1",
        "198.51.100.7",
        "203.0.113.9",
        "192.0.0.8",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fe80::1%eth0",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "3fff::1",
        "2001::1",  # Teredo
        "100::1",  # discard-only
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # IPv4-compatible
        "::8.8.8.8",  # IPv4-compatible forms are deprecated: never public
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
        "64:ff9b:1::1",  # local-use NAT64
        "4000::1",  # outside global unicast 2000::/3
    ],
)
def test_non_public_addresses_are_not_public(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not is_public_address(ip)
    assert non_public_reason(ip)


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_V4,
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of a public address (DNS64 networks)
        "2002:808:808::1",  # 6to4 of a public address
    ],
)
def test_public_addresses_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.5", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("224.0.0.1", "multicast"),
        ("::ffff:127.0.0.1", "loopback IPv4 inside IPv6"),
    ],
)
def test_the_reason_names_the_kind_of_address(address: str, reason: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1", "http://10.0.0.5", "http://169.254.169.254/latest/meta-data/", "http://[::1]"],
)
def test_spec_private_urls_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True)


def test_a_hostname_resolving_to_a_private_address_is_refused() -> None:
    resolver = resolving_to("10.1.2.3")
    with pytest.raises(
        UnsafeURL, match=r"'internal\.example\.com' resolves to 10\.1\.2\.3, a private address"
    ):
        check_url("https://internal.example.com/hook", allow_private=False, resolver=resolver)
    assert check_url("https://internal.example.com/hook", allow_private=True, resolver=resolver) == [
        "10.1.2.3"
    ]


def test_one_private_answer_among_public_ones_is_enough_to_refuse() -> None:
    resolver = resolving_to(PUBLIC_V4, "2606:4700:4700::1111", "127.0.0.1")
    with pytest.raises(UnsafeURL, match="loopback"):
        check_url("https://mixed.example.com/", allow_private=False, resolver=resolver)


def test_a_public_address_is_accepted_and_returned() -> None:
    resolver = resolving_to(PUBLIC_V4)
    assert check_url("https://example.com/hooks", allow_private=False, resolver=resolver) == [PUBLIC_V4]


def test_ip_literals_do_not_consult_the_resolver() -> None:
    def resolver(host: str, port: int) -> Sequence[str]:
        raise AssertionError("an IP literal needs no DNS")

    assert check_url(f"http://{PUBLIC_V4}:8080/x", allow_private=False, resolver=resolver) == [PUBLIC_V4]


def test_a_host_that_does_not_resolve_is_refused_even_when_private_is_allowed() -> None:
    with pytest.raises(UnsafeURL, match="does not resolve"):
        check_url("https://nowhere.example.com/", allow_private=True, resolver=resolving_to())


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/x", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("//example.com/x", "scheme"),
        ("example.com/x", "scheme"),
        ("http://user:pw@example.com/", "user information"),
        ("http://user@example.com/", "user information"),
        ("http://@example.com/", "user information"),
        ("http://", "no host"),
        ("http:///path", "no host"),
        ("http://example.com:0/", "port"),
        ("http://example.com:65536/", "port"),
        ("http://example.com:abc/", "malformed"),
        ("http://exa\nmple.com/", "malformed"),
        ("http://[fe80::1%25eth0]/", "zone"),
        ("https://example.com/" + "a" * 2100, "longer than 2048"),
    ],
)
def test_malformed_or_unsupported_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(UnsafeURL, match=why):
        parse_webhook_url(url)
    with pytest.raises(UnsafeURL):
        check_url(url, allow_private=True, resolver=resolving_to(PUBLIC_V4))


def test_credentials_never_appear_in_the_message() -> None:
    with pytest.raises(UnsafeURL) as info:
        check_url("http://admin:hunter2@10.0.0.1/?token=s3cret", allow_private=False)
    assert "hunter2" not in str(info.value) and "admin" not in str(info.value)
    with pytest.raises(UnsafeURL) as info:
        check_url("http://10.0.0.1/hook?token=s3cret", allow_private=False)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com", ("http", "example.com", 80)),
        ("https://example.com/hook?x=1", ("https", "example.com", 443)),
        ("HTTPS://Example.COM:8443/h", ("https", "example.com", 8443)),
        ("http://[2606:4700::1]:8080/h", ("http", "2606:4700::1", 8080)),
        ("https://[::1]/", ("https", "::1", 443)),
        ("https://bücher.example/", ("https", "xn--bcher-kva.example", 443)),
        ("http://example.com:65535/", ("http", "example.com", 65535)),
    ],
)
def test_parse_returns_scheme_host_and_port(url: str, expected: tuple[str, str, int]) -> None:
    assert parse_webhook_url(url) == expected


def test_resolve_returns_unique_addresses_and_nothing_for_unknown_hosts() -> None:
    assert resolve("127.0.0.1", 80) == ["127.0.0.1"]
    assert resolve("::1", 80) == ["::1"]
    assert resolve("no-such-host.invalid", 80) == []
    assert asyncio.run(resolve_async("127.0.0.1", 443)) == ["127.0.0.1"]
    assert asyncio.run(resolve_async("no-such-host.invalid", 443)) == []
