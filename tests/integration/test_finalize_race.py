"""Exactly-once finalisation under racing workers, at the data layer (``shared/lifecycle/transitions.py``).

Threads play worker processes the way ``workers/pipeline.py`` does: claim and record the outcome in
one transaction, then check for the batch's end in a new one. The batches are enqueued on a Redis
namespace of their own so that the session's worker processes never run them.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches import service
from shared.batches.read import counts_for
from shared.batches.service import cancel_batch, create_batch
from shared.errors import Conflict
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.lifecycle.transitions import ClaimedQuery, finalize_if_done
from shared.models import Batch, Query
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.schemas import BatchCreate
from shared.settings import Settings
from tests.conftest import new_key
from tests.helpers import poll
from tests.leases import claim_query, record_outcome

pytestmark = pytest.mark.integration

N = 40
THREADS = 8
LEASE_S = 900


@pytest.fixture
def own_settings(settings: Settings, namespace: str) -> Settings:
    return settings.model_copy(update={"queue_namespace": f"{namespace}-race-{uuid.uuid4().hex[:8]}"})


@pytest.fixture
def broker(own_settings: Settings) -> Iterator[RedisBroker]:
    broker = make_broker(own_settings.redis_url, own_settings.queue_namespace)
    yield broker
    broker.close()
    broker.client.close()
    client = redis.Redis.from_url(own_settings.redis_url)
    keys = list(client.scan_iter(f"{own_settings.queue_namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def tenant_id(sessions: sessionmaker[Session]) -> str:
    return new_key(sessions, role="user")[1]


@pytest.fixture
def make_batch(
    sessions: sessionmaker[Session], broker: RedisBroker, own_settings: Settings, tenant_id: str
) -> Callable[[int], tuple[str, list[str]]]:
    catalog = load_catalog(own_settings.providers_file, own_settings.sim_provider_url)

    def make(n: int) -> tuple[str, list[str]]:
        payload = BatchCreate.model_validate(
            {"queries": [{"custom_id": f"q-{i}", "prompt": f"question {i}"} for i in range(n)]}
        )
        batch, _, _ = create_batch(
            sessions, broker, catalog, own_settings, tenant_id=tenant_id, payload=payload
        )
        with sessions() as s:
            ids = list(
                s.scalars(
                    select(col(Query.id)).where(col(Query.batch_id) == batch.id).order_by(col(Query.seq))
                )
            )
        assert len(ids) == n
        return batch.id, ids

    return make


def record_success(session: Session, claimed: ClaimedQuery, worker: str, now: int) -> bool:
    return record_outcome(
        session,
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


@dataclass
class WorkerLog:
    claimed: list[str] = field(default_factory=list)
    finalized: list[str | None] = field(default_factory=list)


def run_workers(
    sessions: sessionmaker[Session],
    batch_id: str,
    ids: list[str],
    on_done: Callable[[], None] = lambda: None,
) -> list[WorkerLog]:
    """THREADS workers, each trying every query in its own (seeded) order, all starting together."""
    start = threading.Barrier(THREADS)

    def worker(n: int) -> WorkerLog:
        name = f"worker-{n}"
        order = list(ids)
        random.Random(n).shuffle(order)
        log = WorkerLog()
        start.wait(timeout=30)
        for qid in order:
            now = int(time.time())
            with sessions.begin() as session:
                claimed = claim_query(session, qid, name, LEASE_S, now)
                if claimed is None:
                    continue
                assert claimed.batch_id == batch_id
                assert record_success(session, claimed, name, now)
            log.claimed.append(qid)
            on_done()
            # A new transaction, started after the outcome committed (as workers/actors.py does).
            with sessions.begin() as session:
                log.finalized.append(finalize_if_done(session, batch_id, now=now))
        return log

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [pool.submit(worker, n) for n in range(THREADS)]
        return [f.result(timeout=120) for f in futures]


def batch_row(sessions: sessionmaker[Session], batch_id: str) -> Batch:
    with sessions() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None
        return batch


def query_rows(sessions: sessionmaker[Session], batch_id: str) -> list[Query]:
    with sessions() as s:
        return list(s.scalars(select(Query).where(col(Query.batch_id) == batch_id)))


@pytest.mark.parametrize("round_", range(3))
def test_racing_workers_finalise_the_batch_exactly_once(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, list[str]]], round_: int
) -> None:
    batch_id, ids = make_batch(N)
    logs = run_workers(sessions, batch_id, ids)

    claims = Counter(qid for log in logs for qid in log.claimed)
    assert sorted(claims) == sorted(ids)
    assert set(claims.values()) == {1}, "a query was claimed twice"
    finals = [f for log in logs for f in log.finalized]
    assert len(finals) == N
    assert [f for f in finals if f is not None] == ["completed"]

    batch = batch_row(sessions, batch_id)
    assert batch.status == "completed"
    assert batch.completed_at is not None and batch.finalizing_at is not None
    assert batch.cancelled_at is None
    owner = {qid: f"worker-{n}" for n, log in enumerate(logs) for qid in log.claimed}
    for q in query_rows(sessions, batch_id):
        assert q.status == "succeeded"
        assert q.attempts == 1
        assert q.worker_id == owner[q.id]
        assert q.result == {"answer": f"answered by {owner[q.id]}"}
        assert q.finished_at is not None and q.lease_expires_at is None
    with sessions() as s:
        counts = counts_for(s, [batch_id])[batch_id]
    assert (counts.total, counts.succeeded, counts.terminal) == (N, N, N)

    # A finished query is nobody's to claim again, however late it is.
    later = int(time.time()) + 10 * LEASE_S
    with sessions.begin() as s:
        assert all(claim_query(s, qid, "worker-late", LEASE_S, later) is None for qid in ids)
    # ... and the batch is never finalised a second time.
    with sessions.begin() as s:
        assert finalize_if_done(s, batch_id) is None
    assert batch_row(sessions, batch_id).completed_at == batch.completed_at


def test_a_claimed_query_is_taken_over_only_after_its_lease_expired(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, list[str]]]
) -> None:
    batch_id, (qid,) = make_batch(1)
    t0 = int(time.time())
    lease = 60
    with sessions.begin() as s:
        held_by_a = claim_query(s, qid, "worker-a", lease, t0)
    assert held_by_a is not None and held_by_a.attempts == 1

    # While A's lease is live (up to and including its last second), B cannot have the query.
    for now in (t0, t0 + lease // 2, t0 + lease):
        with sessions.begin() as s:
            assert claim_query(s, qid, "worker-b", lease, now) is None

    with sessions.begin() as s:
        held_by_b = claim_query(s, qid, "worker-b", lease, t0 + lease + 1)
    assert held_by_b is not None and held_by_b.attempts == 2

    # A finishes late: its outcome is not written, and it does not finalise anything.
    with sessions.begin() as s:
        assert record_success(s, held_by_a, "worker-a", t0 + lease + 2) is False
    (q,) = query_rows(sessions, batch_id)
    assert (q.status, q.worker_id, q.result) == ("running", "worker-b", None)
    with sessions.begin() as s:
        assert finalize_if_done(s, batch_id) is None
    assert batch_row(sessions, batch_id).status == "in_progress"

    with sessions.begin() as s:
        assert record_success(s, held_by_b, "worker-b", t0 + lease + 3) is True
    with sessions.begin() as s:
        assert finalize_if_done(s, batch_id) == "completed"
    (q,) = query_rows(sessions, batch_id)
    assert (q.status, q.result) == ("succeeded", {"answer": "answered by worker-b"})


def test_cancel_waits_for_the_running_query_whose_worker_then_finalises(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, list[str]]], tenant_id: str
) -> None:
    batch_id, ids = make_batch(5)
    now = int(time.time())
    with sessions.begin() as s:
        running = claim_query(s, ids[0], "worker-a", LEASE_S, now)
    assert running is not None

    batch, counts = cancel_batch(sessions, tenant_id, batch_id)
    assert batch.status == "cancelling" and batch.cancelling_at is not None
    assert (counts.running, counts.cancelled, counts.queued) == (1, 4, 0)
    # Cancelled queries never reach a worker.
    with sessions.begin() as s:
        assert all(claim_query(s, qid, "worker-b", LEASE_S, now) is None for qid in ids[1:])

    with sessions.begin() as s:
        assert record_success(s, running, "worker-a", now) is True
    with sessions.begin() as s:
        assert finalize_if_done(s, batch_id, now=now) == "cancelled"
    final = batch_row(sessions, batch_id)
    assert final.status == "cancelled" and final.cancelled_at == now
    assert final.completed_at is None

    # Cancelling again answers with the cancelled batch; nothing moves.
    again, counts = cancel_batch(sessions, tenant_id, batch_id)
    assert again.status == "cancelled"
    assert (counts.succeeded, counts.cancelled, counts.total) == (1, 4, 5)


@pytest.mark.parametrize("cancel_after", [0, 5, 20, 35])
def test_cancel_racing_with_completion_ends_terminal_with_counts_adding_up(
    sessions: sessionmaker[Session],
    make_batch: Callable[[int], tuple[str, list[str]]],
    tenant_id: str,
    cancel_after: int,
) -> None:
    batch_id, ids = make_batch(N)
    done = Counter[str]()
    lock = threading.Lock()

    def count() -> None:
        with lock:
            done["n"] += 1

    outcome: dict[str, Any] = {}

    def canceller() -> None:
        poll(lambda: done["n"] >= cancel_after, timeout=60, interval=0.001, what="workers to be under way")
        try:
            outcome["batch"], _ = cancel_batch(sessions, tenant_id, batch_id)
        except Conflict as exc:
            outcome["conflict"] = exc

    with ThreadPoolExecutor(max_workers=1) as pool:
        cancelling = pool.submit(canceller)
        logs = run_workers(sessions, batch_id, ids, on_done=count)
        cancelling.result(timeout=60)

    batch = batch_row(sessions, batch_id)
    assert batch.status in BATCH_TERMINAL and batch.status in ("completed", "cancelled")
    if batch.status == "cancelled":
        assert "batch" in outcome
    if "conflict" in outcome:
        # The cancel came after the last query: the batch had already completed.
        assert batch.status == "completed"
    with sessions() as s:
        counts = counts_for(s, [batch_id])[batch_id]
    assert counts.total == N
    assert counts.queued == counts.running == counts.failed == counts.expired == 0
    assert counts.succeeded + counts.cancelled == N
    claimed = [qid for log in logs for qid in log.claimed]
    assert len(claimed) == len(set(claimed)) == counts.succeeded

    finals = [f for log in logs for f in log.finalized if f is not None]
    assert len(finals) <= 1
    if finals:
        assert finals == [batch.status]
    if batch.status == "cancelled":
        assert batch.cancelling_at is not None and batch.cancelled_at is not None
        assert batch.completed_at is None
    else:
        assert batch.completed_at is not None
        assert counts.succeeded == N


def test_cancel_losing_the_race_to_completion_is_refused_like_any_cancel_of_a_completed_batch(
    sessions: sessionmaker[Session],
    make_batch: Callable[[int], tuple[str, list[str]]],
    tenant_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last query completes between cancel's read of the batch and its conditional update.

    A cancel that arrives after completion is refused with 409 (SPEC §3.1: a cancel answers 200
    only with a ``cancelling`` or ``cancelled`` batch); losing the race by a hair must answer
    the same way, not 200 with a completed batch.
    """
    batch_id, (qid,) = make_batch(1)
    now = int(time.time())
    with sessions.begin() as s:
        running = claim_query(s, qid, "worker-a", LEASE_S, now)
    assert running is not None

    real_get_batch = service.get_batch
    raced: list[str] = []

    def get_batch_then_complete(session: Session, tenant: str, bid: str) -> Batch:
        found = real_get_batch(session, tenant, bid)
        if not raced:
            raced.append(found.status)
            with sessions.begin() as s:
                assert record_success(s, running, "worker-a", now)
            with sessions.begin() as s:
                assert finalize_if_done(s, batch_id, now=now) == "completed"
        return found

    monkeypatch.setattr(service, "get_batch", get_batch_then_complete)
    with pytest.raises(Conflict):
        cancel_batch(sessions, tenant_id, batch_id)
    assert raced == ["in_progress"]
    final = batch_row(sessions, batch_id)
    assert (final.status, final.cancelling_at, final.cancelled_at) == ("completed", None, None)

    # The same cancel a moment later is refused.
    monkeypatch.undo()
    with pytest.raises(Conflict):
        cancel_batch(sessions, tenant_id, batch_id)
