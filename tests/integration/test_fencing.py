"""Fencing of call writes (SPEC §16): a worker writes a call only under the lease it still holds.

Data layer against the session's real database, workers played by hand with the lease protocol
(``tests/leases.py``): a start for a query handed on is refused (no row, the journal raises
``LeaseLost`` so the call is never sent), a completion of an abandoned call is refused (the row
keeps its estimate), a worker whose lease only ran out still completes the calls it had in flight,
and a start racing the hand-back either commits first and is abandoned with the others, or waits
and is refused. The whole-deployment form is ``tests/chaos/test_partition.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches.read import counts_for
from shared.batches.service import create_batch
from shared.ledger import REFUSED, CallOwner, CallRecord, LeaseLost, StartedCall, finish_calls, start_calls
from shared.lifecycle.statuses import CallStatus
from shared.lifecycle.transitions import hand_back
from shared.models import ProviderCall
from shared.models import Query as QueryRow
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.schemas import BatchCreate
from shared.settings import Settings
from tests.conftest import DB_KIND, new_key
from tests.leases import claim_query
from workers.journal import CallJournal

pytestmark = pytest.mark.integration

Made = tuple[CallOwner, int]  # the query's owner, and when it was claimed


@pytest.fixture
def broker(settings: Settings, namespace: str) -> Iterator[RedisBroker]:
    ns = f"{namespace}-fencing-{uuid.uuid4().hex[:8]}"
    broker = make_broker(settings.redis_url, ns)
    yield broker
    broker.close()
    client = redis.Redis.from_url(settings.redis_url)
    found = list(client.scan_iter(f"{ns}:*", count=1000))
    if found:
        client.delete(*found)
    client.close()


@pytest.fixture
def claimed_by(
    sessions: sessionmaker[Session], broker: RedisBroker, settings: Settings
) -> Callable[[str], Made]:
    """A one-query batch whose query ``worker`` has claimed."""
    tenant_id = new_key(sessions, role="user")[1]
    catalog = load_catalog(settings.providers_file, settings.sim_provider_url)

    def make(worker: str) -> Made:
        payload = BatchCreate.model_validate({"queries": [{"custom_id": "q-0", "prompt": "question"}]})
        batch, _, _ = create_batch(sessions, broker, catalog, settings, tenant_id=tenant_id, payload=payload)
        with sessions() as s:
            qid = s.scalars(select(col(QueryRow.id)).where(col(QueryRow.batch_id) == batch.id)).one()
        now = int(time.time())
        with sessions.begin() as s:
            assert claim_query(s, qid, worker, 900, now)
        return CallOwner(qid, batch.id, tenant_id), now

    return make


def started(owner: CallOwner, worker: str, now: int) -> StartedCall:
    return StartedCall(
        f"call_{uuid.uuid4().hex[:20]}", owner, worker, "sim:alpha", "answer", 1, 40, 0.004, now
    )


def completion(call: StartedCall) -> CallRecord:
    return CallRecord(
        "sim:alpha",
        "answer",
        1,
        CallStatus.SUCCEEDED,
        None,
        9,
        30,
        10,
        0.01,
        call.created_at,
        call_key=call.call_key,
    )


def rows(sessions: sessionmaker[Session], batch_id: str) -> list[tuple[str, str, float]]:
    with sessions() as s:
        return [
            (r.call_key or "", r.status, r.cost_usd)
            for r in s.execute(
                select(
                    col(ProviderCall.call_key), col(ProviderCall.status), col(ProviderCall.cost_usd)
                ).where(col(ProviderCall.batch_id) == batch_id)
            )
        ]


def totals(sessions: sessionmaker[Session], batch_id: str) -> tuple[int, int, float]:
    with sessions() as s:
        c = counts_for(s, [batch_id])[batch_id]
    return c.input_tokens, c.output_tokens, round(c.cost_usd, 8)


def test_a_worker_whose_query_was_handed_on_writes_no_call(
    sessions: sessionmaker[Session], claimed_by: Callable[[str], Made], caplog: pytest.LogCaptureFixture
) -> None:
    owner, now = claimed_by("worker-cut-off")
    first = started(owner, "worker-cut-off", now)
    with sessions.begin() as s:
        assert start_calls(s, [first]) == []
    # Presumed dead: its query goes to another worker, its call in flight is abandoned.
    with sessions.begin() as s:
        assert hand_back(s, [(owner.query_id, "worker-cut-off")], now + 60, dead=["worker-cut-off"])
    with sessions.begin() as s:
        assert claim_query(s, owner.query_id, "worker-b", 900, now + 61)
    kept = rows(sessions, owner.batch_id)
    assert kept == [(first.call_key, CallStatus.ABANDONED, pytest.approx(0.004))]
    before = totals(sessions, owner.batch_id)

    # Back on the network: its completion and its next call are refused, and say so.
    late = started(owner, "worker-cut-off", now + 70)
    with caplog.at_level(logging.WARNING, logger="conclave.ledger"), sessions.begin() as s:
        assert finish_calls(s, [completion(first)]) == [completion(first)]
        assert start_calls(s, [late]) == [late]
    assert rows(sessions, owner.batch_id) == kept
    assert totals(sessions, owner.batch_id) == before
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith(REFUSED)]
    assert len(refusals) == 2 and late.call_key in refusals[1], refusals

    # The new holder's calls go through.
    mine = started(owner, "worker-b", now + 62)
    with sessions.begin() as s:
        assert start_calls(s, [mine]) == []
        assert finish_calls(s, [completion(mine)]) == []
    assert (mine.call_key, CallStatus.SUCCEEDED, pytest.approx(0.01)) in rows(sessions, owner.batch_id)


def test_the_journal_refuses_to_send_a_call_of_a_query_handed_on(
    sessions: sessionmaker[Session], claimed_by: Callable[[str], Made]
) -> None:
    owner, now = claimed_by("worker-cut-off")
    with sessions.begin() as s:
        assert hand_back(s, [(owner.query_id, "worker-cut-off")], now + 60, dead=["worker-cut-off"])
    journal = CallJournal(sessions)
    try:
        with pytest.raises(LeaseLost):
            asyncio.run(asyncio.wait_for(journal.started(started(owner, "worker-cut-off", now)), 30))
    finally:
        journal.close()
    assert rows(sessions, owner.batch_id) == []


def test_a_worker_whose_lease_only_ran_out_completes_its_calls_in_flight(
    sessions: sessionmaker[Session], claimed_by: Callable[[str], Made]
) -> None:
    owner, now = claimed_by("worker-slow")
    call = started(owner, "worker-slow", now)
    with sessions.begin() as s:
        start_calls(s, [call])
    # Handed back for its lease, not for its death: nobody else would ever end the row.
    with sessions.begin() as s:
        assert hand_back(s, [(owner.query_id, "worker-slow")], now + 901)
    with sessions.begin() as s:
        assert finish_calls(s, [completion(call)]) == []
        assert start_calls(s, [started(owner, "worker-slow", now + 902)]) != []
    assert rows(sessions, owner.batch_id) == [(call.call_key, CallStatus.SUCCEEDED, pytest.approx(0.01))]


@pytest.mark.skipif(DB_KIND != "postgresql", reason="SQLite runs one writer at a time: no race to lose")
def test_a_start_racing_the_hand_back_is_abandoned_with_the_others(
    sessions: sessionmaker[Session], claimed_by: Callable[[str], Made]
) -> None:
    """The start holds its query row until it commits; the hand-back waits for it, then finds the
    new row and abandons it (the other order is the first test: the start finds the query gone)."""
    owner, now = claimed_by("worker-cut-off")
    call = started(owner, "worker-cut-off", now)
    moved: list[list[str]] = []
    with sessions.begin() as s:
        assert start_calls(s, [call]) == []

        def reconcile() -> None:
            with sessions.begin() as r:
                moved.append(
                    hand_back(r, [(owner.query_id, "worker-cut-off")], now + 60, dead=["worker-cut-off"])
                )

        thread = threading.Thread(target=reconcile)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the hand-back did not wait for the start's transaction"
    thread.join(30)
    assert moved == [[owner.query_id]]
    assert rows(sessions, owner.batch_id) == [(call.call_key, CallStatus.ABANDONED, pytest.approx(0.004))]
