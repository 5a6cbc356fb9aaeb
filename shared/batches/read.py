"""The read side of batches: status counts, the batch object (SPEC §3.1), lists, the ETA.

Counts cost the same however large the batch: finished queries by status are counters
(``batch_counts``) that the lifecycle transitions keep in the transaction that moves the queries
(``shared.lifecycle.transitions``), running ones are counted from ``ix_queries_batch_status``
(as many as are in flight, not as the batch holds) and queued ones are the rest of the batch's
``total``. All of it is read in one statement, so one snapshot: as consistent with the query
rows as the former ``GROUP BY`` over all of them. With 1,000,000 finished queries in PostgreSQL
(``benchmarks/scale.py``), that cost ``GET /v1/batches/{id}`` of a running 50,000-query batch
7.5 ms p50 (on a freshly vacuumed table; 24.8 ms at load average 10) and a page of 20 such
batches 70–226 ms; now 4.6 and 5.5 ms p50.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.db import id_page
from shared.errors import NotFound
from shared.lifecycle.statuses import BATCH_TERMINAL, QueryStatus
from shared.models import BATCH_COUNTS, BATCH_USAGE, BATCHES, QUERIES, Batch


@dataclass(frozen=True)
class Counts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    queued: int = 0
    running: int = 0
    cancelled: int = 0
    expired: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0  # calls answered from the exact cache (SPEC §14)
    cost_saved_usd: float = 0.0

    @property
    def terminal(self) -> int:
        return self.succeeded + self.failed + self.cancelled + self.expired


def counts_for(session: Session, batch_ids: Sequence[str]) -> dict[str, Counts]:
    """Per-batch status counts and usage (the batches' ledger totals), in one statement."""
    if not batch_ids:
        return {}
    b, c, u, q = BATCHES.c, BATCH_COUNTS.c, BATCH_USAGE.c, QUERIES.c
    running = (
        select(func.count())
        .where(q.batch_id == b.id, q.status == QueryStatus.RUNNING)
        .correlate(BATCHES)
        .scalar_subquery()
    )
    rows = session.execute(
        select(
            b.id,
            b.total,
            c.succeeded,
            c.failed,
            c.cancelled,
            c.expired,
            running.label("running"),
            # Usage from the batch's ledger totals (shared/ledger.py): every call it paid for,
            # including those of queries that expired, were cancelled late or taken over, and
            # abandoned ones.
            u.input_tokens,
            u.output_tokens,
            u.cost_usd,
            u.cache_hits,
            u.saved_usd,
        )
        .select_from(
            BATCHES.outerjoin(BATCH_COUNTS, c.batch_id == b.id).outerjoin(BATCH_USAGE, u.batch_id == b.id)
        )
        .where(b.id.in_(batch_ids))
    ).all()
    found = {}
    for r in rows:
        succeeded, failed, cancelled, expired = (
            r.succeeded or 0,
            r.failed or 0,
            r.cancelled or 0,
            r.expired or 0,
        )
        found[r.id] = Counts(
            total=r.total,
            succeeded=succeeded,
            failed=failed,
            queued=max(0, r.total - succeeded - failed - cancelled - expired - r.running),
            running=r.running,
            cancelled=cancelled,
            expired=expired,
            input_tokens=r.input_tokens or 0,
            output_tokens=r.output_tokens or 0,
            cost_usd=r.cost_usd or 0.0,
            cache_hits=r.cache_hits or 0,
            cost_saved_usd=r.saved_usd or 0.0,
        )
    return {bid: found.get(bid, Counts()) for bid in batch_ids}


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    # Another tenant's batch is indistinguishable from a missing one.
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return batch


def list_batches(
    session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None
) -> tuple[list[Batch], bool]:
    stmt = select(Batch).where(col(Batch.tenant_id) == tenant_id)
    if status:
        stmt = stmt.where(col(Batch.status) == status)
    return id_page(session, stmt, col(Batch.id), limit=limit, after=after)


def batch_config(
    session: Session, batch_id: str
) -> tuple[dict[str, Any], dict[str, Any] | None, int, dict[str, str] | None]:
    """What a worker needs of a batch to run its queries: the council, the knowledge request, the
    end of its window (how long a query may wait for an open circuit) and the creating request's
    trace carrier (what each query's trace links to, shared.tracing)."""
    row = session.execute(
        select(col(Batch.council), col(Batch.knowledge), col(Batch.expires_at), col(Batch.trace)).where(
            col(Batch.id) == batch_id
        )
    ).one()
    return row.council, row.knowledge, row.expires_at, row.trace


def batch_object(batch: Batch, counts: Counts, now: int | None = None) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "status": batch.status,
        "priority": batch.priority,
        "council": batch.council,
        "knowledge": batch.knowledge,
        "webhook_url": batch.webhook_url,
        "metadata": batch.meta,
        "completion_window": batch.completion_window,
        "input_file_id": batch.input_file_id,
        # Views of the results (shared.files.views): shown the moment the batch has ended.
        "output_file_id": batch.output_file_id if batch.status in BATCH_TERMINAL else None,
        "error_file_id": batch.error_file_id if batch.status in BATCH_TERMINAL else None,
        "errors": batch.errors,
        "request_counts": {
            "total": batch.total,
            "completed": counts.succeeded,
            "failed": counts.failed,
            "queued": counts.queued,
            "running": counts.running,
            "cancelled": counts.cancelled,
            "expired": counts.expired,
        },
        "usage": {
            "input_tokens": counts.input_tokens,
            "output_tokens": counts.output_tokens,
            "total_tokens": counts.input_tokens + counts.output_tokens,
        },
        "cost_usd": round(counts.cost_usd, 8),
        "cache_hits": counts.cache_hits,
        "cost_saved_usd": round(counts.cost_saved_usd, 8),
        # Why its queued queries are not starting (SPEC §17), e.g. {"reason": "budget", ...}.
        "waiting": batch.waiting if batch.status not in BATCH_TERMINAL else None,
        "eta_seconds": eta_seconds(batch, counts, now or int(time.time())),
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "expires_at": batch.expires_at,
        "expired_at": batch.expired_at,
        "failed_at": batch.failed_at,
    }


def eta_seconds(batch: Batch, counts: Counts, now: int) -> int | None:
    """Time left at the rate the batch has finished queries so far; None before the first."""
    if batch.status in BATCH_TERMINAL:
        return 0
    done = counts.terminal
    if done == 0 or batch.in_progress_at is None:
        return None
    elapsed = max(1, now - batch.in_progress_at)
    return int(elapsed / done * (batch.total - done))
