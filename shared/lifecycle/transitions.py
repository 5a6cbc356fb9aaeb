"""Every conditional status transition of batches and queries, one function each.

Every change is a conditional UPDATE decided by the database, never by an earlier read, so racing
workers, a cancel, expiry and reconciliation can never run one query twice at once nor write
its result twice:
- a worker runs a query only if it moved it from ``queued`` (or from an expired lease) to
  ``running`` itself (``claim_queries``);
- it writes the outcome only while it still holds the lease it took (``record_outcomes``);
- the batch is finalised by whoever moves it out of ``in_progress``/``cancelling`` first
  (``finalize_if_done``), and its ``batch.*`` event commits in the same transaction.

Each transition that finishes queries (``record_outcomes``, ``begin_cancel``, ``expire_batch``)
adds what it moved to the batch's ``batch_counts`` in the same transaction, counted from the rows
the UPDATE itself changed, so the counters equal the query rows exactly and reading a batch never
scans them (``shared.batches.read.counts_for``). The other transitions (claim, hand-back,
requeue, takeover) only move queries between ``queued`` and ``running``, which are not counters:
running is counted live, queued is the rest. The counter row is locked last in every transaction
(after the query rows, batch ids in order), so a counter never takes part in a deadlock with the
batch row a cancel or expiry locks first; its one upsert per batch per outcome flush costs
little next to the flush (the ``batch_usage`` row of the same batch is already locked there).

The functions run in the caller's transaction; services and scheduler jobs own the transactions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, bindparam, exists, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.db import affected
from shared.errors import Conflict
from shared.ledger import CallOwner, CallRecord, abandon_calls, finish_calls, record_calls
from shared.lifecycle.statuses import BATCH_ACCEPTING, QUERY_OPEN, QUERY_TERMINAL, BatchStatus, QueryStatus
from shared.models import BATCH_COUNTS, QUERIES, Batch, Query
from shared.webhooks.events import emit_batch_event

# ---------------------------------------------------------------- batch counters


def add_counts(session: Session, moved: Mapping[tuple[str, str], int]) -> None:
    """Add to batches' finished counters: ``moved[(batch_id, status)]`` queries just became
    ``status`` (a terminal one) in this transaction. The first of a batch creates its row (an
    upsert, on SQLite and PostgreSQL alike)."""
    per_batch: dict[str, dict[str, int]] = {}
    for (batch_id, status), n in moved.items():
        if n and status in QUERY_TERMINAL:
            per_batch.setdefault(batch_id, dict.fromkeys(QUERY_TERMINAL, 0))[status] += n
    if not per_batch:
        return
    dialect = session.get_bind().dialect.name
    upsert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(BATCH_COUNTS)
    c = BATCH_COUNTS.c
    stmt = upsert.on_conflict_do_update(
        index_elements=[c.batch_id],
        set_={s: c[s] + upsert.excluded[s] for s in QUERY_TERMINAL},
    )
    # Sorted: every writer locks counter rows in the same order, so two never deadlock on them.
    session.execute(stmt, [{"batch_id": b, **per_batch[b]} for b in sorted(per_batch)])


# ---------------------------------------------------------------- queries: the lease protocol


@dataclass(frozen=True)
class ClaimedQuery:
    id: str
    batch_id: str
    tenant_id: str
    priority: str
    request: dict[str, Any]
    attempts: int
    circuit_waits: int = 0

    @property
    def runs(self) -> int:
        """Runs counted against ``CONCLAVE_QUERY_MAX_RUNS``: claims, less those that only waited
        out an open circuit."""
        return self.attempts - self.circuit_waits

    @property
    def owner(self) -> CallOwner:
        return CallOwner(self.id, self.batch_id, self.tenant_id)


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


def claim_queries(
    session: Session, query_ids: Sequence[str], worker_id: str, lease_s: int, now: int
) -> dict[str, ClaimedQuery]:
    """``queued`` (or ``running`` past its lease) → ``running`` for this worker, many in one
    statement; those missing from the answer are not ours to run. Core statements, not ORM ones:
    this is the worker's hottest write and the ORM's bulk-update bookkeeping cost more than the
    statement itself."""
    q = QUERIES.c
    rows = session.execute(
        update(QUERIES)
        .where(
            q.id.in_(sorted(set(query_ids))),
            or_(
                q.status == QueryStatus.QUEUED,
                (q.status == QueryStatus.RUNNING) & (q.lease_expires_at < now),
            ),
        )
        .values(
            status=QueryStatus.RUNNING,
            worker_id=worker_id,
            lease_expires_at=now + lease_s,
            attempts=q.attempts + 1,
            started_at=now,
        )
        .returning(q.id, q.batch_id, q.tenant_id, q.priority, q.request, q.attempts, q.circuit_waits)
    ).all()
    return {
        r.id: ClaimedQuery(r.id, r.batch_id, r.tenant_id, r.priority, r.request, r.attempts, r.circuit_waits)
        for r in rows
    }


def record_outcomes(
    session: Session,
    outcomes: Sequence[Outcome],
    worker_id: str,
    finished: Sequence[CallRecord] = (),
) -> list[bool]:
    """``running`` → its outcome (or back to ``queued`` when ``requeue_at`` is set), for many
    queries in the caller's transaction; for each, whether it was still ours to write (a query
    taken over by another worker, expired or cancelled keeps what it has).

    ``finished``: sent calls whose completion the ledger has not yet written (the worker's call
    journal hands them over), written first so a batch finalised next sees its whole cost."""
    # Calls are recorded even when the outcome is not ours to write: they were made and cost
    # money. On SQLite this first write also takes the database's write lock, so the read
    # below cannot go stale before the update.
    finish_calls(session, finished)
    record_calls(session, ((o.claimed.owner, c) for o in outcomes for c in o.calls))
    q = QUERIES.c
    ids = sorted({o.claimed.id for o in outcomes})
    # Which of them do we still hold? Locked (PostgreSQL) so the answer holds until commit; an
    # executemany UPDATE only reports the total of rows it changed, not which ones.
    held = set(
        session.scalars(
            select(q.id)
            .where(q.id.in_(ids), q.status == QueryStatus.RUNNING, q.worker_id == worker_id)
            .order_by(q.id)
            .with_for_update()
        )
    )
    rows = [
        {
            "_id": o.claimed.id,
            "status": QueryStatus.QUEUED if o.requeue_at else o.status,
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
            "waited": 1 if o.requeue_at else 0,
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
                circuit_waits=q.circuit_waits + bindparam("waited"),
                lease_expires_at=None,
            ),
            rows,
        )
        # Exactly what moved: every row above was ours and 'running' (locked since), so each
        # now has the status it was last written with (once per query, should one come twice).
        final = {
            o.claimed.id: (o.claimed.batch_id, QueryStatus.QUEUED if o.requeue_at else o.status)
            for o in outcomes
            if o.claimed.id in held
        }
        add_counts(session, Counter(final.values()))
    return [o.claimed.id in held for o in outcomes]


def hand_back(
    session: Session, holders: Sequence[tuple[str, str | None]], now: int, dead: Sequence[str] = ()
) -> list[str]:
    """``running`` → ``queued`` for (query id, holder) pairs judged dead or past their lease;
    conditional on that holder, so a query that finished meanwhile stays as it is. Returns the
    ids that moved. The calls the ``dead`` workers had in flight become ``abandoned`` in the same
    transaction."""
    abandon_calls(session, dead)
    moved_ids = []
    for query_id, worker_id in holders:
        holder = col(Query.worker_id) == worker_id if worker_id else col(Query.worker_id).is_(None)
        moved = affected(
            session.execute(
                update(Query)
                .where(col(Query.id) == query_id, col(Query.status) == QueryStatus.RUNNING, holder)
                .values(status=QueryStatus.QUEUED, worker_id=None, lease_expires_at=None, enqueued_at=now)
            )
        )
        if moved:
            moved_ids.append(query_id)
    return moved_ids


def stamp_enqueued(session: Session, query_ids: Sequence[str], now: int) -> None:
    """Queued queries whose messages were sent again: the grace before they are looked for restarts."""
    session.execute(update(Query).where(col(Query.id).in_(query_ids)).values(enqueued_at=now))


# ---------------------------------------------------------------- batches


def finalize_if_done(session: Session, batch_id: str, now: int | None = None) -> str | None:
    """``in_progress`` → ``completed`` or ``cancelling`` → ``cancelled`` once no query is open,
    with its ``batch.*`` event. Returns the new status if this call did it (exactly one caller
    ever does), else None.

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
        (BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED, "completed_at"),
        (BatchStatus.CANCELLING, BatchStatus.CANCELLED, "cancelled_at"),
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


def finalize_stragglers(session: Session, now: int, limit: int = 100) -> dict[str, str]:
    """Finalise batches whose queries are all terminal but which are still ``in_progress`` or
    ``cancelling`` (their last worker recorded the outcome, then lost the database before it
    could finalise)."""
    open_query = exists().where(col(Query.batch_id) == col(Batch.id), col(Query.status).in_(QUERY_OPEN))
    stuck = session.scalars(
        select(col(Batch.id))
        # total > 0: a batch holds its queries from the transaction that created it, so only a
        # (hand-made) empty one has none open without having run any.
        .where(
            col(Batch.status).in_((BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)),
            col(Batch.total) > 0,
            ~open_query,
        )
        .limit(limit)
    ).all()
    return finalize_batches(session, stuck, now) if stuck else {}


def begin_cancel(session: Session, batch_id: str, now: int) -> None:
    """``validating``/``in_progress`` → ``cancelling``, and its ``queued`` queries → ``cancelled``
    (running ones may finish). Idempotent for a batch already cancelling or cancelled; a batch
    that ended otherwise is a ``Conflict``. The caller then finalises in a new transaction."""
    moved = affected(
        session.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status).in_(BATCH_ACCEPTING))
            .values(status=BatchStatus.CANCELLING, cancelling_at=now)
        )
    )
    if not moved:
        # Decided by the update, not by an earlier read: a batch that finished a moment ago is
        # refused exactly like one that finished long ago.
        status = session.scalar(select(col(Batch.status)).where(col(Batch.id) == batch_id))
        if status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise Conflict(f"batch is already {status}", param="batch_id")
        return
    # The conditional update is what makes cancel race-free against workers: a worker only
    # runs a query it moved from 'queued' to 'running' itself.
    cancelled = affected(
        session.execute(
            update(Query)
            .where(col(Query.batch_id) == batch_id, col(Query.status) == QueryStatus.QUEUED)
            .values(status=QueryStatus.CANCELLED, finished_at=now, lease_expires_at=None)
        )
    )
    add_counts(session, {(batch_id, QueryStatus.CANCELLED): cancelled})


def batches_due_for_expiry(session: Session, now: int) -> list[str]:
    return list(
        session.scalars(
            select(col(Batch.id)).where(col(Batch.status).in_(BATCH_ACCEPTING), col(Batch.expires_at) < now)
        ).all()
    )


EXPIRED_ERROR = {"type": "expired", "message": "the batch's completion window passed"}


def expire_batch(session: Session, batch_id: str, now: int) -> bool:
    """``validating``/``in_progress`` → ``expired`` past the window, its open queries with it,
    and its ``batch.expired`` event. Returns whether this call did it."""
    moved = affected(
        session.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.status).in_(BATCH_ACCEPTING))
            .values(status=BatchStatus.EXPIRED, expired_at=now, finalizing_at=now)
        )
    )
    if not moved:
        return False
    # A running query's late outcome is then refused (record_outcomes needs 'running').
    expired = affected(
        session.execute(
            update(Query)
            .where(col(Query.batch_id) == batch_id, col(Query.status).in_(QUERY_OPEN))
            .values(status=QueryStatus.EXPIRED, finished_at=now, lease_expires_at=None, error=EXPIRED_ERROR)
        )
    )
    add_counts(session, {(batch_id, QueryStatus.EXPIRED): expired})
    emit_batch_event(session, batch_id, BatchStatus.EXPIRED, now)
    return True
