"""Expiry: a batch past its ``completion_window`` ends ``expired``; its unfinished queries too.

Its messages still waiting in the fair lanes are dropped: each would cost a fetch and a claim
that finds nothing, and, being its tenant's nearest deadline, they would go before the tenant's
live batches.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy.orm import Session, sessionmaker

from shared.lifecycle.transitions import batches_due_for_expiry, expire_batch
from shared.queue.fair import drop_lanes

log = logging.getLogger("conclave.scheduler")


def expire_batches(
    sessions: sessionmaker[Session], now: int | None = None, broker: RedisBroker | None = None
) -> list[str]:
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
    if expired and broker is not None:
        # Best effort: a message left behind is claimed as nothing and acked.
        with contextlib.suppress(redis.RedisError):
            drop_lanes(broker, expired)
    return expired
