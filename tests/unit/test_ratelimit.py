"""GCRA limiter on fakeredis: the burst, the sustained rate, waiting instead of failing,
all-or-nothing charging of rpm and tpm, and settling tokens afterwards."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest

from shared.providers import ratelimit
from shared.providers.ratelimit import Limit, RateLimiter, RateLimitTimeout, estimate_tokens


def limiter(rpm: int | None = None, tpm: int | None = None, max_wait_s: float = 5.0) -> RateLimiter:
    return RateLimiter(fakeredis.FakeAsyncRedis(), "ns:rl:p", rpm=rpm, tpm=tpm, max_wait_s=max_wait_s)


def test_limit_never_allows_more_than_the_minute_in_any_window() -> None:
    for per_minute in (2, 20, 600, 10_000):
        limit = Limit(per_minute)
        # At most `burst` at once, then one per emission interval: burst + 60 s of emissions.
        assert limit.burst + 60_000 / limit.emission_ms <= per_minute + 1e-9
    assert Limit(600).burst == 30


def test_burst_goes_at_once_then_calls_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_sleep(seconds)

    monkeypatch.setattr(ratelimit.asyncio, "sleep", recorded_sleep)

    async def scenario() -> None:
        rl = limiter(rpm=1200)  # burst 60, then one per 52.6 ms
        started = time.monotonic()
        for _ in range(60):
            await rl.acquire(10)
        assert slept == []  # a full bucket: the burst never waits, however slow the machine
        for _ in range(3):
            await rl.acquire(10)
        # 63 calls from a full bucket take at least three emission intervals, however long the
        # first 60 took (measured from the first: a slow machine earns the bucket time back).
        assert time.monotonic() - started >= 3 * Limit(1200).emission_ms / 1000 - 0.01

    asyncio.run(scenario())


def test_waiting_longer_than_allowed_raises() -> None:
    async def scenario() -> None:
        rl = limiter(rpm=20, max_wait_s=0.5)  # burst 1, then one per 3.16 s
        await rl.acquire(1)
        with pytest.raises(RateLimitTimeout):
            await rl.acquire(1)

    asyncio.run(scenario())


def test_tpm_charges_tokens_and_settles_to_real_usage() -> None:
    async def scenario() -> None:
        rl = limiter(tpm=60_000)  # burst 3,000 tokens
        assert await rl.acquire(3000) < 0.05
        before = float(await rl.client.get(rl.tpm_key) or 0)
        await rl.settle(estimated=3000, actual=1000)  # refund 2,000 tokens
        after = float(await rl.client.get(rl.tpm_key) or 0)
        assert after < before
        assert await rl.acquire(1500) < 0.05  # the refund made room

    asyncio.run(scenario())


def test_rpm_and_tpm_are_charged_together_or_not_at_all() -> None:
    async def scenario() -> None:
        rl = limiter(rpm=1200, tpm=2000, max_wait_s=0.2)  # tpm burst is 100 tokens
        await rl.acquire(100)
        rpm_tat = await rl.client.get(rl.rpm_key)
        with pytest.raises(RateLimitTimeout):
            await rl.acquire(100)
        assert await rl.client.get(rl.rpm_key) == rpm_tat  # the refused call charged nothing

    asyncio.run(scenario())


def test_estimate_counts_prompt_and_output() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens(messages, 100) == 100 + 4 + 100
    assert estimate_tokens(messages, None) == 104 + 512
