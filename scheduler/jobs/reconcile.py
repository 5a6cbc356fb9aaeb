"""Reconciliation: the database is the truth; Redis may lose messages and workers may die.

Each run:
1. queries ``queued`` in the database whose message no longer exists in Redis (a restart
   without persistence, a FLUSHALL, an API that died between commit and enqueue) are enqueued
   again;
2. queries ``running`` on a worker that stopped beating (``workers/heartbeat.py``) go back to
   ``queued`` and are enqueued again; so do those whose lease ran out;
3. dramatiq's own maintenance runs on every queue, so messages a dead worker had prefetched
   but not started go back to their queue now rather than at some random later time;
4. a batch whose queries are all terminal but which is still ``in_progress`` or
   ``cancelling`` (its last worker recorded the outcome, then lost the database before it
   could finalise) is finalised, with its event.

Running a query twice at once stays impossible: a worker only runs a query it moved to
``running`` itself, and only the holder it names may write its outcome.
"""

from __future__ import annotations

import logging
import time

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import affected
from shared.models import QUERY_OPEN, Batch, Query
from shared.queries import finalize_batches
from shared.settings import PRIORITIES
from workers.broker import enqueue_messages, messages_exist, query_message
from workers.heartbeat import DEAD_AFTER_S, dead_workers

log = logging.getLogger("conclave.scheduler")

# A message is only looked for once the query has been queued this long: the API commits
# rows before it enqueues, so a younger query may simply not be enqueued yet.
GRACE_S = 10
# Rows examined per run. A run continues where the previous one stopped (a cursor on the
# query id), so a lost message behind a long backlog of healthy ones is still found.
SCAN_LIMIT = 20_000


class Reconciler:
    def __init__(self, sessions: sessionmaker[Session], broker: RedisBroker):
        self.sessions = sessions
        self.broker = broker
        self._cursor = ""

    def run(self, now: int | None = None) -> int:
        """One pass; returns how many queries were enqueued again."""
        now = now or int(time.time())
        recovered = self._recover_dead_holders(now)
        recovered += self._recover_lost_messages(now)
        self._dramatiq_maintenance()
        self._finalize_stragglers(now)
        return recovered

    def _finalize_stragglers(self, now: int) -> None:
        open_query = exists().where(col(Query.batch_id) == col(Batch.id), col(Query.status).in_(QUERY_OPEN))
        with self.sessions.begin() as session:
            stuck = session.scalars(
                select(col(Batch.id))
                # total > 0: a batch holds its queries from the transaction that created it, so
                # only a (hand-made) empty one has none open without having run any.
                .where(
                    col(Batch.status).in_(("in_progress", "cancelling")),
                    col(Batch.total) > 0,
                    ~open_query,
                )
                .limit(100)
            ).all()
            if stuck:
                done = finalize_batches(session, stuck, now)
                if done:
                    log.warning("finalised %d batches their last worker left unfinished", len(done))

    def _recover_lost_messages(self, now: int) -> int:
        with self.sessions() as session:
            rows = session.execute(
                select(col(Query.id), col(Query.priority))
                .where(
                    col(Query.id) > self._cursor,
                    col(Query.status) == "queued",
                    col(Query.enqueued_at) < now - GRACE_S,
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

    def _recover_dead_holders(self, now: int) -> int:
        with self.sessions() as session:
            rows = session.execute(
                select(col(Query.id), col(Query.priority), col(Query.worker_id), col(Query.lease_expires_at))
                .where(col(Query.status) == "running")
                .limit(SCAN_LIMIT)
            ).all()
        if not rows:
            return 0
        try:
            dead = dead_workers(
                self.broker.client, self.broker.namespace, {r.worker_id for r in rows if r.worker_id}, now
            )
        except redis.RedisError:
            dead = set()
        orphans = [r for r in rows if r.worker_id in dead or (r.lease_expires_at or 0) < now]
        if not orphans:
            return 0
        handed_back = []
        with self.sessions.begin() as session:
            for r in orphans:
                # Conditional on the holder we judged dead: if it finished meanwhile, nothing moves.
                moved = affected(
                    session.execute(
                        update(Query)
                        .where(
                            col(Query.id) == r.id,
                            col(Query.status) == "running",
                            col(Query.worker_id) == r.worker_id
                            if r.worker_id
                            else col(Query.worker_id).is_(None),
                        )
                        .values(status="queued", worker_id=None, lease_expires_at=None, enqueued_at=now)
                    )
                )
                if moved:
                    handed_back.append((r.id, r.priority))
        if handed_back:
            enqueue_messages(self.broker, (query_message(qid, priority) for qid, priority in handed_back))
            log.warning("handed %d queries of dead workers back to the queue", len(handed_back))
        return len(handed_back)

    def _dramatiq_maintenance(self) -> None:
        dispatch = self.broker.scripts["dispatch"]
        try:
            for priority in PRIORITIES:
                dispatch(
                    keys=[self.broker.namespace],
                    args=[
                        "qsize",
                        current_millis(),
                        priority,
                        self.broker.broker_id,
                        DEAD_AFTER_S * 1000,
                        self.broker.dead_message_ttl,
                        1,
                        self.broker._max_unpack_size(),
                    ],
                )
        except redis.RedisError as exc:
            log.warning("queue maintenance skipped: %s", type(exc).__name__)


def reconcile(sessions: sessionmaker[Session], broker: RedisBroker, now: int | None = None) -> int:
    """One full pass from the start (tests, one-off use)."""
    return Reconciler(sessions, broker).run(now)
