"""Expiry: a batch past its ``completion_window`` ends ``expired``; its unfinished queries too."""

from __future__ import annotations

import logging
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import affected
from shared.models import QUERY_OPEN, Batch, Query
from shared.webhooks.events import emit_batch_event

log = logging.getLogger("conclave.scheduler")


def expire_batches(sessions: sessionmaker[Session], now: int | None = None) -> list[str]:
    now = now or int(time.time())
    expired: list[str] = []
    with sessions() as session:
        due = session.scalars(
            select(col(Batch.id)).where(
                col(Batch.status).in_(("validating", "in_progress")), col(Batch.expires_at) < now
            )
        ).all()
    for batch_id in due:
        with sessions.begin() as session:
            moved = affected(
                session.execute(
                    update(Batch)
                    .where(col(Batch.id) == batch_id, col(Batch.status).in_(("validating", "in_progress")))
                    .values(status="expired", expired_at=now, finalizing_at=now)
                )
            )
            if not moved:
                continue
            # A running query's late outcome is then refused (record_outcome needs 'running').
            session.execute(
                update(Query)
                .where(col(Query.batch_id) == batch_id, col(Query.status).in_(QUERY_OPEN))
                .values(
                    status="expired",
                    finished_at=now,
                    lease_expires_at=None,
                    error={"type": "expired", "message": "the batch's completion window passed"},
                )
            )
            emit_batch_event(session, batch_id, "expired", now)
        expired.append(batch_id)
        log.info("batch %s expired", batch_id)
    return expired
