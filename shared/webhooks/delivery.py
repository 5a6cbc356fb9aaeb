"""One webhook delivery attempt (SPEC §3.2): check the destination now, connect to what was checked.

Owns ``attempt_delivery`` and its verdict, ``AttemptResult``:

    delivered   2xx
    gone        410; the caller disables the endpoint
    refused     the URL fails the SSRF guard at send time; permanent for this URL
    retry       anything else: other statuses (3xx included, redirects are never followed),
                429/503 with ``retry_after``, timeouts, connection and DNS errors

It does not schedule retries, store attempts or sign bodies (``signing.py``).

DNS rebinding: the host is resolved here, every answer is checked, and the request goes to the
checked IP itself (``Host`` header and TLS SNI keep the original name), so a second, different DNS
answer at connect time cannot send the request elsewhere. Use ``make_delivery_client``: pinning
needs a direct connection, and its pool must not share connections between hostnames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Literal, cast

import httpx

from shared.retry_after import parse_retry_after
from shared.webhooks.ssrf import (
    AsyncResolver,
    UnsafeURL,
    check_addresses,
    ip_literal,
    is_public_address,
    parse_webhook_url,
    pin,
    resolve_async,
)

MAX_RESPONSE_BYTES = 64 * 1024
_MAX_ERROR_CHARS = 200

Outcome = Literal["delivered", "retry", "gone", "refused"]


@dataclass(frozen=True)
class AttemptResult:
    outcome: Outcome
    status_code: int | None = None
    error: str | None = None  # short: exception type and reason; never a response body or secret
    retry_after: float | None = None  # seconds the receiver asked us to wait (429/503 only)
    address: str | None = None  # the IP connected to, or the refused one


def make_delivery_client(timeout_s: float = 15.0) -> httpx.AsyncClient:
    """The client webhook deliveries should share within a process.

    - ``trust_env=False``: a proxy from the environment would make the proxy, not the checked
      address, the thing connected to.
    - No keep-alive: the pool keys connections by (scheme, IP, port), so a kept TLS connection
      opened (and certificate-checked) for one tenant's hostname could carry another hostname's
      request to the same IP. Webhooks are a few per batch; a handshake each is cheap.
    - No cookies: a jar keyed by IP would hand one receiver's cookies to another on the same IP.
    """
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=0),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


async def attempt_delivery(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    body: bytes,
    *,
    allow_private: bool,
    timeout_s: float = 15.0,
    resolver: AsyncResolver = resolve_async,
) -> AttemptResult:
    """POST ``body`` with ``headers`` to ``url`` once; ``timeout_s`` bounds the whole attempt, DNS included.

    Addresses are tried in resolver order only while connecting fails, so a body is sent at most once.
    """
    try:
        _, host, port = parse_webhook_url(url)
    except UnsafeURL as exc:
        return AttemptResult("refused", error=f"UnsafeURL: {exc}")
    try:
        async with asyncio.timeout(timeout_s):
            addresses = [host] if ip_literal(host) is not None else list(await resolver(host, port))
            if not addresses:
                # Unlike at registration, a failed lookup may be a passing DNS outage.
                return AttemptResult("retry", error=f"DNSError: host {host!r} does not resolve")
            try:
                check_addresses(host, addresses, allow_private=allow_private)
            except UnsafeURL as exc:
                return AttemptResult("refused", error=f"UnsafeURL: {exc}", address=_first_refused(addresses))
            result = AttemptResult("retry", error="ConnectError: no address to connect to")
            for address in addresses:
                target = pin(url, address)
                request_headers = httpx.Headers(headers)
                request_headers["host"] = target.host_header
                try:
                    return await _post(
                        client, target.url, request_headers, body, target.extensions, timeout_s, address
                    )
                except httpx.ConnectError as exc:
                    result = AttemptResult("retry", error=_describe(exc), address=address)
            return result
    except (TimeoutError, httpx.TimeoutException):
        return AttemptResult("retry", error=f"TimeoutError: no response within {timeout_s:g}s")
    except httpx.HTTPError as exc:
        return AttemptResult("retry", error=_describe(exc))


async def _post(
    client: httpx.AsyncClient,
    target: httpx.URL,
    headers: httpx.Headers,
    body: bytes,
    extensions: dict[str, str],
    timeout_s: float,
    address: str,
) -> AttemptResult:
    async with client.stream(
        "POST",
        target,
        content=body,
        headers=headers,
        extensions=extensions,
        follow_redirects=False,
        timeout=timeout_s,
    ) as response:
        await _discard_body(response)
    return _verdict(response, address)


async def _discard_body(response: httpx.Response) -> None:
    # Raw bytes: a compressed body must not expand past the cap. What is left unread is dropped
    # with the connection; nothing of the body is kept, so none of it can leak into an error.
    if response.is_stream_consumed:  # built in memory (httpx.MockTransport): nothing left to read
        return
    received = 0
    # aclosing: leaving the loop early must close the generator now, not at garbage collection.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            received += len(chunk)
            if received >= MAX_RESPONSE_BYTES:
                break


def _verdict(response: httpx.Response, address: str) -> AttemptResult:
    status = response.status_code
    if 200 <= status < 300:
        return AttemptResult("delivered", status_code=status, address=address)
    if status == 410:
        return AttemptResult("gone", status_code=status, error="HTTP 410: endpoint is gone", address=address)
    if status in (429, 503):
        return AttemptResult(
            "retry",
            status_code=status,
            error=f"HTTP {status}",
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            address=address,
        )
    if 300 <= status < 400:
        return AttemptResult(
            "retry", status_code=status, error=f"HTTP {status}: redirects are not followed", address=address
        )
    return AttemptResult("retry", status_code=status, error=f"HTTP {status}", address=address)


def _first_refused(addresses: list[str]) -> str | None:
    for address in addresses:
        ip = ip_literal(address)
        if ip is None or not is_public_address(ip):
            return address
    return None


def _describe(exc: Exception) -> str:
    reason = str(exc) or "no detail"
    return f"{type(exc).__name__}: {reason}"[:_MAX_ERROR_CHARS]
