"""Reconciliation: the database is the truth; Redis may lose messages.

A query the database holds as ``queued`` whose message no longer exists in Redis (a restart
without persistence, a FLUSHALL, an API that died between commit and enqueue), or ``running``
past its lease with no live message (a dead worker), is enqueued again. Running it twice at once
is impossible: a worker only runs a query it claimed with a conditional update.
"""

from __future__ import annotations

import logging
import time

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.models import Query
from workers.broker import enqueue_messages, messages_exist, query_message

log = logging.getLogger("conclave.scheduler")

# A message is only looked for once the query has been queued this long: the API commits
# rows before it enqueues, so a younger query may simply not be enqueued yet.
GRACE_S = 30
# Rows examined per run. A run continues where the previous one stopped (a cursor on the
# query id), so a lost message behind a long backlog of healthy ones is still found.
SCAN_LIMIT = 20_000


class Reconciler:
    def __init__(self, sessions: sessionmaker[Session], broker: RedisBroker):
        self.sessions = sessions
        self.broker = broker
        self._cursor = ""

    def run(self, now: int | None = None) -> int:
        now = now or int(time.time())
        with self.sessions() as session:
            rows = session.execute(
                select(col(Query.id), col(Query.priority))
                .where(
                    col(Query.id) > self._cursor,
                    or_(
                        (col(Query.status) == "queued") & (col(Query.enqueued_at) < now - GRACE_S),
                        (col(Query.status) == "running") & (col(Query.lease_expires_at) < now),
                    ),
                )
                .order_by(col(Query.id))
                .limit(SCAN_LIMIT)
            ).all()
        # A short page means the scan reached the end: the next run starts over.
        self._cursor = rows[-1].id if len(rows) == SCAN_LIMIT else ""
        if not rows:
            return 0
        items = [(r.id, r.priority) for r in rows]
        lost = [
            item for item, exists in zip(items, messages_exist(self.broker, items), strict=True) if not exists
        ]
        if not lost:
            return 0
        enqueue_messages(self.broker, (query_message(qid, priority) for qid, priority in lost))
        with self.sessions.begin() as session:
            session.execute(
                update(Query).where(col(Query.id).in_([q for q, _ in lost])).values(enqueued_at=now)
            )
        log.info("re-enqueued %d queries whose messages were lost", len(lost))
        return len(lost)


def reconcile(sessions: sessionmaker[Session], broker: RedisBroker, now: int | None = None) -> int:
    """One full pass from the start (tests, one-off use)."""
    return Reconciler(sessions, broker).run(now)
