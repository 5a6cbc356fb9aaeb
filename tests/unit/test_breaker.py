"""Circuit breaker state machine on fakeredis (Lua included): two breakers on one key stand for
two worker processes sharing one circuit."""

from __future__ import annotations

import asyncio
import time

import fakeredis

from shared.providers.breaker import BreakerConfig, CircuitBreaker

FAST = BreakerConfig(failure_threshold=3, failure_ratio=0.5, min_calls=10, cooldown_s=0.2, refresh_s=0.0)


def pair(config: BreakerConfig = FAST) -> tuple[CircuitBreaker, CircuitBreaker]:
    server = fakeredis.FakeServer()
    a = CircuitBreaker(fakeredis.FakeAsyncRedis(server=server), "ns:breaker:p", config)
    b = CircuitBreaker(fakeredis.FakeAsyncRedis(server=server), "ns:breaker:p", config)
    return a, b


async def until_half_open(breaker: CircuitBreaker, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (await breaker.state())[0] != "half_open":
        assert time.monotonic() < deadline, "circuit never half-opened"
        await asyncio.sleep(0.02)


def test_consecutive_health_failures_open_the_circuit_for_every_process() -> None:
    async def scenario() -> None:
        a, b = pair()
        for _ in range(2):
            await a.record(False, "server")
        assert (await b.acquire())[0] is True
        await a.record(False, "timeout")
        allowed, probe, wait = await b.acquire()
        assert allowed is False and probe is False and 0 < wait <= 0.2

    asyncio.run(scenario())


def test_request_errors_and_rate_limits_do_not_count() -> None:
    async def scenario() -> None:
        a, b = pair()
        for category in ["invalid_request", "rate_limited", "content_filter"] * 3:
            await a.record(False, category)
        assert (await b.state())[0] == "closed"

    asyncio.run(scenario())


def test_failure_ratio_opens_even_without_a_long_streak() -> None:
    async def scenario() -> None:
        a, _ = pair(BreakerConfig(failure_threshold=100, failure_ratio=0.5, min_calls=10, refresh_s=0.0))
        for _ in range(6):
            await a.record(False, "server")
            await a.record(True, None)
            a._last_flush = 0  # flush each success now instead of once a second
        assert (await a.state())[0] == "open"

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


def test_a_success_resets_the_streak() -> None:
    async def scenario() -> None:
        a, b = pair()
        await a.record(False, "server")
        await a.record(False, "server")
        await b.state()  # b learns of the streak ...
        await b.record(True, None)  # ... so its next success is reported at once and breaks it
        await a.record(False, "server")
        await a.record(False, "server")
        assert (await b.state())[0] == "closed"

    asyncio.run(scenario())
