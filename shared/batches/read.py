"""The read side of batches: status counts, the batch object (SPEC §3.1), lists, the ETA.

Counts are derived from the query rows in one grouped statement, so they are always
consistent with the queries themselves.
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
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.models import BATCH_USAGE, Batch, Query


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
    """Per-batch status counts (one grouped query over the queries) and usage (the batches' ledger
    totals)."""
    acc: dict[str, dict[str, Any]] = {bid: {} for bid in batch_ids}
    if not batch_ids:
        return {}
    rows = session.execute(
        select(
            col(Query.batch_id),
            col(Query.status),
            func.count(),
        )
        .where(col(Query.batch_id).in_(batch_ids))
        .group_by(col(Query.batch_id), col(Query.status))
    ).all()
    for batch_id, status, n in rows:
        d = acc[batch_id]
        d[status] = d.get(status, 0) + n
        d["total"] = d.get("total", 0) + n
    # Usage from the batch's ledger totals (shared/ledger.py): every call it paid for, including
    # those of queries that expired, were cancelled late or taken over, and abandoned ones.
    for usage in session.execute(select(BATCH_USAGE).where(BATCH_USAGE.c.batch_id.in_(batch_ids))).all():
        d = acc[usage.batch_id]
        d["input_tokens"], d["output_tokens"], d["cost_usd"] = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cost_usd,
        )
        d["cache_hits"], d["cost_saved_usd"] = usage.cache_hits, usage.saved_usd
    return {bid: Counts(**d) for bid, d in acc.items()}


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
