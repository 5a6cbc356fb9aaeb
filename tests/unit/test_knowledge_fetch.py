"""Fetching feeds against real local HTTP servers (aiohttp on 127.0.0.1, port 0).

Each test runs its server and the fetch inside one ``asyncio.run``. The limits are checked from the
server's side as well: how many bytes it managed to send, which requests and headers it saw.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from shared.knowledge.fetch import (
    USER_AGENT,
    FetchError,
    FetchResult,
    fetch_feed,
    make_fetch_client,
)
from shared.knowledge.parse import parse_feed
from shared.webhooks import ssrf

FEEDS = Path(__file__).parent.parent / "fixtures" / "feeds"
RSS = (FEEDS / "rss_no_guids.xml").read_bytes()
ETAG = '"feed-v1"'
LAST_MODIFIED = "Mon, 06 Jan 2025 12:00:00 GMT"
MiB = 1024 * 1024

Route = Callable[["Server", web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    port: int = 0
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    bytes_sent: int = 0

    def url(self, path: str = "/feed.xml") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@asynccontextmanager
async def serve(routes: dict[str, Route]) -> AsyncIterator[Server]:
    state = Server()

    async def handle(request: web.Request) -> web.StreamResponse:
        state.requests.append((request.path_qs, dict(request.headers)))
        route = routes.get(request.path)
        if route is None:
            return web.Response(status=404, text="no such feed")
        return await route(state, request)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    # Cancel a handler when its client goes away, so endless bodies stop and cleanup does not wait.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.port = next(int(a[1]) for a in runner.addresses if isinstance(a, tuple))
        yield state
    finally:
        await runner.cleanup()


async def fetch(
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    max_bytes: int = 5 * MiB,
    timeout_s: float = 20.0,
    max_redirects: int = 5,
    allow_private: bool = True,  # the test servers listen on loopback
    resolver: ssrf.AsyncResolver = ssrf.resolve_async,
) -> FetchResult:
    async with make_fetch_client() as client:
        return await fetch_feed(
            client,
            url,
            etag=etag,
            last_modified=last_modified,
            max_bytes=max_bytes,
            timeout_s=timeout_s,
            max_redirects=max_redirects,
            allow_private=allow_private,
            resolver=resolver,
        )


async def conditional_feed(state: Server, request: web.Request) -> web.StreamResponse:
    validators = {"ETag": ETAG, "Last-Modified": LAST_MODIFIED}
    if (
        request.headers.get("If-None-Match") == ETAG
        or request.headers.get("If-Modified-Since") == LAST_MODIFIED
    ):
        return web.Response(status=304, headers=validators)
    return web.Response(
        body=RSS, headers={**validators, "Content-Type": "application/rss+xml; charset=utf-8"}
    )


def redirect(location: str, status: int = 302) -> Route:
    async def respond(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location})

    return respond


async def streamed(
    state: Server, request: web.Request, chunk: bytes, total: int, **headers: str
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/rss+xml", **headers})
    if "Content-Length" not in headers:
        response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        while state.bytes_sent < total:
            await response.write(chunk)
            state.bytes_sent += len(chunk)
    except ConnectionError:
        pass  # the client hung up, as it should
    return response


def test_conditional_get_sends_both_validators_and_maps_304_to_not_modified() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed}) as srv:
            first = await fetch(srv.url())
            assert first == FetchResult(
                status="ok",
                body=RSS,
                etag=ETAG,
                last_modified=LAST_MODIFIED,
                final_url=srv.url(),
                content_type="application/rss+xml; charset=utf-8",
            )
            second = await fetch(srv.url(), etag=first.etag, last_modified=first.last_modified)
            assert second.status == "not_modified"
            assert second.body == b""
            assert (second.etag, second.last_modified, second.final_url) == (ETAG, LAST_MODIFIED, srv.url())

        (_, plain), (_, conditional) = srv.requests
        assert "If-None-Match" not in plain and "If-Modified-Since" not in plain
        assert conditional["If-None-Match"] == ETAG
        assert conditional["If-Modified-Since"] == LAST_MODIFIED
        assert plain["User-Agent"] == USER_AGENT == "Conclave-Knowledge/1.0 (+https://github.com/conclave)"
        assert "application/rss+xml" in plain["Accept"] and "application/atom+xml" in plain["Accept"]
        assert plain["Accept-Encoding"] == "gzip, deflate"

    asyncio.run(scenario())


def test_a_304_without_validators_keeps_the_ones_sent() -> None:
    async def not_modified(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(status=304)

    async def scenario() -> None:
        async with serve({"/feed.xml": not_modified}) as srv:
            result = await fetch(srv.url(), etag=ETAG, last_modified=LAST_MODIFIED)
        assert (result.status, result.etag, result.last_modified) == ("not_modified", ETAG, LAST_MODIFIED)

    asyncio.run(scenario())


def test_a_streamed_50_mb_body_is_cut_off_soon_after_the_limit() -> None:
    async def huge(state: Server, request: web.Request) -> web.StreamResponse:
        return await streamed(state, request, b"<" * (64 * 1024), 50 * MiB)

    async def scenario() -> None:
        async with serve({"/feed.xml": huge}) as srv:
            with pytest.raises(FetchError) as caught:
                await fetch(srv.url(), max_bytes=1 * MiB)
            assert str(caught.value) == f"response larger than {1 * MiB} bytes"
            # The limit plus what the loopback socket buffers held when the client hung up (a few MB);
            # reading it whole would have let all 50 MB out.
            assert srv.bytes_sent < 20 * MiB

    asyncio.run(scenario())


def test_a_declared_length_over_the_limit_is_refused_before_reading_the_body() -> None:
    async def huge(state: Server, request: web.Request) -> web.StreamResponse:
        return await streamed(
            state, request, b"<" * (64 * 1024), 50 * MiB, **{"Content-Length": str(50 * MiB)}
        )

    async def scenario() -> None:
        async with serve({"/feed.xml": huge}) as srv:
            with pytest.raises(FetchError, match=r"^response larger than 5242880 bytes$"):
                await fetch(srv.url())
            assert srv.bytes_sent < 20 * MiB

    asyncio.run(scenario())


def test_a_gzip_body_is_decoded() -> None:
    async def compressed(state: Server, request: web.Request) -> web.StreamResponse:
        body = gzip.compress(RSS)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/xml"}
        )

    async def scenario() -> None:
        async with serve({"/feed.xml": compressed}) as srv:
            result = await fetch(srv.url())
        assert result.body == RSS

    asyncio.run(scenario())


def test_a_gzip_bomb_is_cut_off_by_its_decoded_size() -> None:
    bomb = gzip.compress(b"\0" * (50 * MiB), compresslevel=9)  # ~50 KB that inflate to 50 MB

    async def compressed(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/xml"}
        )

    async def scenario() -> None:
        async with serve({"/feed.xml": compressed}) as srv:
            with pytest.raises(FetchError, match=r"^response larger than 1048576 bytes$"):
                await fetch(srv.url(), max_bytes=1 * MiB)

    assert len(bomb) < 100 * 1024
    asyncio.run(scenario())


def test_an_unsupported_content_encoding_is_refused() -> None:
    async def brotli(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"\x8b\x02\x80", headers={"Content-Encoding": "br"})

    async def scenario() -> None:
        async with serve({"/feed.xml": brotli}) as srv:
            with pytest.raises(FetchError, match=r"^unsupported Content-Encoding 'br'$"):
                await fetch(srv.url())

    asyncio.run(scenario())


def test_a_server_trickling_one_byte_per_second_hits_the_total_deadline() -> None:
    async def trickle(state: Server, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/rss+xml"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:  # forever: only the client's deadline ends this
            await response.write(b" ")
            state.bytes_sent += 1
            await asyncio.sleep(1)

    async def scenario() -> None:
        async with serve({"/feed.xml": trickle}) as srv:
            started = time.monotonic()
            with pytest.raises(FetchError, match=r"^timed out after 1s$"):
                await fetch(srv.url(), timeout_s=1)
            assert time.monotonic() - started < 3
            assert srv.bytes_sent >= 1  # headers and a first byte did arrive: only the total deadline applies

    asyncio.run(scenario())


def test_a_server_that_never_answers_hits_the_deadline() -> None:
    async def silent(state: Server, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def scenario() -> None:
        async with serve({"/feed.xml": silent}) as srv:
            started = time.monotonic()
            with pytest.raises(FetchError, match=r"^timed out after 0.5s$"):
                await fetch(srv.url(), timeout_s=0.5)
            assert time.monotonic() - started < 2.5

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [404, 410, 500, 503])
def test_an_error_status_is_reported_by_its_code_only(status: int) -> None:
    async def failing(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text="Traceback: secret internals")

    async def scenario() -> None:
        async with serve({"/feed.xml": failing}) as srv:
            with pytest.raises(FetchError) as caught:
                await fetch(srv.url())
        assert str(caught.value) == f"HTTP {status}"

    asyncio.run(scenario())


def test_a_missing_feed_is_http_404() -> None:
    async def scenario() -> None:
        async with serve({}) as srv:
            with pytest.raises(FetchError) as caught:
                await fetch(srv.url("/gone.xml"))
        assert str(caught.value) == "HTTP 404"

    asyncio.run(scenario())


def names(mapping: dict[str, list[str]], asked: list[tuple[str, int]]) -> ssrf.AsyncResolver:
    """A resolver answering from ``mapping`` (unknown names do not resolve), noting each question."""

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return mapping.get(host, [])

    return resolve


def test_a_redirect_chain_of_two_is_followed_and_every_hop_is_resolved_and_pinned() -> None:
    asked: list[tuple[str, int]] = []

    async def scenario() -> None:
        async with serve(
            {
                "/old.xml": redirect("/moved/feed.xml", status=301),  # relative Location
                "/moved/feed.xml": redirect("../final/feed.xml?v=2", status=307),
                "/final/feed.xml": conditional_feed,
            }
        ) as srv:
            base = f"http://feeds.test:{srv.port}"
            result = await fetch(f"{base}/old.xml", resolver=names({"feeds.test": ["127.0.0.1"]}, asked))
        assert result.status == "ok"
        assert result.body == RSS
        # The name, not the address it was pinned to: the base for the feed's relative links.
        assert result.final_url == f"{base}/final/feed.xml?v=2"
        assert srv.paths() == ["/old.xml", "/moved/feed.xml", "/final/feed.xml?v=2"]
        assert asked == [("feeds.test", srv.port)] * 3
        assert {headers["Host"] for _, headers in srv.requests} == {f"feeds.test:{srv.port}"}
        parsed = parse_feed(result.body, base_url=result.final_url, content_type=result.content_type)
        assert parsed.articles[1].link == f"{base}/final/news/relative?id=7"

    asyncio.run(scenario())


def test_the_next_address_is_tried_when_one_refuses_the_connection() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed}) as srv:
            # 127.0.0.2 is loopback too, but nothing listens there on this port.
            dns = names({"feeds.test": ["127.0.0.2", "127.0.0.1"]}, [])
            result = await fetch(f"http://feeds.test:{srv.port}/feed.xml", resolver=dns)
        assert result.status == "ok" and srv.paths() == ["/feed.xml"]

    asyncio.run(scenario())


def test_a_redirect_loop_stops_after_max_redirects() -> None:
    async def scenario() -> None:
        async with serve({"/a.xml": redirect("/b.xml"), "/b.xml": redirect("/a.xml")}) as srv:
            with pytest.raises(FetchError, match=r"^too many redirects \(more than 3\)$"):
                await fetch(srv.url("/a.xml"), max_redirects=3)
        assert srv.paths() == ["/a.xml", "/b.xml", "/a.xml", "/b.xml"]

    asyncio.run(scenario())


def test_a_redirect_without_location_is_an_error() -> None:
    async def broken(state: Server, request: web.Request) -> web.StreamResponse:
        return web.Response(status=302)

    async def scenario() -> None:
        async with serve({"/feed.xml": broken}) as srv:
            with pytest.raises(FetchError, match=r"^HTTP 302 without a Location header$"):
                await fetch(srv.url())

    asyncio.run(scenario())


def redirect_to(location: str) -> Callable[[httpx.Request], httpx.Response]:
    return lambda _: httpx.Response(302, headers={"location": location})


def test_a_redirect_to_a_private_address_is_refused_before_it_is_contacted() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed}) as internal:
            for location, message in [
                (
                    "http://metadata.test/latest/meta-data/",
                    "refused: host 'metadata.test' resolves to 169.254.169.254, a link-local address",
                ),
                (
                    internal.url(),
                    "refused: host '127.0.0.1' resolves to 127.0.0.1, a loopback address",
                ),
            ]:
                internet = PublicInternet({PUBLIC_A: redirect_to(location)})
                dns = names({"feeds.example.test": [PUBLIC_A], "metadata.test": ["169.254.169.254"]}, [])
                async with httpx.AsyncClient(transport=internet) as client:
                    with pytest.raises(FetchError) as caught:
                        await fetch_feed(
                            client,
                            "http://feeds.example.test/feed.xml",
                            etag=None,
                            last_modified=None,
                            resolver=dns,
                        )
                assert str(caught.value) == message
                assert internet.seen == [(PUBLIC_A, "feeds.example.test")]  # the target was never requested
            assert internal.requests == []

    asyncio.run(scenario())


def test_the_ssrf_guard_refuses_loopback_and_allows_it_when_told() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed}) as srv:
            with pytest.raises(
                FetchError, match=r"^refused: host '127\.0\.0\.1' resolves to 127\.0\.0\.1, a loopback"
            ):
                await fetch(srv.url(), allow_private=False)
            assert srv.requests == []
            assert (await fetch(srv.url(), allow_private=True)).status == "ok"

    asyncio.run(scenario())


def test_a_host_that_does_not_resolve_is_an_error() -> None:
    with pytest.raises(FetchError) as caught:
        asyncio.run(fetch("http://nowhere.test/feed.xml", resolver=names({}, [])))
    assert str(caught.value) == "refused: host 'nowhere.test' does not resolve"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://ftp.example.com/feed.xml", "unsupported URL scheme 'ftp'; only http and https"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'; only http and https"),
        ("feed.xml", "unsupported URL scheme ''; only http and https"),
        ("http:///feed.xml", "URL has no host"),
        ("http://[::1/feed.xml", "invalid URL"),
    ],
)
def test_only_absolute_http_and_https_urls_are_fetched(url: str, message: str) -> None:
    with pytest.raises(FetchError) as caught:
        asyncio.run(fetch(url))
    assert str(caught.value) == message


def test_a_redirect_to_another_scheme_is_refused() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": redirect("file:///etc/passwd")}) as srv:
            with pytest.raises(FetchError, match=r"^unsupported URL scheme 'file'"):
                await fetch(srv.url())

    asyncio.run(scenario())


def test_a_refused_connection_is_a_fetch_error() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as caught:
        asyncio.run(fetch(f"http://127.0.0.1:{port}/feed.xml"))
    assert str(caught.value).startswith("ConnectError: ")
    assert len(str(caught.value)) <= 200


# ---------------------------------------------------------------- DNS rebinding

PUBLIC_A, PUBLIC_B = "93.184.215.14", "93.184.215.15"


class PublicInternet(httpx.AsyncBaseTransport):
    """The test's internet: requests to the public addresses above are answered here (nothing leaves
    the machine); anything else goes out through a real transport, names resolved by the system's
    resolver, as httpx would send it."""

    def __init__(self, sites: dict[str, Callable[[httpx.Request], httpx.Response]]) -> None:
        self.sites = sites
        self.seen: list[tuple[str, str]] = []  # (the host connected to, the Host header)
        self.real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.host, request.headers["host"]))
        site = self.sites.get(request.url.host)
        if site is not None:
            return site(request)
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


def rebinding_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str]) -> list[str]:
    """``getaddrinfo`` as a rebinding attacker's DNS serves it: each name in ``answers`` resolves
    to its public address the first time it is asked and to 127.0.0.1 every time after."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in answers:
            return real(host, port, *args, **kwargs)
        address = answers[name] if name not in asked else "127.0.0.1"
        asked.append(name)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 80)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_rebinding_name_never_reaches_loopback_on_any_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed, "/hop.xml": conditional_feed}) as internal:
            port = internal.port
            rebinding_dns(monkeypatch, {"feeds.attacker.test": PUBLIC_A, "hop.attacker.test": PUBLIC_B})
            # The public site redirects to a second rebinding name: that hop must be pinned too.
            internet = PublicInternet(
                {
                    PUBLIC_A: lambda _: httpx.Response(
                        302, headers={"location": f"http://hop.attacker.test:{port}/hop.xml"}
                    ),
                    PUBLIC_B: lambda _: httpx.Response(
                        200, content=RSS, headers={"content-type": "application/rss+xml"}
                    ),
                }
            )
            async with httpx.AsyncClient(
                transport=internet, follow_redirects=False, trust_env=False
            ) as client:
                result = await fetch_feed(
                    client,
                    f"http://feeds.attacker.test:{port}/feed.xml",
                    etag=None,
                    last_modified=None,
                    allow_private=False,
                    timeout_s=5,
                )
            assert internal.requests == [], "the rebinding name reached the loopback server"
            assert internet.seen == [
                (PUBLIC_A, f"feeds.attacker.test:{port}"),
                (PUBLIC_B, f"hop.attacker.test:{port}"),
            ]
            assert result.status == "ok" and result.body == RSS
            assert result.final_url == f"http://hop.attacker.test:{port}/hop.xml"

    asyncio.run(scenario())
