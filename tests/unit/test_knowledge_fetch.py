"""Fetching feeds against real local HTTP servers (aiohttp on 127.0.0.1, port 0).

Each test runs its server and the fetch inside one ``asyncio.run``. The limits are checked from the
server's side as well: how many bytes it managed to send, which requests and headers it saw.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from shared.knowledge.fetch import (
    USER_AGENT,
    FetchError,
    FetchResult,
    UrlCheck,
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
    check_url: UrlCheck | None = None,
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
            check_url=check_url,
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


def test_a_redirect_chain_of_two_is_followed_and_every_hop_is_checked() -> None:
    checked: list[str] = []

    async def scenario() -> None:
        async with serve(
            {
                "/old.xml": redirect("/moved/feed.xml", status=301),  # relative Location
                "/moved/feed.xml": redirect("../final/feed.xml?v=2", status=307),
                "/final/feed.xml": conditional_feed,
            }
        ) as srv:
            result = await fetch(srv.url("/old.xml"), check_url=checked.append)
        assert result.status == "ok"
        assert result.body == RSS
        assert result.final_url == srv.url("/final/feed.xml?v=2")
        assert srv.paths() == ["/old.xml", "/moved/feed.xml", "/final/feed.xml?v=2"]
        assert checked == [srv.url("/old.xml"), srv.url("/moved/feed.xml"), srv.url("/final/feed.xml?v=2")]
        # The final URL is the base for the feed's relative links.
        parsed = parse_feed(result.body, base_url=result.final_url, content_type=result.content_type)
        assert parsed.articles[1].link == srv.url("/final/news/relative?id=7")

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


def test_check_url_can_refuse_a_redirect_target_before_it_is_contacted() -> None:
    checked: list[str] = []

    def guard(url: str) -> None:
        checked.append(url)
        if "/internal/" in url:
            raise ssrf.UnsafeURL("host 'metadata' resolves to 169.254.169.254, a link-local address")

    async def scenario() -> None:
        async with serve({"/feed.xml": redirect("/internal/secrets.xml")}) as srv:
            with pytest.raises(FetchError) as caught:
                await fetch(srv.url(), check_url=guard)
        assert (
            str(caught.value) == "refused: host 'metadata' resolves to 169.254.169.254, a link-local address"
        )
        assert srv.paths() == ["/feed.xml"]  # the refused target was never requested
        assert checked == [srv.url(), srv.url("/internal/secrets.xml")]

    asyncio.run(scenario())


def test_the_production_ssrf_guard_refuses_loopback_and_allows_it_when_told() -> None:
    async def scenario() -> None:
        async with serve({"/feed.xml": conditional_feed}) as srv:
            strict = functools.partial(ssrf.check_url, allow_private=False)
            with pytest.raises(
                FetchError, match=r"^refused: host '127\.0\.0\.1' resolves to 127\.0\.0\.1, a loopback"
            ):
                await fetch(srv.url(), check_url=strict)
            assert srv.requests == []
            lenient = functools.partial(ssrf.check_url, allow_private=True)
            assert (await fetch(srv.url(), check_url=lenient)).status == "ok"

    asyncio.run(scenario())


def test_an_async_check_url_is_awaited() -> None:
    checked: list[str] = []

    async def guard(url: str) -> None:
        await asyncio.sleep(0)
        checked.append(url)
        if url.endswith("/b.xml"):
            raise ssrf.UnsafeURL("host 'b' is not allowed")

    async def scenario() -> None:
        async with serve({"/a.xml": redirect("/b.xml")}) as srv:
            with pytest.raises(FetchError, match=r"^refused: host 'b' is not allowed$"):
                await fetch(srv.url("/a.xml"), check_url=guard)
        assert checked == [srv.url("/a.xml"), srv.url("/b.xml")]

    asyncio.run(scenario())


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
