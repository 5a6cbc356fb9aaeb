"""One delivery attempt against real local HTTP servers (tests/receivers.py: 127.0.0.1, port 0).

Loopback is private, so these tests pass ``allow_private=True`` except where the refusal is the point.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from shared.providers.http import make_client
from shared.webhooks.delivery import AttemptResult, attempt_delivery, make_delivery_client, parse_retry_after
from shared.webhooks.signing import webhook_headers
from shared.webhooks.ssrf import AsyncResolver, check_url, resolve_async
from tests.receivers import Answer, Answering, Received, WebhookReceiver

PUBLIC_V4 = "93.184.215.14"
SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
BODY = orjson.dumps({"type": "batch.completed", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "b_1"}})


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Answering:
    def respond(request: Received) -> Answer:
        return Answer(code, headers or {}, body)

    return respond


def signed() -> dict[str, str]:
    return webhook_headers([SECRET], "msg_test", int(time.time()), BODY)


async def deliver(
    url: str,
    *,
    allow_private: bool = True,
    timeout_s: float = 15.0,
    resolver: AsyncResolver = resolve_async,
) -> AttemptResult:
    async with make_delivery_client() as client:
        return await attempt_delivery(
            client, url, signed(), BODY, allow_private=allow_private, timeout_s=timeout_s, resolver=resolver
        )


def test_2xx_is_delivered_with_the_exact_body_and_verifiable_headers() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(204)) as srv:
            result = await deliver(srv.at("/hooks/conclave?tenant=t1"))
            assert result == AttemptResult("delivered", 204, None, None, "127.0.0.1")
            [got] = srv.requests
            assert got.path == "/hooks/conclave"
            assert got.body == BODY
            headers = {k.lower(): v for k, v in got.headers.items()}
            assert headers["content-type"] == "application/json"
            assert headers["user-agent"] == "Conclave-Webhooks/1.0"
            assert headers["webhook-id"] == "msg_test"
            assert Webhook(SECRET).verify(got.body, got.headers) == orjson.loads(BODY)

    asyncio.run(scenario())


def test_500_is_retried_with_its_status_and_without_the_response_body() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(500, body=b"stack trace with internal-detail")) as srv:
            result = await deliver(srv.at())
        assert (result.outcome, result.status_code, result.error) == ("retry", 500, "HTTP 500")
        assert result.retry_after is None

    asyncio.run(scenario())


def test_410_means_the_endpoint_is_gone() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(410)) as srv:
            result = await deliver(srv.at())
        assert (result.outcome, result.status_code) == ("gone", 410)

    asyncio.run(scenario())


def test_429_honours_retry_after_in_seconds() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(429, {"Retry-After": "7"})) as srv:
            result = await deliver(srv.at())
        assert (result.outcome, result.status_code, result.retry_after) == ("retry", 429, 7.0)

    asyncio.run(scenario())


def test_503_honours_retry_after_as_an_http_date() -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)

    async def scenario() -> None:
        with WebhookReceiver(status(503, {"Retry-After": when})) as srv:
            result = await deliver(srv.at())
        assert (result.outcome, result.status_code) == ("retry", 503)
        assert result.retry_after is not None and 100 < result.retry_after <= 121

    asyncio.run(scenario())


def test_a_redirect_is_not_followed_and_is_retried() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(302, {"Location": "/elsewhere"})) as srv:
            result = await deliver(srv.at())
            assert [r.path for r in srv.requests] == ["/hook"]
        assert (result.outcome, result.status_code) == ("retry", 302)
        assert result.error is not None and "redirect" in result.error

    asyncio.run(scenario())


def test_a_hung_receiver_is_retried_after_the_timeout() -> None:
    def hang(request: Received) -> None:
        return None  # no answer until the receiver closes

    async def scenario() -> None:
        with WebhookReceiver(hang) as srv:
            started = time.monotonic()
            result = await deliver(srv.at(), timeout_s=0.3)
            elapsed = time.monotonic() - started
        assert result.outcome == "retry" and result.status_code is None
        assert result.error is not None and result.error.startswith("TimeoutError")
        assert 0.25 < elapsed < 2.0

    asyncio.run(scenario())


def test_a_refused_connection_is_retried() -> None:
    # Bound but not listening: connecting is refused, and no other process can take the port meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = asyncio.run(deliver(f"http://127.0.0.1:{port}/hook"))
    assert result.outcome == "retry" and result.status_code is None
    assert result.error is not None and result.error.startswith("ConnectError")
    assert result.address == "127.0.0.1"


def test_the_next_address_is_tried_only_when_connecting_fails() -> None:
    async def resolver(host: str, port: int) -> Sequence[str]:
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on 127.0.0.2

    async def scenario() -> None:
        with WebhookReceiver(status(200)) as srv:
            result = await deliver(srv.at(host="multi.example.test"), resolver=resolver)
            assert len(srv.requests) == 1
        assert (result.outcome, result.address) == ("delivered", "127.0.0.1")

    asyncio.run(scenario())


def test_a_large_response_body_is_not_read_in_full() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(200, body=b"x" * (4 * 1024 * 1024))) as srv:
            result = await deliver(srv.at())
        assert result.outcome == "delivered"

    asyncio.run(scenario())


def test_loopback_is_refused_without_connecting_when_private_is_not_allowed() -> None:
    async def scenario() -> None:
        with WebhookReceiver(status(200)) as srv:
            result = await deliver(srv.at(), allow_private=False)
            assert srv.requests == []
        assert (result.outcome, result.status_code, result.address) == ("refused", None, "127.0.0.1")
        assert result.error is not None and "loopback" in result.error

    asyncio.run(scenario())


class Rebinding:
    """DNS that answers a public address first and loopback afterwards (a rebinding attacker)."""

    def __init__(self) -> None:
        self.calls = 0

    def answer(self) -> list[str]:
        self.calls += 1
        return [PUBLIC_V4] if self.calls == 1 else ["127.0.0.1"]

    def __call__(self, host: str, port: int) -> Sequence[str]:
        return self.answer()

    async def resolve_async(self, host: str, port: int) -> Sequence[str]:
        return self.answer()


def test_dns_rebinding_after_registration_is_refused_at_delivery() -> None:
    dns = Rebinding()

    async def scenario() -> None:
        with WebhookReceiver(status(200)) as srv:
            url = srv.at(host="rebind.example.test")
            assert check_url(url, allow_private=False, resolver=dns) == [PUBLIC_V4]
            result = await deliver(url, allow_private=False, resolver=dns.resolve_async)
            assert srv.requests == []
        assert result.outcome == "refused" and result.address == "127.0.0.1"

    asyncio.run(scenario())


@pytest.mark.parametrize("client_kind", ["delivery", "providers-aiohttp"])
def test_the_request_goes_to_the_resolved_address_with_the_original_host_header(client_kind: str) -> None:
    async def resolver(host: str, port: int) -> Sequence[str]:
        assert host == "hooks.example.test"
        return ["127.0.0.1"]

    async def scenario() -> None:
        with WebhookReceiver(status(200)) as srv:
            client = make_delivery_client() if client_kind == "delivery" else make_client()
            async with client:
                result = await attempt_delivery(
                    client,
                    srv.at(host="hooks.example.test"),
                    signed(),
                    BODY,
                    allow_private=True,
                    resolver=resolver,
                )
            assert result.outcome == "delivered"
            [got] = srv.requests
            assert got.headers["host"] == f"hooks.example.test:{srv.port}"
            Webhook(SECRET).verify(got.body, got.headers)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("resolved", "url", "expected_url", "expected_host"),
    [
        (PUBLIC_V4, "https://hooks.example.com/h?a=1", f"https://{PUBLIC_V4}/h?a=1", "hooks.example.com"),
        (
            "2606:4700:4700::1111",
            "https://hooks.example.com:8443/h",
            "https://[2606:4700:4700::1111]:8443/h",
            "hooks.example.com:8443",
        ),
    ],
)
def test_https_is_pinned_to_the_checked_address_with_sni_for_the_name(
    resolved: str, url: str, expected_url: str, expected_host: str
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    async def resolver(host: str, port: int) -> Sequence[str]:
        return [resolved]

    async def scenario() -> AttemptResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await attempt_delivery(client, url, signed(), BODY, allow_private=False, resolver=resolver)

    result = asyncio.run(scenario())
    assert (result.outcome, result.address) == ("delivered", resolved)
    [request] = seen
    assert str(request.url) == expected_url
    assert request.headers["host"] == expected_host
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.content == BODY


def test_an_unsafe_url_is_refused_and_an_unresolvable_host_is_retried() -> None:
    def must_not_send(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be sent")

    async def nothing(host: str, port: int) -> Sequence[str]:
        return []

    async def scenario() -> tuple[AttemptResult, AttemptResult]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(must_not_send)) as client:
            bad = await attempt_delivery(client, "ftp://example.com/", {}, BODY, allow_private=True)
            gone = await attempt_delivery(
                client, "https://gone.example.com/", {}, BODY, allow_private=True, resolver=nothing
            )
            return bad, gone

    bad, unresolved = asyncio.run(scenario())
    assert bad.outcome == "refused" and bad.error is not None and "scheme" in bad.error
    assert unresolved.outcome == "retry" and unresolved.error is not None
    assert "does not resolve" in unresolved.error


def test_a_hung_resolver_counts_against_the_timeout() -> None:
    async def slow(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(30)
        return [PUBLIC_V4]

    async def scenario() -> AttemptResult:
        async with make_delivery_client() as client:
            return await attempt_delivery(
                client,
                "https://slow.example.com/",
                {},
                BODY,
                allow_private=False,
                timeout_s=0.2,
                resolver=slow,
            )

    result = asyncio.run(scenario())
    assert result.outcome == "retry" and result.error is not None and "TimeoutError" in result.error


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", None),
        ("soon", None),
        ("", None),
        ("99999999999999999999", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: now, never negative
        ("Thu, 01 Jan 2026 00:01:00 GMT", 60.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
