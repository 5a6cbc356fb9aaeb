"""What the runner reads from the shared breakers for routing and for circuit waits, on
fakeredis (Lua included): which members are healthy, how long the circuits that refused a
query's calls still rest."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import httpx
import pytest

from shared.ledger import CallRecord
from shared.providers.config import parse_catalog
from shared.providers.registry import build_providers
from workers.runner import Runner

COOLDOWN_S = 0.3


def make_runner() -> Runner:
    providers = {
        name: {
            "api": "openai",
            "base_url": f"https://{name}.test/v1",
            "breaker_failures": 2,
            "breaker_cooldown_s": COOLDOWN_S,
        }
        for name in ("p1", "p2")
    }
    catalog = parse_catalog(
        {"providers": providers, "council": {"members": ["p1:alpha", "p2:beta"], "chairman": "p1:chair"}}
    )
    return Runner(
        catalog, build_providers(catalog), httpx.AsyncClient(), redis_client=fakeredis.FakeAsyncRedis()
    )


def refused(model: str) -> CallRecord:
    return CallRecord(model, "answer", 1, "failed", "circuit_open", 0, 0, 0, 0.0, 0)


async def until_half_open(runner: Runner, provider: str, timeout: float = 3.0) -> None:
    breaker = runner.guards[provider].breaker
    assert breaker is not None
    deadline = time.monotonic() + timeout
    while (await breaker.state())[0] != "half_open":
        assert time.monotonic() < deadline, "circuit never half-opened"
        await asyncio.sleep(0.02)


async def open_circuit(runner: Runner, provider: str) -> None:
    breaker = runner.guards[provider].breaker
    assert breaker is not None
    for _ in range(2):
        await breaker.record(False, "network")


def test_members_behind_an_open_circuit_are_not_healthy() -> None:
    async def scenario() -> None:
        runner = make_runner()
        assert await runner.healthy(["p1:alpha", "p2:beta"]) == {"p1:alpha", "p2:beta"}
        await open_circuit(runner, "p2")
        assert await runner.healthy(["p1:alpha", "p2:beta"]) == {"p1:alpha"}
        # Half-open lets one probe through, not a query's worth of calls.
        await until_half_open(runner, "p2")
        assert await runner.healthy(["p1:alpha", "p2:beta"]) == {"p1:alpha"}

    asyncio.run(scenario())


def test_a_refused_query_waits_for_what_is_left_of_the_cooldown() -> None:
    async def scenario() -> None:
        runner = make_runner()
        calls = [refused("p2:beta")]
        assert await runner.circuit_cooldown_s(calls) == 0.0  # closed again: no need to wait
        await open_circuit(runner, "p2")
        opened = time.monotonic()
        rest = await runner.circuit_cooldown_s(calls)
        assert 0 < rest <= COOLDOWN_S - (time.monotonic() - opened) + 0.01
        assert await runner.circuit_cooldown_s([refused("p1:alpha")]) == 0.0
        await until_half_open(runner, "p2")
        # Half-open: a probe is deciding; come back after a base cooldown.
        assert await runner.circuit_cooldown_s(calls) == pytest.approx(COOLDOWN_S)

    asyncio.run(scenario())
