"""A batch's counters (``batch_counts``, kept by the lifecycle transitions) equal a GROUP BY over
its query rows after every kind of move: outcomes, failures, requeue (circuit and budget waits),
hand-back, takeover of an expired lease, a late outcome refused, cancel, expiry; through the
real system too (API, workers, cancel mid-run); and migration 0010 backfills existing batches."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from alembic import command
from sqlalchemy import func, insert, select, text, update

from shared.batches.read import Counts, counts_for
from shared.db import alembic_config, make_engine, make_sessionmaker
from shared.lifecycle import transitions as t
from shared.lifecycle.statuses import QueryStatus
from shared.models import BATCH_COUNTS, BATCHES, QUERIES
from shared.sim import SimServer
from tests.conftest import new_key
from tests.helpers import poll, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


def grouped(sessions: Any, batch_id: str) -> dict[str, int]:
    """The truth: the batch's query rows counted by status."""
    with sessions() as session:
        rows = session.execute(
            select(QUERIES.c.status, func.count())
            .where(QUERIES.c.batch_id == batch_id)
            .group_by(QUERIES.c.status)
        ).all()
    found = dict.fromkeys(STATUSES, 0)
    found.update({status: n for status, n in rows})
    return found


def counted(sessions: Any, batch_id: str) -> dict[str, int]:
    with sessions() as session:
        counts: Counts = counts_for(session, [batch_id])[batch_id]
    return {s: getattr(counts, s) for s in STATUSES}


def assert_consistent(sessions: Any, batch_id: str, **expected: int) -> None:
    truth = grouped(sessions, batch_id)
    assert counted(sessions, batch_id) == truth
    assert {k: truth[k] for k in expected} == expected


def new_batch(sessions: Any, n: int) -> tuple[str, list[str]]:
    _, tenant = new_key(sessions)
    batch_id, now = f"batch_{uuid.uuid4().hex[:20]}", int(time.time())
    ids = [f"q_{uuid.uuid4().hex[:20]}" for _ in range(n)]
    with sessions.begin() as session:
        session.execute(
            insert(BATCHES),
            [
                {
                    "id": batch_id,
                    "tenant_id": tenant,
                    "status": "in_progress",
                    "priority": "normal",
                    "council": {},
                    "metadata": {},
                    "completion_window": "24h",
                    "total": n,
                    "created_at": now,
                    "in_progress_at": now,
                    "expires_at": now + 86400,
                }
            ],
        )
        session.execute(
            insert(QUERIES),
            [
                {
                    "id": qid,
                    "batch_id": batch_id,
                    "tenant_id": tenant,
                    "seq": i,
                    "custom_id": f"c-{i}",
                    "status": "queued",
                    "priority": "normal",
                    "request": {"messages": []},
                    "attempts": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "cost_usd": 0.0,
                }
                for i, qid in enumerate(ids)
            ],
        )
    return batch_id, sorted(ids)


def claim(sessions: Any, ids: list[str], worker: str) -> dict[str, t.ClaimedQuery]:
    with sessions.begin() as session:
        return t.claim_queries(session, ids, worker, 600, int(time.time()))


def record(sessions: Any, worker: str, *outcomes: tuple[t.ClaimedQuery, str, int | None]) -> list[bool]:
    now = int(time.time())
    with sessions.begin() as session:
        return t.record_outcomes(
            session,
            [
                t.Outcome(c, status, None, None, None, (), 5, now, requeue_at=requeue)
                for c, status, requeue in outcomes
            ],
            worker,
        )


def test_counters_follow_every_transition(sessions: Any) -> None:
    batch_id, ids = new_batch(sessions, 10)
    assert_consistent(sessions, batch_id, queued=10)

    claimed = claim(sessions, ids[:6], "w1")
    assert len(claimed) == 6
    assert_consistent(sessions, batch_id, queued=4, running=6)

    c = [claimed[i] for i in ids[:6]]
    # Two succeed, one fails, one waits out an open circuit (back to queued, due later); the same
    # outcome sent twice in one flush counts once.
    assert (
        record(
            sessions,
            "w1",
            (c[0], QueryStatus.SUCCEEDED, None),
            (c[1], QueryStatus.SUCCEEDED, None),
            (c[1], QueryStatus.SUCCEEDED, None),
            (c[2], QueryStatus.FAILED, None),
            (c[3], QueryStatus.QUEUED, int(time.time()) + 30),
        )
        == [True] * 5
    )
    assert_consistent(sessions, batch_id, queued=5, running=2, succeeded=2, failed=1)

    # A dead worker's query goes back to the queue; another's lease expires and is taken over.
    with sessions.begin() as session:
        assert t.hand_back(session, [(c[4].id, "w1")], int(time.time())) == [c[4].id]
        session.execute(update(QUERIES).where(QUERIES.c.id == c[5].id).values(lease_expires_at=1))
    assert_consistent(sessions, batch_id, queued=6, running=1)
    taken = claim(sessions, [c[5].id], "w2")[c[5].id]
    assert_consistent(sessions, batch_id, running=1)
    # The first holder's late outcome is refused and counts nothing; the new holder's counts.
    assert record(sessions, "w1", (c[5], QueryStatus.SUCCEEDED, None)) == [False]
    assert_consistent(sessions, batch_id, running=1, succeeded=2)
    assert record(sessions, "w2", (taken, QueryStatus.FAILED, None)) == [True]
    assert_consistent(sessions, batch_id, queued=6, running=0, succeeded=2, failed=2)

    # Cancel: queued ones at once, a running one may still finish.
    running = claim(sessions, ids[6:7], "w3")[ids[6]]
    with sessions.begin() as session:
        t.begin_cancel(session, batch_id, int(time.time()))
    assert_consistent(sessions, batch_id, queued=0, running=1, cancelled=5)
    assert record(sessions, "w3", (running, QueryStatus.SUCCEEDED, None)) == [True]
    with sessions.begin() as session:
        assert t.finalize_if_done(session, batch_id) == "cancelled"
    assert_consistent(sessions, batch_id, queued=0, running=0, succeeded=3, failed=2, cancelled=5)


def test_expiry_counts_queued_and_running(sessions: Any) -> None:
    batch_id, ids = new_batch(sessions, 5)
    running = claim(sessions, ids[:2], "w1")
    assert record(sessions, "w1", (running[ids[0]], QueryStatus.SUCCEEDED, None)) == [True]
    with sessions.begin() as session:
        assert t.expire_batch(session, batch_id, int(time.time()))
    assert_consistent(sessions, batch_id, queued=0, running=0, succeeded=1, expired=4)
    # The running query's late outcome is refused (it is expired now) and counts nothing.
    assert record(sessions, "w1", (running[ids[1]], QueryStatus.SUCCEEDED, None)) == [False]
    assert_consistent(sessions, batch_id, succeeded=1, expired=4)


def test_counters_match_the_rows_after_a_real_run(
    client: httpx.Client, sim: SimServer, sessions: Any
) -> None:
    # More queries than the workers hold at once (2 × 32 threads), so some are queued at the cancel.
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 300}).raise_for_status()
    batch = client.post("/v1/batches", json={"queries": tagged_queries(200, "cnt")}).json()
    poll(
        lambda: client.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] >= 1 or None,
        timeout=60,
        what="a first query to finish",
    )
    client.post(f"/v1/batches/{batch['id']}/cancel").raise_for_status()
    final = wait_for_batch(client, batch["id"], timeout=60)
    assert final["status"] == "cancelled"
    truth = grouped(sessions, batch["id"])
    assert counted(sessions, batch["id"]) == truth
    shown = final["request_counts"]
    assert (shown["completed"], shown["failed"], shown["cancelled"], shown["queued"], shown["running"]) == (
        truth["succeeded"],
        truth["failed"],
        truth["cancelled"],
        0,
        0,
    )
    assert truth["succeeded"] >= 1 and truth["cancelled"] >= 1
    assert truth["succeeded"] + truth["failed"] + truth["cancelled"] == 200


def test_migration_backfills_existing_batches(private_database_url: str) -> None:
    cfg = alembic_config(private_database_url)
    command.downgrade(cfg, "0009")
    engine = make_engine(private_database_url, pool_size=1)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO tenants (id, name, tier, is_operator, webhook_secret, created_at) "
                    "VALUES ('ten_m', 'm', 'free', false, 'x', 0)"
                )
            )
            for b, statuses in (("b1", ["succeeded", "succeeded", "failed", "running"]), ("b2", ["expired"])):
                conn.execute(
                    text(
                        "INSERT INTO batches (id, tenant_id, status, priority, council, metadata, "
                        "completion_window, endpoint, total, created_at, expires_at) VALUES "
                        "(:id, 'ten_m', 'in_progress', 'normal', '{}', '{}', '24h', '/v1/council', :n, 0, 1)"
                    ),
                    {"id": b, "n": len(statuses)},
                )
                for i, status in enumerate(statuses):
                    conn.execute(
                        text(
                            "INSERT INTO queries (id, batch_id, tenant_id, seq, custom_id, status, priority, "
                            "request, attempts, circuit_waits, input_tokens, output_tokens, cost_usd) VALUES "
                            "(:id, :b, 'ten_m', :i, :c, :s, 'normal', '{}', 0, 0, 0, 0, 0)"
                        ),
                        {"id": f"{b}-{i}", "b": b, "i": i, "c": f"c{i}", "s": status},
                    )
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            rows = conn.execute(select(BATCH_COUNTS).order_by(BATCH_COUNTS.c.batch_id)).all()
        assert [tuple(r) for r in rows] == [("b1", 2, 1, 0, 0), ("b2", 0, 0, 0, 1)]
        with make_sessionmaker(engine)() as session:
            counts = counts_for(session, ["b1", "b2"])
        assert (counts["b1"].succeeded, counts["b1"].failed, counts["b1"].running, counts["b1"].queued) == (
            2,
            1,
            1,
            0,
        )
        assert (counts["b2"].expired, counts["b2"].queued) == (1, 0)
    finally:
        engine.dispose()
