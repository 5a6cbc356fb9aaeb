"""``Retry-After`` as RFC 9110 allows it: delay-seconds or an HTTP date, from every wire format.

The providers are driven over ``httpx.MockTransport``: a 429 or 503 whose ``Retry-After`` is a
date must reach the runner as a wait hint, not be dropped in favour of our own backoff.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from datetime import UTC, datetime

import httpx
import pytest

from shared.providers import errors
from shared.providers.anthropic import AnthropicProvider
from shared.providers.base import ChatRequest, Provider
from shared.providers.config import ProviderConfig
from shared.providers.gemini import GeminiProvider
from shared.providers.openai import OpenAIProvider
from shared.retry_after import parse_retry_after

REQUEST = ChatRequest(model="m", messages=({"role": "user", "content": "Hi"},), max_tokens=16)
PROVIDERS: list[tuple[type[Provider], ProviderConfig]] = [
    (OpenAIProvider, ProviderConfig(name="openai", api="openai", base_url="https://openai.test/v1")),
    (AnthropicProvider, ProviderConfig(name="anthropic", api="anthropic", base_url="https://anthropic.test")),
    (GeminiProvider, ProviderConfig(name="google", api="gemini", base_url="https://gemini.test")),
]
IDS = [config.api for _, config in PROVIDERS]


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


def failure(
    provider: tuple[type[Provider], ProviderConfig], status: int, retry_after: str
) -> errors.ProviderError:
    cls, config = provider

    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"retry-after": retry_after}, json={})

    async def call() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            await cls(config, "key-test").complete(client, REQUEST)

    with pytest.raises(errors.ProviderError) as caught:
        asyncio.run(call())
    return caught.value


@pytest.mark.parametrize("provider", PROVIDERS, ids=IDS)
def test_an_http_date_retry_after_on_a_429_is_the_wait_hint(
    provider: tuple[type[Provider], ProviderConfig],
) -> None:
    exc = failure(provider, 429, http_date(40))
    assert isinstance(exc, errors.RateLimited)
    # The date is whole seconds and time passes on a busy machine: the hint can only have shrunk.
    assert exc.retry_after is not None and 30 < exc.retry_after <= 40


@pytest.mark.parametrize("provider", PROVIDERS, ids=IDS)
def test_an_http_date_retry_after_on_a_503_is_the_wait_hint(
    provider: tuple[type[Provider], ProviderConfig],
) -> None:
    exc = failure(provider, 503, http_date(25))
    assert isinstance(exc, errors.Overloaded)
    assert exc.retry_after is not None and 15 < exc.retry_after <= 25


@pytest.mark.parametrize("provider", PROVIDERS, ids=IDS)
def test_a_past_http_date_means_retry_now_and_garbage_means_no_hint(
    provider: tuple[type[Provider], ProviderConfig],
) -> None:
    assert failure(provider, 429, http_date(-3600)).retry_after == 0.0
    assert failure(provider, 429, "soon, maybe").retry_after is None


NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        (" 2.5 ", 2.5),
        ("-3", None),
        ("Tue, 01 Dec 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Tuesday, 01-Dec-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Tue Dec  1 12:00:10 2026", 10.0),  # obsolete asctime form (no zone: GMT)
        ("Tue, 01 Dec 2026 11:00:00 GMT", 0.0),  # in the past
        ("Tue, 01 Dec 2026 25:00:00 GMT", None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected
