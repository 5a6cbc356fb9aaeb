"""The exact cache's protocol (shared/cache.py) on fakeredis: keys, hits, in-flight waiting,
invalidation. The real system's behaviour is in tests/integration/test_cache.py."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from fakeredis import aioredis as fake_aioredis

from shared.cache import Claim, Entry, ExactCache, digest, invalidate

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def cache(server: fakeredis.FakeServer, lock_ttl_s: float = 5.0) -> ExactCache:
    return ExactCache(fake_aioredis.FakeRedis(server=server), "t", ttl_s=60, lock_ttl_s=lock_ttl_s)


def acquire(c: ExactCache, tenant: str = "tenant_a", model: str = "sim:alpha") -> Entry | Claim | None:
    return asyncio.run(c.acquire(tenant, model, MESSAGES, None, None))


def test_the_digest_covers_tenant_model_messages_and_parameters_not_key_order() -> None:
    base = digest("tenant_a", "sim:alpha", MESSAGES, 100, 0.5)
    assert base == digest("tenant_a", "sim:alpha", [{"content": "What is 2 + 2?", "role": "user"}], 100, 0.5)
    others = {
        digest("tenant_b", "sim:alpha", MESSAGES, 100, 0.5),
        digest("tenant_a", "sim:beta", MESSAGES, 100, 0.5),
        digest("tenant_a", "sim:alpha", [{"role": "user", "content": "What is 2 + 3?"}], 100, 0.5),
        digest("tenant_a", "sim:alpha", MESSAGES, 101, 0.5),
        digest("tenant_a", "sim:alpha", MESSAGES, 100, None),
    }
    assert base not in others and len(others) == 5


def test_a_stored_answer_answers_the_same_call_of_the_same_tenant_only(server: fakeredis.FakeServer) -> None:
    c = cache(server)
    claim = acquire(c)
    assert isinstance(claim, Claim) and claim.token
    asyncio.run(c.store(claim, Entry("4", 12, 3)))
    assert acquire(c) == Entry("4", 12, 3)
    assert isinstance(acquire(c, tenant="tenant_b"), Claim)
    assert isinstance(acquire(c, model="sim:beta"), Claim)


def test_a_call_in_flight_holds_back_identical_calls_until_it_answers(server: fakeredis.FakeServer) -> None:
    async def scenario() -> list[Entry | Claim | None]:
        c = cache(server)
        holder = await c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None)
        assert isinstance(holder, Claim)
        waiters = [
            asyncio.create_task(c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None)) for _ in range(3)
        ]
        await asyncio.sleep(0.2)
        assert not any(w.done() for w in waiters)
        await c.store(holder, Entry("4", 12, 3))
        return list(await asyncio.gather(*waiters))

    assert asyncio.run(scenario()) == [Entry("4", 12, 3)] * 3


def test_a_failed_holder_hands_the_call_to_one_waiter(server: fakeredis.FakeServer) -> None:
    async def scenario() -> Entry | Claim | None:
        c = cache(server)
        holder = await c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None)
        assert isinstance(holder, Claim)
        waiters = [
            asyncio.create_task(c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None)) for _ in range(2)
        ]
        await asyncio.sleep(0.1)
        await c.release(holder)  # its call failed: nothing stored
        done, pending = await asyncio.wait(waiters, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1  # one takes the call over, the other waits on it
        taken = done.pop().result()
        assert isinstance(taken, Claim) and taken.token
        await c.store(taken, Entry("4", 12, 3))
        return await asyncio.wait_for(pending.pop(), 2)

    assert asyncio.run(scenario()) == Entry("4", 12, 3)


def test_a_dead_holder_lets_the_waiters_call_after_its_lock_expires(server: fakeredis.FakeServer) -> None:
    async def scenario() -> Entry | Claim | None:
        c = cache(server, lock_ttl_s=0.3)
        assert isinstance(await c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None), Claim)
        return await asyncio.wait_for(c.acquire("tenant_a", "sim:alpha", MESSAGES, None, None), 2)

    found = asyncio.run(scenario())
    assert isinstance(found, Claim) and found.token  # it took over the expired lock


def test_invalidation_by_model_or_tenant_makes_old_answers_unreachable(server: fakeredis.FakeServer) -> None:
    c = cache(server)
    for model in ("sim:alpha", "sim:beta"):
        claim = acquire(c, model=model)
        assert isinstance(claim, Claim)
        asyncio.run(c.store(claim, Entry(model, 1, 1)))
    sync = fakeredis.FakeRedis(server=server)
    assert invalidate(sync, "t", "tenant_a", "sim:alpha") == 1
    assert isinstance(acquire(c, model="sim:alpha"), Claim)
    assert acquire(c, model="sim:beta") == Entry("sim:beta", 1, 1)
    invalidate(sync, "t", "tenant_b")  # another tenant's invalidation changes nothing here
    assert acquire(c, model="sim:beta") == Entry("sim:beta", 1, 1)
    invalidate(sync, "t", "tenant_a")
    assert isinstance(acquire(c, model="sim:beta"), Claim)
