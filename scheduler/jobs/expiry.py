"""Expiry: a batch past its ``completion_window`` ends ``expired``; its unfinished queries too."""

from __future__ import annotations

import logging
import time

from sqlalchemy.orm import Session, sessionmaker

from shared.lifecycle.transitions import batches_due_for_expiry, expire_batch

log = logging.getLogger("conclave.scheduler")


def expire_batches(sessions: sessionmaker[Session], now: int | None = None) -> list[str]:
    now = now or int(time.time())
    with sessions() as session:
        due = batches_due_for_expiry(session, now)
    expired: list[str] = []
    # One transaction per batch: a large backlog of due batches never holds one long lock.
    for batch_id in due:
        with sessions.begin() as session:
            if not expire_batch(session, batch_id, now):
                continue
        expired.append(batch_id)
        log.info("batch %s expired", batch_id)
    return expired
