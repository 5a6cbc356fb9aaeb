"""Retention (SPEC §17, ``CONCLAVE_RETENTION_DAYS``): an ended batch's content is deleted once its
end is older than the retention period, exactly as ``DELETE /v1/batches/{id}`` deletes it
(``shared.batches.deletion``; the cost ledger stays).

A run deletes at most ``limit`` batches, each in its own short transactions, so a backlog (the
first run after retention is turned down, say) drains over a few runs without ever holding a long
lock. Finding them is a range scan of the primary key: batch ids are time-ordered
(``shared.ids``) and a batch ends after it was created, so only ids created before the cutoff are
read, whatever the size of the table.
"""

from __future__ import annotations

import logging
import time

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.batches.deletion import purge_batch
from shared.ids import new_id
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.models import BATCHES

log = logging.getLogger("conclave.scheduler")

BATCHES_PER_RUN = 50


def due_for_purge(session: Session, cutoff: int, limit: int) -> list[str]:
    """Ended batches whose end is before ``cutoff`` (Unix seconds), oldest first."""
    b = BATCHES.c
    ended_at = func.coalesce(b.completed_at, b.cancelled_at, b.expired_at, b.failed_at, b.created_at)
    # "batch_" and the cutoff's 10 time digits: every id created before the cutoff sorts below it.
    bound = new_id("batch", now_ms=cutoff * 1000)[: len("batch_") + 10]
    return list(
        session.scalars(
            select(b.id)
            .where(b.id < bound, b.status.in_(BATCH_TERMINAL), ended_at < cutoff)
            .order_by(b.id)
            .limit(limit)
        )
    )


def purge_old_batches(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    retention_days: int,
    now: int | None = None,
    limit: int = BATCHES_PER_RUN,
) -> list[str]:
    """Delete up to ``limit`` batches that ended more than ``retention_days`` ago; returns them."""
    cutoff = (now or int(time.time())) - retention_days * 86400
    with sessions() as session:
        due = due_for_purge(session, cutoff, limit)
    for batch_id in due:
        queries = purge_batch(sessions, broker, batch_id)
        log.info(
            "batch %s deleted after %d days of retention (%d queries)", batch_id, retention_days, queries
        )
    return due
