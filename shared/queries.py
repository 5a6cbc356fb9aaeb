"""Query data access for workers and result readers: claim, record the outcome, finalise the batch,
stream results.

Every state change is a conditional UPDATE, so racing workers, a cancel and reconciliation can
never run one query twice at once nor write its result twice:
- a worker runs a query only if it moved it from ``queued`` (or from an expired lease) to
  ``running`` itself;
- it writes the outcome only while it still holds the lease it took;
- the batch is finalised by whoever moves it out of ``in_progress``/``cancelling`` first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Integer, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import affected
from shared.errors import NotFound
from shared.models import (
    PROVIDER_CALLS,
    QUERIES,
    QUERY_OPEN,
    QUERY_TERMINAL,
    Batch,
    ProviderCall,
    Query,
)

RESULT_PAGE = 1000


@dataclass(frozen=True)
class ClaimedQuery:
    id: str
    batch_id: str
    tenant_id: str
    priority: str
    request: dict[str, Any]
    attempts: int


@dataclass(frozen=True)
class CallRecord:
    """One attempt at one provider call, as stored in ``provider_calls``."""

    model: str
    stage: str
    attempt: int
    status: str
    error_category: str | None
    latency_ms: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    created_at: int
    # When the attempt ended (ns since the epoch): for trace spans, not stored.
    ended_ns: int = field(default=0, compare=False)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        del data["ended_ns"]
        return data


def claim_query(
    session: Session, query_id: str, worker_id: str, lease_s: int, now: int
) -> ClaimedQuery | None:
    """Take a query for this worker, or None when it is not ours to run (done, cancelled, held)."""
    return claim_queries(session, [query_id], worker_id, lease_s, now).get(query_id)


def claim_queries(
    session: Session, query_ids: Sequence[str], worker_id: str, lease_s: int, now: int
) -> dict[str, ClaimedQuery]:
    """Take many queries for this worker in one statement; those missing from the answer are
    not ours to run. Core statements, not ORM ones: this is the worker's hottest write and the
    ORM's bulk-update bookkeeping cost more than the statement itself."""
    q = QUERIES.c
    rows = session.execute(
        update(QUERIES)
        .where(
            q.id.in_(sorted(set(query_ids))),
            or_(q.status == "queued", (q.status == "running") & (q.lease_expires_at < now)),
        )
        .values(
            status="running",
            worker_id=worker_id,
            lease_expires_at=now + lease_s,
            attempts=q.attempts + 1,
            started_at=now,
        )
        .returning(q.id, q.batch_id, q.tenant_id, q.priority, q.request, q.attempts)
    ).all()
    return {
        r.id: ClaimedQuery(r.id, r.batch_id, r.tenant_id, r.priority, r.request, r.attempts) for r in rows
    }


def batch_config(session: Session, batch_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    row = session.execute(
        select(col(Batch.council), col(Batch.knowledge)).where(col(Batch.id) == batch_id)
    ).one()
    return row.council, row.knowledge


@dataclass(frozen=True)
class Outcome:
    """How one claimed query ended, with every provider call it made."""

    claimed: ClaimedQuery
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    routing: dict[str, Any] | None
    calls: Sequence[CallRecord]
    latency_ms: int
    now: int
    # Not an outcome yet: store the calls and hand the query back to the queue, due then.
    requeue_at: int | None = None


def record_outcome(
    session: Session,
    claimed: ClaimedQuery,
    worker_id: str,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    routing: dict[str, Any] | None,
    calls: Sequence[CallRecord],
    latency_ms: int,
    now: int,
) -> bool:
    """Store the calls and the outcome. Returns False when the query was no longer ours."""
    outcome = Outcome(claimed, status, result, error, routing, calls, latency_ms, now)
    return record_outcomes(session, [outcome], worker_id)[0]


def record_outcomes(session: Session, outcomes: Sequence[Outcome], worker_id: str) -> list[bool]:
    """Store many outcomes in the caller's transaction; for each, whether it was still ours to
    write (a query taken over by another worker, expired or cancelled keeps what it has)."""
    calls = [
        {
            **c.row(),
            "query_id": o.claimed.id,
            "batch_id": o.claimed.batch_id,
            "tenant_id": o.claimed.tenant_id,
        }
        for o in outcomes
        for c in o.calls
    ]
    if calls:
        # Calls are recorded even when the outcome is not ours to write: they were made and cost
        # money. On SQLite this first write also takes the database's write lock, so the read
        # below cannot go stale before the update.
        session.execute(insert(PROVIDER_CALLS), calls)
    q = QUERIES.c
    ids = sorted({o.claimed.id for o in outcomes})
    # Which of them do we still hold? Locked (PostgreSQL) so the answer holds until commit; an
    # executemany UPDATE only reports the total of rows it changed, not which ones.
    held = set(
        session.scalars(
            select(q.id)
            .where(q.id.in_(ids), q.status == "running", q.worker_id == worker_id)
            .order_by(q.id)
            .with_for_update()
        )
    )
    rows = [
        {
            "_id": o.claimed.id,
            "status": "queued" if o.requeue_at else o.status,
            "result": None if o.requeue_at else o.result,
            "error": None if o.requeue_at else o.error,
            "routing": o.routing,
            "add_input": sum(c.input_tokens for c in o.calls),
            "add_output": sum(c.output_tokens for c in o.calls),
            "add_cost": sum(c.cost_usd for c in o.calls),
            "latency_ms": o.latency_ms,
            "finished_at": None if o.requeue_at else o.now,
            "worker_id": None if o.requeue_at else worker_id,
            "requeue_at": o.requeue_at,
        }
        for o in outcomes
        if o.claimed.id in held
    ]
    if rows:
        # Usage adds up over runs: a query handed back and run again paid for both runs.
        session.execute(
            update(QUERIES)
            .where(q.id == bindparam("_id"))
            .values(
                status=bindparam("status"),
                result=bindparam("result"),
                error=bindparam("error"),
                routing=bindparam("routing"),
                input_tokens=q.input_tokens + bindparam("add_input"),
                output_tokens=q.output_tokens + bindparam("add_output"),
                cost_usd=q.cost_usd + bindparam("add_cost"),
                latency_ms=bindparam("latency_ms"),
                finished_at=bindparam("finished_at"),
                worker_id=bindparam("worker_id"),
                enqueued_at=func.coalesce(bindparam("requeue_at", type_=Integer), q.enqueued_at),
                lease_expires_at=None,
            ),
            rows,
        )
    return [o.claimed.id in held for o in outcomes]


def finalize_if_done(session: Session, batch_id: str, now: int | None = None) -> str | None:
    """Move the batch to its end state if no query is open and queue its ``batch.*`` event.
    Returns the new status if this call did it (exactly one caller ever does), else None.

    Must run in a transaction that starts after the caller's own query update committed: then
    whichever of several racing workers commits last is guaranteed to see no open query.
    """
    open_left = session.execute(
        select(col(Query.id))
        .where(col(Query.batch_id) == batch_id, col(Query.status).in_(QUERY_OPEN))
        .limit(1)
    ).first()
    if open_left is not None:
        return None
    now = now or int(time.time())
    for from_status, to_status, stamp in (
        ("in_progress", "completed", "completed_at"),
        ("cancelling", "cancelled", "cancelled_at"),
    ):
        moved = affected(
            session.execute(
                update(Batch)
                .where(col(Batch.id) == batch_id, col(Batch.status) == from_status)
                .values(status=to_status, finalizing_at=now, **{stamp: now})
            )
        )
        if moved:
            # The event commits with the change: delivered once, never lost.
            from shared.webhooks.events import emit_batch_event

            emit_batch_event(session, batch_id, to_status, now)
            return to_status
    return None


def finalize_batches(session: Session, batch_ids: Sequence[str], now: int | None = None) -> dict[str, str]:
    """``finalize_if_done`` for several batches in one transaction; returns those it finalised."""
    done: dict[str, str] = {}
    for batch_id in sorted(set(batch_ids)):
        status = finalize_if_done(session, batch_id, now)
        if status:
            done[batch_id] = status
    return done


# ---------------------------------------------------------------- results


def result_record(row: Any, include_stages: bool = False) -> dict[str, Any]:
    result = row.result or {}
    record: dict[str, Any] = {
        "custom_id": row.custom_id,
        "query_id": row.id,
        "status": row.status,
        "answer": result.get("answer"),
        "error": row.error,
        "synthesis": result.get("synthesis"),
        "chairman": result.get("chairman"),
        "members": [
            {
                "model": m["model"],
                "status": m["status"],
                "error": m.get("error"),
                "latency_ms": m.get("latency_ms"),
            }
            for m in result.get("members", [])
        ],
        "aggregate_ranking": result.get("aggregate_ranking", []),
        "citations": result.get("citations", []),
        "usage": {
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "total_tokens": row.input_tokens + row.output_tokens,
        },
        "cost_usd": round(row.cost_usd, 8),
        "latency_ms": row.latency_ms,
    }
    if result.get("simulated"):
        record["simulated"] = True
    if include_stages:
        record["stages"] = {
            "answers": [
                {
                    "model": m["model"],
                    "status": m["status"],
                    "answer": m.get("answer"),
                    "error": m.get("error"),
                }
                for m in result.get("members", [])
            ],
            "reviews": result.get("reviews", []),
            "routing": row.routing,
        }
    return record


_RESULT_COLUMNS = (
    col(Query.seq),
    col(Query.id),
    col(Query.custom_id),
    col(Query.status),
    col(Query.result),
    col(Query.error),
    col(Query.routing),
    col(Query.input_tokens),
    col(Query.output_tokens),
    col(Query.cost_usd),
    col(Query.latency_ms),
)


def iter_results(
    sessions: sessionmaker[Session], batch_id: str, *, status: str | None = None, include_stages: bool = False
) -> Iterator[dict[str, Any]]:
    """Terminal queries in batch order, a page at a time (bounded memory, short transactions)."""
    statuses = (status,) if status else QUERY_TERMINAL
    last_seq = -1
    while True:
        with sessions() as session:
            rows = session.execute(
                select(*_RESULT_COLUMNS)
                .where(
                    col(Query.batch_id) == batch_id,
                    col(Query.status).in_(statuses),
                    col(Query.seq) > last_seq,
                )
                .order_by(col(Query.seq))
                .limit(RESULT_PAGE)
            ).all()
        for row in rows:
            yield result_record(row, include_stages)
        if len(rows) < RESULT_PAGE:
            return
        last_seq = rows[-1].seq


def query_detail(session: Session, tenant_id: str, query_id: str) -> dict[str, Any]:
    query = session.get(Query, query_id)
    if query is None or query.tenant_id != tenant_id:
        raise NotFound(f"no query {query_id!r}", param="query_id")
    calls = session.scalars(
        select(ProviderCall).where(col(ProviderCall.query_id) == query_id).order_by(col(ProviderCall.id))
    ).all()
    detail = result_record(query, include_stages=True)
    detail.update(
        {
            "object": "query",
            "id": query.id,
            "batch_id": query.batch_id,
            "request": query.request,
            "priority": query.priority,
            "attempts": query.attempts,
            "enqueued_at": query.enqueued_at,
            "started_at": query.started_at,
            "finished_at": query.finished_at,
            "provider_calls": [
                {
                    "model": c.model,
                    "stage": c.stage,
                    "attempt": c.attempt,
                    "status": c.status,
                    "error_category": c.error_category,
                    "latency_ms": c.latency_ms,
                    "input_tokens": c.input_tokens,
                    "output_tokens": c.output_tokens,
                    "cost_usd": c.cost_usd,
                    "created_at": c.created_at,
                }
                for c in calls
            ],
        }
    )
    return detail
