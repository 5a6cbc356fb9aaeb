"""Fetching a feed (SPEC §8): one bounded, conditional HTTP GET → ``FetchResult``.

Owns the HTTP side of an import:

- conditional requests: ``If-None-Match`` / ``If-Modified-Since`` from the validators the caller
  stored; a 304 is ``not_modified``;
- the SSRF guard (``shared.webhooks.ssrf``) on every hop, as webhook delivery applies it: the
  host is resolved here, every answer is checked, and the request goes to the checked address
  itself (``Host`` and TLS SNI keep the name), so a DNS answer that changes between the check and
  the connect (DNS rebinding) cannot steer a fetch into the internal network;
- redirects, followed here one hop at a time (at most ``max_redirects``), each target resolved,
  checked and pinned like the first before it is contacted;
- limits: at most ``max_bytes`` of *decoded* body, counted while streaming (a huge or endless
  body, or a small gzip that inflates to gigabytes, is cut off as soon as it passes the limit),
  and one deadline, ``timeout_s``, over the whole fetch: every hop, the URL checks, a server that
  never answers or trickles a byte at a time.

It does not parse (``parse.py``), store validators, or decide when to fetch (the scheduler).

``FetchError`` is the only exception. Its message is short and safe to store as the feed's
``last_error``: a status, a limit or an error type, never a URL (a redirect target may carry a
token) or any part of a response body.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Literal, cast

import httpx

from shared.webhooks.ssrf import (
    AsyncResolver,
    UnsafeURL,
    check_addresses,
    ip_literal,
    parse_webhook_url,
    pin,
    resolve_async,
)

USER_AGENT = "Conclave-Knowledge/1.0 (+https://github.com/conclave)"
ACCEPT = (
    "application/rss+xml, application/atom+xml, application/rdf+xml;q=0.9, "
    "application/xml;q=0.8, text/xml;q=0.8, */*;q=0.1"
)
# Only encodings that the bounded decoder below can inflate a slice at a time. httpx would decode
# br/zstd too if their packages were installed, but all at once per chunk, past any size limit.
ACCEPT_ENCODING = "gzip, deflate"

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEMES = frozenset({"http", "https"})
_MAX_ERROR_CHARS = 200
# A validator is stored on the feed and echoed back on the next fetch: a server that sends a
# kilobytes-long one gets no conditional requests rather than a bloated row and request.
_MAX_VALIDATOR_CHARS = 1024


@dataclass(frozen=True)
class FetchResult:
    status: Literal["ok", "not_modified"]
    body: bytes  # decoded (gzip/deflate undone); b"" when not_modified
    etag: str | None  # from the response; on a 304 without one, the etag that was sent
    last_modified: str | None  # likewise
    final_url: str  # after redirects: the base for the feed's relative links
    content_type: str | None


class FetchError(Exception):
    """The feed could not be fetched; the message is short and safe to store as ``last_error``."""


def make_fetch_client() -> httpx.AsyncClient:
    """The client feed imports should share within a process.

    - ``follow_redirects=False``: ``fetch_feed`` follows them itself, checking and counting each hop.
    - ``trust_env=False``: a proxy from the environment would be what is connected to, not the
      address the SSRF guard approved.
    - No keep-alive: requests are pinned to IPs, and the pool keys connections by (scheme, IP,
      port), so a kept TLS connection verified for one name could carry another name's request.
    - No cookies: fetches are stateless, and a shared jar would carry one feed's cookies to another
      feed on the same site.
    """
    return httpx.AsyncClient(
        headers={"User-Agent": USER_AGENT, "Accept": ACCEPT, "Accept-Encoding": ACCEPT_ENCODING},
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(20.0),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=0),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


async def fetch_feed(
    client: httpx.AsyncClient,
    url: str,
    *,
    etag: str | None,
    last_modified: str | None,
    max_bytes: int = 5 * 1024 * 1024,
    timeout_s: float = 20.0,
    max_redirects: int = 5,
    allow_private: bool = False,
    resolver: AsyncResolver = resolve_async,
) -> FetchResult:
    """GET ``url`` (conditionally when ``etag`` / ``last_modified`` are given) within the limits.

    Every hop goes to an address ``resolver`` gave for its host and the SSRF guard accepted (any
    address when ``allow_private``: tests and local use only); addresses are tried in order while
    connecting fails.

    Raises ``FetchError`` for: a scheme other than http/https, a host that does not resolve or
    resolves to a non-public address, more than ``max_redirects`` redirects, a status other than
    2xx/304 (``"HTTP 404"``), a body larger than ``max_bytes``, no complete answer within
    ``timeout_s``, and connection or protocol errors.
    """
    etag, last_modified = _validator(etag), _validator(last_modified)
    headers = {"Accept-Encoding": ACCEPT_ENCODING}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with asyncio.timeout(timeout_s):
            result = await _follow(
                client, url, headers, max_bytes, timeout_s, max_redirects, allow_private, resolver
            )
    except (TimeoutError, httpx.TimeoutException):
        raise FetchError(f"timed out after {timeout_s:g}s") from None
    except httpx.InvalidURL:
        raise FetchError("invalid URL") from None
    except zlib.error:
        raise FetchError("response body is not valid gzip/deflate data") from None
    except httpx.HTTPError as exc:
        raise FetchError(_describe(exc)) from None
    if result.status == "not_modified":
        # A 304 need not repeat the validators; when it does not, the ones sent are still current.
        return replace(result, etag=result.etag or etag, last_modified=result.last_modified or last_modified)
    return result


async def _follow(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    max_bytes: int,
    timeout_s: float,
    max_redirects: int,
    allow_private: bool,
    resolver: AsyncResolver,
) -> FetchResult:
    target = url
    for _ in range(max_redirects + 1):
        addresses = await _checked_addresses(target, allow_private, resolver)
        async with _get_pinned(client, target, addresses, headers, timeout_s) as response:
            status = response.status_code
            if status in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"HTTP {status} without a Location header")
                # Against the URL asked for, not the pinned one: a relative Location keeps the name.
                target = str(httpx.URL(target).join(location.strip()))
                continue
            if status == 304:
                return FetchResult(
                    "not_modified",
                    b"",
                    etag=_validator(response.headers.get("etag")),
                    last_modified=_validator(response.headers.get("last-modified")),
                    final_url=target,
                    content_type=response.headers.get("content-type"),
                )
            if not 200 <= status < 300:
                raise FetchError(f"HTTP {status}")
            body = await _read_body(response, max_bytes)
            return FetchResult(
                "ok",
                body,
                etag=_validator(response.headers.get("etag")),
                last_modified=_validator(response.headers.get("last-modified")),
                final_url=target,
                content_type=response.headers.get("content-type"),
            )
    raise FetchError(f"too many redirects (more than {max_redirects})")


async def _checked_addresses(url: str, allow_private: bool, resolver: AsyncResolver) -> list[str]:
    """The addresses ``url`` may be fetched from, resolved now; ``FetchError`` if there are none."""
    parsed = httpx.URL(url)
    if parsed.scheme not in _SCHEMES:
        raise FetchError(f"unsupported URL scheme {parsed.scheme[:20]!r}; only http and https")
    if not parsed.host:
        raise FetchError("URL has no host")
    try:
        _, host, port = parse_webhook_url(url)
        addresses = [host] if ip_literal(host) is not None else list(await resolver(host, port))
        check_addresses(host, addresses, allow_private=allow_private)
    except UnsafeURL as exc:
        raise FetchError(f"refused: {exc}"[:_MAX_ERROR_CHARS]) from None
    return addresses


@contextlib.asynccontextmanager
async def _get_pinned(
    client: httpx.AsyncClient, url: str, addresses: list[str], headers: dict[str, str], timeout_s: float
) -> AsyncGenerator[httpx.Response, None]:
    """Stream a GET of ``url`` from the first of ``addresses`` that accepts a connection."""
    failure: httpx.ConnectError | None = None
    async with contextlib.AsyncExitStack() as stack:
        for address in addresses:
            target = pin(url, address)
            request = client.stream(
                "GET",
                target.url,
                headers={**headers, "host": target.host_header},
                extensions=target.extensions,
                follow_redirects=False,
                timeout=timeout_s,
            )
            try:
                response = await stack.enter_async_context(request)
            except httpx.ConnectError as exc:
                failure = exc  # nothing was sent: the next address may take it
                continue
            yield response
            return
    assert failure is not None  # there is always at least one checked address
    raise failure


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    too_large = FetchError(f"response larger than {max_bytes} bytes")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    declared = response.headers.get("content-length", "")
    # Without an encoding the declared length is the body's size: refuse before reading any of it.
    if encoding in ("", "identity") and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    if response.is_stream_consumed:  # built in memory (httpx.MockTransport) and already decoded
        if len(response.content) > max_bytes:
            raise too_large
        return response.content
    decoder = _BoundedDecoder(encoding)
    parts: list[bytes] = []
    size = 0
    # Raw bytes, decoded here, so the limit applies to the inflated size as it grows; aclosing makes
    # leaving early close the stream now, not at garbage collection.
    raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            data = decoder.decode(chunk, max_bytes - size)
            if data is None:
                raise too_large
            size += len(data)
            parts.append(data)
    tail = decoder.flush(max_bytes - size)
    if tail is None:
        raise too_large
    parts.append(tail)
    return b"".join(parts)


class _BoundedDecoder:
    """Undoes ``Content-Encoding`` without ever producing more than the room left under the limit."""

    def __init__(self, encoding: str) -> None:
        if encoding in ("", "identity"):
            self._inflater = None
        elif encoding in ("gzip", "x-gzip", "deflate"):
            # 32 + MAX_WBITS accepts a gzip or a zlib header: servers label either one "deflate".
            self._inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
        else:
            raise FetchError(f"unsupported Content-Encoding {encoding[:40]!r}")

    def decode(self, chunk: bytes, room: int) -> bytes | None:
        """The decoded bytes of ``chunk``, or None when they would exceed ``room``."""
        if self._inflater is None:
            return chunk if len(chunk) <= room else None
        # max_length room + 1: reaching it proves the limit is passed without inflating further.
        data = self._inflater.decompress(chunk, room + 1)
        return data if len(data) <= room else None

    def flush(self, room: int) -> bytes | None:
        if self._inflater is None:
            return b""
        data = self._inflater.flush()
        return data if len(data) <= room else None


def _validator(value: str | None) -> str | None:
    """``value`` if it can be sent back as a header and stored; else None, which only costs a full fetch."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_VALIDATOR_CHARS or not (value.isascii() and value.isprintable()):
        return None
    return value


def _describe(exc: Exception) -> str:
    reason = str(exc) or "no detail"
    return f"{type(exc).__name__}: {reason}"[:_MAX_ERROR_CHARS]
