"""Circuit breaker state machine on fakeredis (Lua included): two breakers on one key stand for
two worker processes sharing one circuit."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import fakeredis
import httpx
import pytest

from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult, Provider
from shared.providers.breaker import BreakerConfig, CircuitBreaker
from shared.providers.config import ProviderConfig
from shared.providers.guard import ProviderGuard

FAST = BreakerConfig(
    min_failures=3, failure_ratio=0.5, window_s=10, cooldown_s=0.2, refresh_s=0.0, flush_s=0.0
)


def pair(config: BreakerConfig = FAST) -> tuple[CircuitBreaker, CircuitBreaker]:
    server = fakeredis.FakeServer()
    a = CircuitBreaker(fakeredis.FakeAsyncRedis(server=server), "ns:breaker:p", config)
    b = CircuitBreaker(fakeredis.FakeAsyncRedis(server=server), "ns:breaker:p", config)
    return a, b


async def call(breaker: CircuitBreaker, ok: bool, category: str | None = None) -> None:
    """One call as the guard makes it: admitted, then its outcome reported."""
    allowed, probe, _ = await breaker.acquire()
    assert allowed and not probe
    await breaker.record(ok, category)


async def until_half_open(breaker: CircuitBreaker, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (await breaker.state())[0] != "half_open":
        assert time.monotonic() < deadline, "circuit never half-opened"
        await asyncio.sleep(0.02)


def test_a_dead_provider_opens_the_circuit_for_every_process_after_min_failures() -> None:
    async def scenario() -> None:
        a, b = pair()
        for _ in range(2):
            await a.record(False, "network")
        assert (await b.acquire())[0] is True
        await b.record(False, "network")
        allowed, probe, wait = await a.acquire()
        assert allowed is False and probe is False and 0 < wait <= 0.2

    asyncio.run(scenario())


def test_a_noisy_provider_stays_closed_even_with_bursts_of_failures() -> None:
    async def scenario() -> None:
        a, b = pair(BreakerConfig(min_failures=5, failure_ratio=0.5, refresh_s=0.0, flush_s=0.0))
        # 30% failures, with the failures arriving in bursts of five (timeouts of calls started together).
        for _ in range(10):
            for _ in range(12):
                await call(a, True)
            for _ in range(5):
                await call(b, False, "timeout")
        assert (await a.state())[0] == "closed"

    asyncio.run(scenario())


def test_request_errors_and_rate_limits_do_not_count() -> None:
    async def scenario() -> None:
        a, b = pair()
        for category in ["invalid_request", "rate_limited", "content_filter"] * 5:
            await a.record(False, category)
        assert (await b.state())[0] == "closed"

    asyncio.run(scenario())


def test_started_calls_reported_with_a_failure_count_against_the_ratio() -> None:
    async def scenario() -> None:
        a, _ = pair(BreakerConfig(min_failures=3, failure_ratio=0.5, refresh_s=0.0, flush_s=3600))
        for _ in range(20):
            await call(a, True)  # starts held locally (flush_s is long) ...
        for _ in range(4):
            await call(a, False, "server")  # ... and sent with the first failure
        assert (await a.state())[0] == "closed"

    asyncio.run(scenario())


def test_fast_failures_at_the_start_of_a_burst_do_not_open_a_mostly_healthy_circuit() -> None:
    async def scenario() -> None:
        a, b = pair(BreakerConfig(min_failures=10, failure_ratio=0.5, refresh_s=0.0, flush_s=3600))
        # 200 calls start together; the 20% that fail come back before any answer does.
        for breaker in (a, b):
            for _ in range(100):
                assert (await breaker.acquire())[0]
        for breaker in (a, b):
            for _ in range(20):
                await breaker.record(False, "server")
        assert (await a.state())[0] == "closed"

    asyncio.run(scenario())


def test_a_provider_failing_every_started_call_opens_the_circuit() -> None:
    async def scenario() -> None:
        a, b = pair(BreakerConfig(min_failures=10, failure_ratio=0.5, refresh_s=0.0, flush_s=3600))
        for _ in range(40):  # started together, all time out together
            assert (await a.acquire())[0]
        for _ in range(19):
            await a.record(False, "timeout")
        assert (await b.state())[0] == "closed"  # 19 of 40 started: could still be a bad patch
        await a.record(False, "timeout")
        assert (await b.state())[0] == "open"  # half of what was started failed

    asyncio.run(scenario())


def test_half_open_allows_one_probe_cluster_wide_and_success_closes() -> None:
    async def scenario() -> None:
        a, b = pair()
        for _ in range(3):
            await a.record(False, "network")
        await until_half_open(b)
        first, second = await a.acquire(), await b.acquire()
        assert first == (True, True, 0.0)
        assert second[0] is False  # someone else is probing
        await a.record(True, None, probe=True)
        assert (await b.state())[0] == "closed"
        assert (await b.acquire())[0] is True
        # Closing forgets the failures that opened it.
        await b.record(False, "network")
        assert (await a.state())[0] == "closed"

    asyncio.run(scenario())


def test_failed_probe_reopens_with_a_longer_cooldown() -> None:
    async def scenario() -> None:
        a, b = pair()
        for _ in range(3):
            await a.record(False, "overloaded")
        await until_half_open(a)
        allowed, probe, _ = await a.acquire()
        assert allowed and probe
        await a.record(False, "server", probe=True)
        state, wait = await b.state()
        assert state == "open" and 0.2 < wait <= 0.4

    asyncio.run(scenario())


def test_without_redis_calls_still_flow() -> None:
    async def scenario() -> None:
        import redis.asyncio as aioredis

        down = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
        breaker = CircuitBreaker(down, "ns:breaker:p", FAST)
        for _ in range(5):
            await breaker.record(False, "server")
        assert (await breaker.acquire())[0] is True
        await down.aclose()

    asyncio.run(scenario())


def test_a_probe_answered_with_a_rate_limit_or_a_refusal_closes_the_circuit() -> None:
    # The provider answered: it is alive. A 429 says "slower", not "down"; reopening (and doubling
    # the cooldown) would keep a recovered provider's queries waiting for nothing.
    async def scenario() -> None:
        for category in ("rate_limited", "invalid_request", "content_filter"):
            a, b = pair()
            for _ in range(3):
                await a.record(False, "network")
            await until_half_open(a)
            assert (await a.acquire())[:2] == (True, True)
            await a.record(False, category, probe=True)
            assert (await b.state())[0] == "closed", category
            assert (await b.acquire())[:2] == (True, False), category

    asyncio.run(scenario())


class _NeverCalled(Provider):
    def build(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        raise AssertionError("a call refused by the rate limiter must not reach the provider")

    def parse(self, body: Any) -> ChatResult:
        raise AssertionError("unreachable")

    def map_error(self, response: httpx.Response, body: Any) -> errors.ProviderError:
        raise AssertionError("unreachable")


def test_a_probe_whose_rate_limiter_wait_timed_out_frees_the_probe_slot() -> None:
    async def scenario() -> None:
        server = fakeredis.FakeServer()
        config = ProviderConfig(name="p", api="openai", base_url="http://p.test", rpm=1)
        guard = ProviderGuard(
            _NeverCalled(config, None),
            redis_client=fakeredis.FakeAsyncRedis(server=server),
            namespace="ns",
            breaker=FAST,
        )
        other = CircuitBreaker(fakeredis.FakeAsyncRedis(server=server), "ns:breaker:p", FAST)
        assert guard.breaker is not None and guard.limiter is not None
        guard.limiter.max_wait_s = 0.5
        await guard.limiter.acquire(1)  # rpm 1: the next call would wait a minute
        for _ in range(3):
            await other.record(False, "network")
        await until_half_open(other)
        request = ChatRequest(model="m", messages=({"role": "user", "content": "hi"},))
        async with httpx.AsyncClient() as client:
            with pytest.raises(errors.RateLimited):
                await guard.call(client, request)
        # No call was made, so nothing was learnt: the circuit stays half-open and the next
        # caller (in any process) may probe at once, not after the probe slot's 60 s timeout.
        assert (await other.state())[0] == "half_open"
        assert await other.acquire() == (True, True, 0.0)

    asyncio.run(scenario())
