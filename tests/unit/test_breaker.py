"""Circuit breaker state machine on fakeredis (Lua included): two breakers on one key stand for
two worker processes sharing one circuit."""

from __future__ import annotations

import asyncio
import time

import fakeredis

from shared.providers.breaker import BreakerConfig, CircuitBreaker

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
