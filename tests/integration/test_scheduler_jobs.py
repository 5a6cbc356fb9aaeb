"""The scheduler's leader lock and jobs (reconciliation, expiry), called directly against real Redis
and a real database, without APScheduler.

Reconciliation and expiry scan the whole database, so these tests run on a database of their own
(a fresh one per test, of the kind CONCLAVE_TEST_DB selects) and on a Redis namespace of their own:
the session's worker processes consume the session namespace and must never see these messages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from scheduler.jobs.expiry import expire_batches
from scheduler.jobs.reconcile import GRACE_S, reconcile
from scheduler.leader import LeaderLock
from shared.batches.read import counts_for
from shared.batches.service import cancel_batch, create_batch
from shared.lifecycle.transitions import finalize_if_done
from shared.models import Batch, Query
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.queue.fair import waiting_ids
from shared.queue.inspect import queue_depths
from shared.schemas import BatchCreate
from shared.settings import Priority, Settings
from tests.conftest import new_key
from tests.helpers import poll
from tests.leases import claim_query, record_outcome

pytestmark = pytest.mark.integration

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
LEASE_S = 60


def delete_keys(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(pattern, count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def own_settings(settings: Settings, namespace: str, own_database_url: str) -> Settings:
    return settings.model_copy(
        update={
            "queue_namespace": f"{namespace}-sched-{uuid.uuid4().hex[:8]}",
            "database_url": own_database_url,
        }
    )


@pytest.fixture
def broker(own_settings: Settings, rclient: redis.Redis) -> Iterator[RedisBroker]:
    broker = make_broker(own_settings.redis_url, own_settings.queue_namespace)
    yield broker
    broker.close()
    broker.client.close()
    delete_keys(rclient, f"{own_settings.queue_namespace}:*")


@dataclass
class Harness:
    """What a test needs to create batches and look at their queues."""

    sessions: sessionmaker[Session]
    broker: RedisBroker
    settings: Settings
    redis: redis.Redis
    tenant_id: str

    @property
    def ns(self) -> str:
        return self.settings.queue_namespace

    def create(
        self, n: int, priority: Priority = "normal", window: str | None = None
    ) -> tuple[str, list[str]]:
        payload = BatchCreate.model_validate(
            {
                "queries": [{"custom_id": f"q-{i}", "prompt": f"question {i}"} for i in range(n)],
                "priority": priority,
                "completion_window": window,
            }
        )
        catalog = load_catalog(self.settings.providers_file, self.settings.sim_provider_url)
        batch, _, created = create_batch(
            self.sessions, self.broker, catalog, self.settings, tenant_id=self.tenant_id, payload=payload
        )
        assert created
        return batch.id, self.query_ids(batch.id)

    def query_ids(self, batch_id: str) -> list[str]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(col(Query.id)).where(col(Query.batch_id) == batch_id).order_by(col(Query.seq))
                )
            )

    def batch(self, batch_id: str) -> Batch:
        with self.sessions() as s:
            found = s.get(Batch, batch_id)
            assert found is not None
            return found

    def queries(self, batch_id: str) -> dict[str, Query]:
        with self.sessions() as s:
            return {q.id: q for q in s.scalars(select(Query).where(col(Query.batch_id) == batch_id))}

    def depth(self, priority: Priority) -> int:
        return queue_depths(self.broker)[priority]

    def queued_ids(self, priority: Priority) -> list[str]:
        return waiting_ids(self.broker, priority)

    def message(self, priority: Priority, query_id: str) -> Message:
        raw = self.redis.hget(f"{self.ns}:{priority}.msgs", query_id)
        assert isinstance(raw, bytes), f"no message for {query_id}"
        return Message.decode(raw)

    def lose_messages(self, priority: Priority) -> None:
        """What a Redis restart without persistence (or FLUSHALL) does to one queue."""
        self.redis.delete(f"{self.ns}:{priority}", f"{self.ns}:{priority}.msgs")
        for key in self.redis.scan_iter(f"{self.ns}:fair:{priority}:*"):
            self.redis.delete(key)
        assert self.depth(priority) == 0

    def claim(self, query_id: str, worker: str, now: int, lease_s: int = LEASE_S) -> Any:
        with self.sessions.begin() as s:
            return claim_query(s, query_id, worker, lease_s, now)

    def succeed(self, claimed: Any, worker: str, now: int) -> bool:
        with self.sessions.begin() as s:
            written = record_outcome(
                s,
                claimed,
                worker,
                status="succeeded",
                result={"answer": f"answered by {worker}"},
                error=None,
                routing=None,
                calls=[],
                latency_ms=1,
                now=now,
            )
        with self.sessions.begin() as s:
            finalize_if_done(s, claimed.batch_id, now=now)
        return written


@pytest.fixture
def h(
    own_sessions: sessionmaker[Session], broker: RedisBroker, own_settings: Settings, rclient: redis.Redis
) -> Harness:
    _, tenant_id = new_key(own_sessions, role="user")
    return Harness(own_sessions, broker, own_settings, rclient, tenant_id)


# ---------------------------------------------------------------- leader lock


@pytest.fixture
def lock_key(namespace: str, rclient: redis.Redis) -> Iterator[str]:
    key = f"{namespace}-leader-{uuid.uuid4().hex[:8]}:scheduler:leader"
    yield key
    rclient.delete(key)


def test_only_one_replica_leads_and_the_leader_renews(rclient: redis.Redis, lock_key: str) -> None:
    a = LeaderLock(rclient, key=lock_key, ttl_ms=10_000)
    b = LeaderLock(rclient, key=lock_key, ttl_ms=10_000)
    assert a.identity != b.identity

    assert a.tick() is True
    assert b.tick() is False
    assert (a.is_leader, b.is_leader) == (True, False)
    assert rclient.get(lock_key) == a.identity.encode()

    # Time passes: the key is about to lapse. The leader's tick renews it to a full TTL.
    rclient.pexpire(lock_key, 500)
    assert a.tick() is True
    assert int(rclient.pttl(lock_key)) > 5_000
    assert rclient.get(lock_key) == a.identity.encode()
    # The follower stays a follower however often it ticks.
    assert [b.tick() for _ in range(3)] == [False, False, False]
    assert rclient.get(lock_key) == a.identity.encode()


def test_release_hands_leadership_to_the_other_replica(rclient: redis.Redis, lock_key: str) -> None:
    a = LeaderLock(rclient, key=lock_key, ttl_ms=10_000)
    b = LeaderLock(rclient, key=lock_key, ttl_ms=10_000)
    assert a.tick() and not b.tick()

    # A follower's release must not remove the leader's key.
    b.release()
    assert rclient.get(lock_key) == a.identity.encode()
    assert a.tick() is True

    a.release()
    assert a.is_leader is False
    assert rclient.exists(lock_key) == 0
    assert b.tick() is True
    assert rclient.get(lock_key) == b.identity.encode()
    assert a.tick() is False


def test_follower_takes_over_when_the_leader_stops_renewing(rclient: redis.Redis, lock_key: str) -> None:
    a = LeaderLock(rclient, key=lock_key, ttl_ms=500)
    b = LeaderLock(rclient, key=lock_key, ttl_ms=500)
    assert a.tick() and not b.tick()

    # The leader dies (never ticks again); its key expires and the follower takes over.
    poll(lambda: b.tick(), timeout=10, interval=0.05, what="the follower to take over")
    assert rclient.get(lock_key) == b.identity.encode()
    # The old leader, should it come back, finds it lost the lock and stands down.
    assert a.tick() is False
    assert a.is_leader is False
    assert b.tick() is True


def test_a_lock_never_leads_without_redis(lock_key: str) -> None:
    unreachable = redis.Redis.from_url(UNREACHABLE_REDIS, socket_connect_timeout=1)
    try:
        lock = LeaderLock(unreachable, key=lock_key, ttl_ms=300)
        assert lock.tick() is False
        assert lock.is_leader is False
        # A replica that led before Redis went away cannot renew, so it stands down.
        lock.is_leader = True
        assert lock.tick() is False
        assert lock.is_leader is False
        lock.release()  # must not raise
        assert lock.is_leader is False
    finally:
        unreachable.close()


# ---------------------------------------------------------------- reconciliation


def test_reconcile_re_enqueues_queued_queries_whose_messages_were_lost(h: Harness) -> None:
    batch_id, ids = h.create(25)
    assert h.depth("normal") == 25
    h.lose_messages("normal")

    now = int(time.time()) + GRACE_S + 5
    assert reconcile(h.sessions, h.broker, now=now) == 25
    assert h.depth("normal") == 25
    assert sorted(h.queued_ids("normal")) == sorted(ids)
    message = h.message("normal", ids[0])
    assert message.actor_name == "run_query_normal" and message.args == (ids[0],)
    queries = h.queries(batch_id)
    assert {q.status for q in queries.values()} == {"queued"}
    assert {q.enqueued_at for q in queries.values()} == {now}

    # Right after, and later still: every message exists again, so nothing is enqueued twice.
    assert reconcile(h.sessions, h.broker, now=now) == 0
    assert reconcile(h.sessions, h.broker, now=now + 10 * GRACE_S) == 0
    assert h.depth("normal") == 25


def test_reconcile_leaves_alone_queries_whose_messages_exist(h: Harness) -> None:
    _, lost = h.create(7, priority="high")
    _, kept = h.create(5, priority="low")
    h.lose_messages("high")
    kept_before = h.queued_ids("low")

    assert reconcile(h.sessions, h.broker, now=int(time.time()) + GRACE_S + 5) == 7
    assert sorted(h.queued_ids("high")) == sorted(lost)
    assert h.queued_ids("low") == kept_before and sorted(kept_before) == sorted(kept)
    assert h.depth("normal") == 0


def test_reconcile_waits_for_the_grace_period_before_looking(h: Harness) -> None:
    # The API commits rows before it enqueues: a young queued query may just not be enqueued yet.
    _, _ids = h.create(4)
    h.lose_messages("normal")
    assert reconcile(h.sessions, h.broker, now=int(time.time())) == 0
    assert h.depth("normal") == 0
    assert reconcile(h.sessions, h.broker, now=int(time.time()) + GRACE_S + 5) == 4
    assert h.depth("normal") == 4


def test_reconcile_hands_over_a_running_query_only_when_its_lease_expired(h: Harness) -> None:
    batch_id, (dead_q, live_q) = h.create(2)
    t0 = int(time.time())
    assert h.claim(dead_q, "worker-dead", now=t0, lease_s=LEASE_S) is not None
    assert h.claim(live_q, "worker-live", now=t0, lease_s=10 * LEASE_S) is not None
    # Both messages were consumed and acknowledged by their workers.
    h.lose_messages("normal")

    # Within both leases: nothing to do.
    assert reconcile(h.sessions, h.broker, now=t0 + LEASE_S) == 0
    assert h.depth("normal") == 0

    after_lease = t0 + LEASE_S + 1
    assert reconcile(h.sessions, h.broker, now=after_lease) == 1
    assert h.queued_ids("normal") == [dead_q]

    # The re-enqueued message is runnable by another worker; the live one stays with its owner.
    taken = h.claim(dead_q, "worker-new", now=after_lease + 1)
    assert taken is not None and taken.attempts == 2
    assert h.claim(live_q, "worker-new", now=after_lease + 1) is None
    queries = h.queries(batch_id)
    assert queries[dead_q].worker_id == "worker-new"
    assert queries[live_q].worker_id == "worker-live"


def test_reconcile_finalises_a_batch_its_last_worker_left_unfinished(h: Harness) -> None:
    batch_id, query_ids = h.create(2)
    now = int(time.time())
    for qid in query_ids:
        claimed = h.claim(qid, "worker-a", now=now)
        # Outcome recorded, then the worker lost the database before finalising the batch.
        with h.sessions.begin() as s:
            assert record_outcome(
                s,
                claimed,
                "worker-a",
                status="succeeded",
                result={"answer": "yes"},
                error=None,
                routing=None,
                calls=[],
                latency_ms=1,
                now=now,
            )
    assert h.batch(batch_id).status == "in_progress"

    reconcile(h.sessions, h.broker, now=now + 1)
    batch = h.batch(batch_id)
    assert batch.status == "completed" and batch.completed_at == now + 1
    reconcile(h.sessions, h.broker, now=now + 2)  # nothing left to do, nothing moves
    assert h.batch(batch_id).completed_at == now + 1


# ---------------------------------------------------------------- expiry


def test_expiry_expires_an_unfinished_batch_and_its_open_queries(h: Harness) -> None:
    batch_id, ids = h.create(6)
    t0 = int(time.time())
    done = h.claim(ids[0], "worker-a", now=t0)
    assert h.succeed(done, "worker-a", now=t0)
    running = h.claim(ids[1], "worker-b", now=t0)
    assert running is not None
    expires_at = h.batch(batch_id).expires_at

    # Not yet due.
    assert expire_batches(h.sessions, now=expires_at) == []
    assert h.batch(batch_id).status == "in_progress"

    now = expires_at + 1
    assert expire_batches(h.sessions, now=now) == [batch_id]
    batch = h.batch(batch_id)
    assert batch.status == "expired"
    assert batch.expired_at == now
    assert batch.completed_at is None
    queries = h.queries(batch_id)
    assert queries[ids[0]].status == "succeeded"
    assert queries[ids[0]].result == {"answer": "answered by worker-a"}
    for qid in ids[1:]:
        q = queries[qid]
        assert q.status == "expired", qid
        assert q.error is not None and q.error["type"] == "expired"
        assert q.finished_at == now and q.lease_expires_at is None

    with h.sessions() as s:
        counts = counts_for(s, [batch_id])[batch_id]
    assert (counts.total, counts.succeeded, counts.expired) == (6, 1, 5)
    assert counts.queued == counts.running == counts.failed == counts.cancelled == 0
    assert counts.terminal == counts.total

    # The worker that held a query comes back too late: its outcome is refused, the batch stays expired.
    assert h.succeed(running, "worker-b", now=now + 1) is False
    assert h.queries(batch_id)[ids[1]].status == "expired"
    assert h.batch(batch_id).status == "expired"

    # Idempotent: a second run (even later) changes nothing.
    assert expire_batches(h.sessions, now=now + 3600) == []
    again = h.batch(batch_id)
    assert (again.status, again.expired_at) == ("expired", now)


def test_expiry_respects_each_batch_window(h: Harness) -> None:
    short_id, _ = h.create(2, window="1h")
    long_id, _ = h.create(2, window="24h")
    now = h.batch(short_id).created_at + 2 * 3600
    assert expire_batches(h.sessions, now=now) == [short_id]
    assert h.batch(short_id).status == "expired"
    assert h.batch(long_id).status == "in_progress"
    assert {q.status for q in h.queries(long_id).values()} == {"queued"}


def test_expiry_leaves_completed_and_cancelled_batches_alone(h: Harness) -> None:
    completed_id, (only,) = h.create(1)
    t0 = int(time.time())
    assert h.succeed(h.claim(only, "worker-a", now=t0), "worker-a", now=t0)
    cancelled_id, _ = h.create(3)
    cancel_batch(h.sessions, h.tenant_id, cancelled_id)

    before = {bid: h.batch(bid).model_dump() for bid in (completed_id, cancelled_id)}
    assert before[completed_id]["status"] == "completed"
    assert before[cancelled_id]["status"] == "cancelled"
    before_queries = {bid: {q.id: q.status for q in h.queries(bid).values()} for bid in before}

    far = t0 + 8 * 86400
    assert expire_batches(h.sessions, now=far) == []
    assert expire_batches(h.sessions, now=far) == []
    for bid, dumped in before.items():
        assert h.batch(bid).model_dump() == dumped
        assert {q.id: q.status for q in h.queries(bid).values()} == before_queries[bid]
