"""Fair scheduling (SPEC §15): whose queries a worker's fetch gets next.

Batches are created through the batch service on a private database and real Redis; the
messages are then fetched the way a worker process fetches them (the worker broker's budgeted
consumer, which tops its queue up from the fair lanes), without running them. What a worker is
handed next is what it runs next.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from scheduler.jobs.deadlines import promote_at_risk
from scheduler.jobs.expiry import expire_batches
from scheduler.jobs.reconcile import GRACE_S, reconcile
from shared import keys
from shared.batches.service import create_batch
from shared.lifecycle.statuses import QueryStatus
from shared.models import Batch, Query
from shared.providers.config import load_catalog
from shared.queue.fair import urgent_batches, waiting_ids
from shared.queue.inspect import queue_depths
from shared.schemas import BatchCreate
from shared.settings import DEFAULT_TIERS, Settings
from tests.conftest import new_key
from workers.broker import make_worker_broker

pytestmark = pytest.mark.integration


@pytest.fixture
def own_settings(settings: Settings, namespace: str, own_database_url: str) -> Settings:
    return settings.model_copy(
        update={
            "queue_namespace": f"{namespace}-fair-{uuid.uuid4().hex[:8]}",
            "database_url": own_database_url,
        }
    )


@pytest.fixture
def broker(own_settings: Settings, rclient: redis.Redis) -> Iterator[RedisBroker]:
    broker = make_worker_broker(own_settings)
    yield broker
    broker.close()
    broker.client.close()
    for key in list(rclient.scan_iter(f"{own_settings.queue_namespace}:*", count=1000)):
        rclient.delete(key)


class Tenants:
    def __init__(self, sessions: sessionmaker[Session], broker: RedisBroker, settings: Settings):
        self.sessions, self.broker, self.settings = sessions, broker, settings
        self.catalog = load_catalog(settings.providers_file, settings.sim_provider_url)
        self.batch_tenant: dict[str, str] = {}
        self.query_batch: dict[str, str] = {}

    def new(self) -> str:
        _, tenant_id = new_key(self.sessions, f"fair-{uuid.uuid4().hex[:8]}")
        return str(tenant_id)

    def batch(self, tenant_id: str, n: int, window: str | None = None, weight: float = 1.0) -> str:
        payload = BatchCreate.model_validate(
            {
                "queries": [{"custom_id": f"q-{i}", "prompt": f"question {i}"} for i in range(n)],
                "completion_window": window,
            }
        )
        limits = DEFAULT_TIERS["enterprise"].model_copy(update={"weight": weight})
        batch, _, _ = create_batch(
            self.sessions,
            self.broker,
            self.catalog,
            self.settings,
            tenant_id=tenant_id,
            payload=payload,
            limits=limits,
        )
        self.batch_tenant[batch.id] = tenant_id
        with self.sessions() as s:
            for qid in s.scalars(select(col(Query.id)).where(col(Query.batch_id) == batch.id)):
                self.query_batch[qid] = batch.id
        return batch.id

    def fetch(self, n: int) -> list[str]:
        """The batches of the next ``n`` messages a worker of the ``normal`` queue is handed."""
        consumer = self.broker.consume("normal", prefetch=1, timeout=100)
        got: list[str] = []
        deadline = time.monotonic() + 30
        try:
            while len(got) < n and time.monotonic() < deadline:
                message = next(consumer)
                if message is None:
                    continue
                got.append(self.query_batch[message.message_id])
                consumer.ack(message)
        finally:
            consumer.close()
        return got


@pytest.fixture
def tenants(own_sessions: Any, broker: RedisBroker, own_settings: Settings) -> Tenants:
    return Tenants(own_sessions, broker, own_settings)


def test_a_small_batch_is_not_stuck_behind_another_tenants_backlog(tenants: Tenants) -> None:
    a, b = tenants.new(), tenants.new()
    big = tenants.batch(a, 300)
    small = tenants.batch(b, 20)
    # What waits in the lanes is what a queue-length autoscaler (KEDA) reads: the depth list.
    depth = keys.fair_depth(tenants.settings.queue_namespace, "normal")
    assert tenants.broker.client.llen(depth) == 320 and queue_depths(tenants.broker)["normal"] == 320
    fetched = tenants.fetch(40)
    assert tenants.broker.client.llen(depth) == 280
    # Alternating between the two tenants: the small batch is done within its first 40 fetches,
    # where a FIFO queue would hand out 300 of the other tenant's first.
    assert Counter(fetched) == {big: 20, small: 20}


def test_backlogged_tenants_share_by_weight(tenants: Tenants) -> None:
    one, two, heavy = tenants.new(), tenants.new(), tenants.new()
    batches = {
        tenants.batch(one, 250, weight=1): 0.25,
        tenants.batch(two, 250, weight=1): 0.25,
        tenants.batch(heavy, 250, weight=2): 0.5,
    }
    fetched = Counter(tenants.fetch(200))
    for batch_id, share in batches.items():
        assert fetched[batch_id] / 200 == pytest.approx(share, abs=0.10 * share)


def test_within_a_tenant_the_nearest_deadline_goes_first(tenants: Tenants) -> None:
    a = tenants.new()
    day = tenants.batch(a, 50, window="24h")
    urgent = tenants.batch(a, 10, window="10m")
    assert tenants.fetch(10) == [urgent] * 10
    assert tenants.fetch(5) == [day] * 5


def test_a_batch_that_would_miss_its_window_is_moved_ahead(tenants: Tenants) -> None:
    a, b = tenants.new(), tenants.new()
    backlog = tenants.batch(a, 200, window="24h")
    late = tenants.batch(b, 60, window="20m")
    now = int(time.time())
    # It started 10 minutes ago and finished 10 of 60: 50 left at 1 per minute is 50 minutes,
    # with 10 left in its window.
    with tenants.sessions.begin() as s:
        s.execute(
            update(Batch).where(col(Batch.id) == late).values(in_progress_at=now - 600, expires_at=now + 600)
        )
        first = s.scalars(
            select(col(Query.id)).where(col(Query.batch_id) == late).order_by(col(Query.seq)).limit(10)
        )
        s.execute(
            update(Query)
            .where(col(Query.id).in_(list(first)))
            .values(status=QueryStatus.SUCCEEDED, finished_at=now - 60)
        )
    urgent = promote_at_risk(tenants.sessions, tenants.broker, now=now)
    assert urgent["normal"] == [late] and backlog not in urgent["normal"]
    # Ahead of the fair share (which alone would hand out half of these to the other tenant).
    assert tenants.fetch(30) == [late] * 30

    # At a rate that makes its window, it takes its fair turn again; its tenant was charged for
    # the queries it sent ahead, so the other tenant has its 30 back first.
    with tenants.sessions.begin() as s:
        s.execute(
            update(Batch).where(col(Batch.id) == late).values(in_progress_at=now - 60, expires_at=now + 6000)
        )
    assert promote_at_risk(tenants.sessions, tenants.broker, now=now)["normal"] == []
    assert urgent_batches(tenants.broker, "normal") == []
    assert tenants.fetch(30) == [backlog] * 30
    assert Counter(tenants.fetch(20)) == {backlog: 10, late: 10}


def test_lanes_lost_with_redis_are_rebuilt_by_reconciliation(tenants: Tenants, rclient: redis.Redis) -> None:
    a, b = tenants.new(), tenants.new()
    first = tenants.batch(a, 30)
    second = tenants.batch(b, 10)
    ns = tenants.settings.queue_namespace
    for key in list(rclient.scan_iter(f"{ns}:*", count=1000)):
        rclient.delete(key)
    assert queue_depths(tenants.broker)["normal"] == 0

    assert reconcile(tenants.sessions, tenants.broker, now=int(time.time()) + GRACE_S + 5) == 40
    assert sorted(waiting_ids(tenants.broker, "normal")) == sorted(tenants.query_batch)
    # And they wait in their tenants' lanes again, not in one FIFO.
    assert Counter(tenants.fetch(20)) == {first: 10, second: 10}


def test_an_expired_batch_leaves_the_lanes(tenants: Tenants) -> None:
    a = tenants.new()
    old = tenants.batch(a, 40, window="10m")
    live = tenants.batch(a, 5, window="24h")
    with tenants.sessions() as s:
        expires_at = s.get(Batch, old).expires_at  # type: ignore[union-attr]
    assert expire_batches(tenants.sessions, now=expires_at + 1, broker=tenants.broker) == [old]
    # Its 40 stale messages are gone: the tenant's live batch is next, not behind them.
    assert len(waiting_ids(tenants.broker, "normal")) == 5
    assert tenants.broker.client.llen(keys.fair_depth(tenants.settings.queue_namespace, "normal")) == 5
    assert tenants.fetch(5) == [live] * 5
