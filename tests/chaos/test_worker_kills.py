"""Chaos: worker processes killed with SIGKILL at intervals through one batch.

Pools of two worker processes; at each kill one worker process of the oldest pool is killed.
dramatiq's main process then stops the pool's other worker (SIGTERM: it finishes what it holds)
and exits with status 1, as it does in production; a replacement pool is started at once, as a
supervisor would, so capacity remains. The killed workers' queries come back through
reconciliation once their heartbeat is 30 s old.
"""

from __future__ import annotations

import subprocess
import time
from functools import partial

import pytest

from shared.sim import SimServer
from tests.chaos.conftest import QUERIES, TEST_TIMEOUT, Launch, set_sim
from tests.chaos.invariants import check_batch
from tests.conftest import IN_CI
from tests.helpers import poll, tagged_queries

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(TEST_TIMEOUT)]

KILLS = 3 if IN_CI else 6
# At least this long between two kills, whatever the progress.
MIN_SPACING_S = 2.0
POOL = {"processes": 2, "threads": 16}


def exited(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_workers_killed_at_intervals_lose_nothing(launch: Launch, sim: SimServer) -> None:
    chaos = launch(pools=2, **POOL)
    set_sim(sim, latency_ms=50, latency_jitter_ms=25)
    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="kills")}
    ).json()["id"]

    held: set[str] = set()
    killed_pools = []
    last_kill = 0.0
    for k in range(1, KILLS + 1):
        # Kills spread over the batch: the k-th once k/(KILLS+2) of it is done.
        threshold = QUERIES * k // (KILLS + 2)

        def due(threshold: int = threshold, last_kill: float = last_kill) -> bool:
            c = chaos.client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
            return (
                c["completed"] + c["failed"] >= threshold
                and c["running"] > 0
                and time.monotonic() - last_kill >= MIN_SPACING_S
            )

        poll(due, timeout=240, what=f"kill {k}: the batch to pass {threshold} queries")
        pool = chaos.live_pools()[0]
        _, victim_held = chaos.kill_worker(pool, batch_id)
        last_kill = time.monotonic()
        held |= victim_held
        killed_pools.append(pool)
        chaos.start_pool(**POOL)

    assert held, "the killed workers held no query"
    figures = check_batch(
        chaos, sim, batch_id, "kills", started=started, interrupted=frozenset(held), timeout=TEST_TIMEOUT
    )
    # Every pool that lost a worker went down by itself (dramatiq's main process exits with 1).
    for pool in killed_pools:
        poll(partial(exited, pool), timeout=60, what=f"pool {pool.pid} to exit")
        assert pool.returncode == 1, pool.returncode
    assert chaos.broken() is None
    print(
        f"\nchaos worker-kills: {figures.line(kills=KILLS, held_by_killed=len(held), pools=len(chaos.pools))}"
    )
