"""Chaos: Redis wiped mid-batch, a worker killed with SIGKILL mid-batch. Afterwards every accepted
query is terminal exactly once (``tests.chaos.invariants``).

Redis is wiped with FLUSHDB on the deployment's own database index: what FLUSHALL does to the one
database Conclave uses, without touching anything else on the machine.
"""

from __future__ import annotations

import time

import pytest

from shared.sim import SimServer
from tests.chaos.conftest import QUERIES, TEST_TIMEOUT, Chaos, set_sim
from tests.chaos.invariants import check_batch
from tests.helpers import poll, tagged_queries

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(TEST_TIMEOUT)]


def under_way(chaos: Chaos, batch_id: str, fraction: float, running: bool = False) -> dict[str, int]:
    """Wait until ``fraction`` of the batch is done (and, with ``running``, some of it running)."""

    def check() -> dict[str, int] | None:
        c: dict[str, int] = chaos.client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        done = c["completed"] + c["failed"] >= QUERIES * fraction and (c["running"] > 0 or not running)
        return c if done else None

    return poll(check, timeout=240, what=f"the batch to be {fraction:.0%} done")


def test_redis_wiped_mid_batch_loses_nothing(chaos: Chaos, sim: SimServer) -> None:
    set_sim(sim, latency_ms=50)
    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="wipe")}
    ).json()["id"]
    at_wipe = under_way(chaos, batch_id, 0.2)
    chaos.redis.flushdb()
    figures = check_batch(chaos, sim, batch_id, "wipe", started=started)
    assert chaos.broken() is None
    line = figures.line(wipes=1, queued_at_wipe=at_wipe["queued"], running_at_wipe=at_wipe["running"])
    print(f"\nchaos redis-wipe: {line}")


def test_worker_killed_mid_batch_loses_nothing(chaos: Chaos, sim: SimServer) -> None:
    set_sim(sim, latency_ms=50)
    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="kill")}
    ).json()["id"]
    under_way(chaos, batch_id, 0.2, running=True)
    _, held = chaos.kill_worker(chaos.pools[0], batch_id)
    assert held, "the killed worker held no query"
    figures = check_batch(chaos, sim, batch_id, "kill", started=started, interrupted=held)
    assert chaos.broken() is None
    print(f"\nchaos worker-kill: {figures.line(kills=1, held_by_killed=len(held))}")
