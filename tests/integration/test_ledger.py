"""Batch totals equal the call ledger (SPEC §5.3, §17), whatever happened to the queries, and calls
a dead worker had in flight stay in the ledger as ``abandoned``.

Data layer against the session's real database: a batch through the batch service, workers
played by hand with the lease protocol (``tests/leases.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches.read import counts_for
from shared.batches.service import cancel_batch, create_batch
from shared.ledger import CallOwner, CallRecord, StartedCall, finish_calls, start_calls
from shared.lifecycle.statuses import CallStatus, QueryStatus
from shared.lifecycle.transitions import expire_batch, hand_back
from shared.models import ProviderCall, Query
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.schemas import BatchCreate
from shared.settings import Settings
from tests.conftest import new_key
from tests.leases import claim_query, record_outcome

pytestmark = pytest.mark.integration


@pytest.fixture
def own_settings(settings: Settings, namespace: str) -> Settings:
    return settings.model_copy(update={"queue_namespace": f"{namespace}-ledger-{uuid.uuid4().hex[:8]}"})


@pytest.fixture
def broker(own_settings: Settings) -> Iterator[RedisBroker]:
    broker = make_broker(own_settings.redis_url, own_settings.queue_namespace)
    yield broker
    broker.close()
    client = redis.Redis.from_url(own_settings.redis_url)
    found = list(client.scan_iter(f"{own_settings.queue_namespace}:*", count=1000))
    if found:
        client.delete(*found)
    client.close()


@pytest.fixture
def make_batch(
    sessions: sessionmaker[Session], broker: RedisBroker, own_settings: Settings
) -> Callable[[int], tuple[str, str, list[str]]]:
    tenant_id = new_key(sessions, role="user")[1]
    catalog = load_catalog(own_settings.providers_file, own_settings.sim_provider_url)

    def make(n: int) -> tuple[str, str, list[str]]:
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
        return tenant_id, batch.id, ids

    return make


def call(cost: float, tokens: tuple[int, int] = (100, 50), status: str = CallStatus.SUCCEEDED) -> CallRecord:
    return CallRecord(
        model="sim:alpha",
        stage="answer",
        attempt=1,
        status=status,
        error_category=None if status == CallStatus.SUCCEEDED else "server",
        latency_ms=5,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost_usd=cost,
        created_at=int(time.time()),
    )


def ledger_sums(sessions: sessionmaker[Session], batch_id: str) -> tuple[int, int, int, float]:
    with sessions() as s:
        row = s.execute(
            select(
                func.count(),
                func.coalesce(func.sum(col(ProviderCall.input_tokens)), 0),
                func.coalesce(func.sum(col(ProviderCall.output_tokens)), 0),
                func.coalesce(func.sum(col(ProviderCall.cost_usd)), 0.0),
            ).where(col(ProviderCall.batch_id) == batch_id)
        ).one()
    return int(row[0]), int(row[1]), int(row[2]), float(row[3])


def batch_totals(sessions: sessionmaker[Session], batch_id: str) -> tuple[int, int, float]:
    with sessions() as s:
        counts = counts_for(s, [batch_id])[batch_id]
    return counts.input_tokens, counts.output_tokens, counts.cost_usd


def test_calls_of_queries_that_expired_were_cancelled_or_taken_over_count_in_the_batch(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, str, list[str]]]
) -> None:
    """Their outcomes are refused, but their calls were made and paid for: the batch's totals
    must include them, as /v1/usage does (it sums the ledger)."""
    _, batch_id, (done, taken_over, late) = make_batch(3)
    now = int(time.time())
    with sessions.begin() as s:
        first = claim_query(s, done, "worker-a", 900, now)
        lost = claim_query(s, taken_over, "worker-a", 1, now)
        slow = claim_query(s, late, "worker-a", 900, now)
    assert first and lost and slow
    with sessions.begin() as s:
        assert record_outcome(
            s,
            first,
            "worker-a",
            status=QueryStatus.SUCCEEDED,
            result={"answer": "x"},
            error=None,
            routing=None,
            calls=[call(0.25)],
            latency_ms=5,
            now=now,
        )
    # Another worker takes the second query over once its lease has run out: the first holder's
    # late outcome is refused, and its calls still count.
    with sessions.begin() as s:
        assert claim_query(s, taken_over, "worker-b", 900, now + 5) is not None
        assert not record_outcome(
            s,
            lost,
            "worker-a",
            status=QueryStatus.SUCCEEDED,
            result={"answer": "y"},
            error=None,
            routing=None,
            calls=[call(0.5), call(0.0, (20, 0), CallStatus.FAILED)],
            latency_ms=5,
            now=now + 6,
        )
    # The batch expires with the third still running; its late outcome is refused too.
    with sessions.begin() as s:
        assert expire_batch(s, batch_id, now + 7)
    with sessions.begin() as s:
        assert not record_outcome(
            s,
            slow,
            "worker-a",
            status=QueryStatus.SUCCEEDED,
            result={"answer": "z"},
            error=None,
            routing=None,
            calls=[call(1.0)],
            latency_ms=5,
            now=now + 8,
        )
    calls, tin, tout, cost = ledger_sums(sessions, batch_id)
    assert calls == 4 and cost == pytest.approx(1.75)
    assert batch_totals(sessions, batch_id) == (tin, tout, pytest.approx(cost))


def test_a_late_cancel_keeps_what_the_running_query_paid(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, str, list[str]]]
) -> None:
    tenant_id, batch_id, (running, _) = make_batch(2)
    now = int(time.time())
    with sessions.begin() as s:
        claimed = claim_query(s, running, "worker-a", 900, now)
    assert claimed
    cancel_batch(sessions, tenant_id, batch_id)
    with sessions.begin() as s:
        assert record_outcome(
            s,
            claimed,
            "worker-a",
            status=QueryStatus.SUCCEEDED,
            result={"answer": "x"},
            error=None,
            routing=None,
            calls=[call(0.3), call(0.2)],
            latency_ms=5,
            now=now + 1,
        )
    _, tin, tout, cost = ledger_sums(sessions, batch_id)
    assert cost == pytest.approx(0.5)
    assert batch_totals(sessions, batch_id) == (tin, tout, pytest.approx(cost))


def test_calls_in_flight_when_their_worker_died_are_abandoned_with_their_estimate(
    sessions: sessionmaker[Session], make_batch: Callable[[int], tuple[str, str, list[str]]]
) -> None:
    tenant_id, batch_id, (qid,) = make_batch(1)
    now = int(time.time())
    with sessions.begin() as s:
        claimed = claim_query(s, qid, "worker-dead", 900, now)
    assert claimed
    owner = CallOwner(qid, batch_id, tenant_id)
    started = [
        StartedCall(
            f"call_{i}_{uuid.uuid4().hex[:8]}", owner, "worker-dead", "sim:alpha", "answer", 1, 40, 0.004, now
        )
        for i in range(3)
    ]
    with sessions.begin() as s:
        start_calls(s, started)
        # One of the three completed and its completion was written before the worker died.
        finish_calls(
            s,
            [
                CallRecord(
                    "sim:alpha",
                    "answer",
                    1,
                    CallStatus.SUCCEEDED,
                    None,
                    9,
                    30,
                    10,
                    0.01,
                    now,
                    call_key=started[0].call_key,
                )
            ],
        )
    assert batch_totals(sessions, batch_id) == ledger_sums(sessions, batch_id)[1:]

    with sessions.begin() as s:
        assert hand_back(s, [(qid, "worker-dead")], now + 60, dead=["worker-dead"]) == [qid]
    with sessions() as s:
        statuses = sorted(
            s.scalars(select(col(ProviderCall.status)).where(col(ProviderCall.query_id) == qid))
        )
    assert statuses == [CallStatus.ABANDONED, CallStatus.ABANDONED, CallStatus.SUCCEEDED]
    calls, tin, tout, cost = ledger_sums(sessions, batch_id)
    assert (calls, tin, tout) == (3, 30 + 40 + 40, 10) and cost == pytest.approx(0.01 + 0.008)
    assert batch_totals(sessions, batch_id) == (tin, tout, pytest.approx(cost))
