"""Chaos: Redis wiped mid-batch, a worker killed with SIGKILL mid-batch. Afterwards every accepted
query is terminal exactly once: one result each, one stage 3 call each, counts consistent.

Each test runs its own API, worker pools and scheduler on a private database and a Redis
database index of its own, so wiping Redis (FLUSHDB: what FLUSHALL does to the one database
Conclave uses) cannot touch anything else on the machine.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select
from sqlmodel import col

from shared.db import make_engine, make_sessionmaker
from shared.models import ProviderCall, Query
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import REDIS_URL, settings_env
from tests.helpers import counts_add_up, jsonl, poll, sim_log, tagged_queries, wait_for_batch

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

QUERIES = int(os.environ.get("CONCLAVE_CHAOS_QUERIES", "2000"))
CHAOS_REDIS_DB = 13


class Chaos:
    def __init__(self, stack: Stack, client: httpx.Client, redis_url: str, database_url: str, pool_a: Any):
        self.stack = stack
        self.pool_a = pool_a  # the dramatiq main process of the pool whose worker gets killed
        self.client = client
        self.redis = redis.Redis.from_url(redis_url)
        self.sessions = make_sessionmaker(make_engine(database_url, pool_size=2))


@pytest.fixture
def chaos(settings: Settings, private_database_url: str, sim: SimServer, tmp_path: Path) -> Iterator[Chaos]:
    redis_url = REDIS_URL.rsplit("/", 1)[0] + f"/{CHAOS_REDIS_DB}"
    wipe = redis.Redis.from_url(redis_url)
    wipe.flushdb()
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_REDIS_URL": redis_url,
        "CONCLAVE_DATABASE_URL": private_database_url,
        "CONCLAVE_QUEUE_NAMESPACE": f"chaos-{uuid.uuid4().hex[:6]}",
    }
    sessions = make_sessionmaker(make_engine(private_database_url, pool_size=1))
    with sessions.begin() as session:
        key = issue_key(session, tenant_name="chaos", role="admin", tier="enterprise").api_key
    stack = Stack(env=env, logs=tmp_path / "logs")
    stack.logs.mkdir()
    try:
        url = stack.start_api()
        pool_a = stack.start_workers(processes=1, threads=32, name="pool-a")
        stack.start_workers(processes=1, threads=32, name="pool-b")
        stack.start_scheduler()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            yield Chaos(stack, client, redis_url, private_database_url, pool_a)
    finally:
        stack.stop()
        wipe.flushdb()
        wipe.close()


def check_exactly_once(
    chaos: Chaos, sim: SimServer, batch_id: str, prefix: str, interrupted: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``interrupted``: custom ids whose provider calls may have reached the provider twice
    because the worker running them died mid-call (their result still counts once)."""
    final = wait_for_batch(chaos.client, batch_id, timeout=300)
    assert final["status"] == "completed"
    assert counts_add_up(final)
    counts = final["request_counts"]
    assert counts["completed"] == QUERIES, counts

    records = jsonl(chaos.client.get(f"/v1/batches/{batch_id}/results"))
    assert len(records) == QUERIES
    assert len({r["custom_id"] for r in records}) == QUERIES
    assert all(r["status"] == "succeeded" and r["synthesis"] == "chairman" for r in records)

    # One stage 3 per query, in our ledger and at the provider.
    with chaos.sessions() as session:
        per_query = session.execute(
            select(col(ProviderCall.query_id), func.count())
            .where(
                col(ProviderCall.batch_id) == batch_id,
                col(ProviderCall.stage) == "synthesis",
                col(ProviderCall.status) == "succeeded",
            )
            .group_by(col(ProviderCall.query_id))
        ).all()
        attempts: dict[int, int] = dict(
            session.execute(
                select(col(Query.attempts), func.count())
                .where(col(Query.batch_id) == batch_id)
                .group_by(col(Query.attempts))
            ).all()
        )
    assert len(per_query) == QUERIES and {n for _, n in per_query} == {1}
    synth = Counter(
        rec["text"].split("[tag:", 1)[1][: len(prefix) + 8]
        for rec in sim_log(sim.url)
        if rec["model"] == "chairman" and f"[tag:{prefix}-" in rec["text"]
    )
    assert len(synth) == QUERIES
    repeated = {tag.rstrip("]") for tag, n in synth.items() if n > 1}
    allowed = {f"{prefix}-{int(cid.rsplit('-', 1)[1]):06d}" for cid in interrupted}
    assert repeated <= allowed, repeated - allowed
    return {"attempts": attempts}


def test_redis_wiped_mid_batch_loses_nothing(chaos: Chaos, sim: SimServer) -> None:
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 50}).raise_for_status()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="wipe")}
    ).json()["id"]

    def under_way() -> bool:
        c = chaos.client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        return c["completed"] >= QUERIES // 5

    poll(under_way, timeout=120, what="the batch to be under way")
    chaos.redis.flushdb()
    seen = check_exactly_once(chaos, sim, batch_id, "wipe")
    assert chaos.stack.dead() is None
    print(f"redis wiped mid-batch: {QUERIES} queries, attempts per query {seen['attempts']}")


def test_worker_killed_mid_batch_loses_nothing(chaos: Chaos, sim: SimServer) -> None:
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 50}).raise_for_status()
    body = {"queries": tagged_queries(QUERIES, prefix="kill")}
    batch_id = chaos.client.post("/v1/batches", json=body).json()["id"]

    def under_way() -> bool:
        c = chaos.client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        return c["completed"] >= QUERIES // 5 and c["running"] > 0

    poll(under_way, timeout=120, what="the batch to be under way")
    victim = int(Path(f"/proc/{chaos.pool_a.pid}/task/{chaos.pool_a.pid}/children").read_text().split()[0])
    os.kill(victim, signal.SIGSTOP)  # freeze it, note what it holds, then kill it
    with chaos.sessions() as session:
        held = frozenset(
            session.scalars(
                select(col(Query.custom_id)).where(
                    col(Query.batch_id) == batch_id,
                    col(Query.status) == "running",
                    col(Query.worker_id).contains(f":{victim}:"),
                )
            ).all()
        )
    os.kill(victim, signal.SIGKILL)
    assert held, "the killed worker held no query"
    seen = check_exactly_once(chaos, sim, batch_id, "kill", interrupted=held)
    print(
        f"worker killed holding {len(held)} queries: {QUERIES} queries, attempts per query {seen['attempts']}"
    )
