"""Reconciliation: the database is the truth; Redis may lose messages and workers may die.

Each run:
1. queries ``queued`` in the database whose message no longer exists in Redis (a restart
   without persistence, a FLUSHALL, an API that died between commit and enqueue) are enqueued
   again;
2. queries ``running`` on a worker that stopped beating (``shared/liveness.py``) go back to
   ``queued`` and are enqueued again, and the calls it had in flight are marked ``abandoned``
   in the ledger; so do queries whose lease ran out;
3. dramatiq's own maintenance runs on every queue, so messages a dead worker had prefetched
   but not started go back to their queue now rather than at some random later time;
4. a batch whose queries are all terminal but which is still ``in_progress`` or
   ``cancelling`` (its last worker recorded the outcome, then lost the database before it
   could finalise) is finalised, with its event.

Running a query twice at once stays impossible: a worker only runs a query it moved to
``running`` itself, and only the holder it names may write its outcome.

The messages sent again carry no trace context: a query's trace is derived from its id and the
worker links it to the creating request through the batch (``shared/tracing.py``), so a run
after reconciliation lands in the same trace as the first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.lifecycle.statuses import QueryStatus
from shared.lifecycle.transitions import finalize_stragglers, hand_back, stamp_enqueued
from shared.liveness import DEAD_AFTER_S, dead_workers
from shared.models import Batch, Query
from shared.queue.contract import query_message
from shared.queue.enqueue import enqueue_messages
from shared.queue.fair import Lane
from shared.queue.inspect import messages_exist, run_maintenance

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
        with self.sessions.begin() as session:
            done = finalize_stragglers(session, now)
        if done:
            log.warning("finalised %d batches their last worker left unfinished", len(done))

    def _recover_lost_messages(self, now: int) -> int:
        with self.sessions() as session:
            rows = session.execute(
                select(col(Query.id), col(Query.priority), col(Query.batch_id), col(Query.tenant_id))
                .where(
                    col(Query.id) > self._cursor,
                    col(Query.status) == QueryStatus.QUEUED,
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
        lost_ids = {qid for qid, _ in lost}
        lanes = self._lanes([r for r in rows if r.id in lost_ids])
        enqueue_messages(
            self.broker,
            (query_message(qid, priority) for qid, priority in lost),
            lambda m: lanes[m.message_id],
        )
        with self.sessions.begin() as session:
            stamp_enqueued(session, [q for q, _ in lost], now)
        log.info("re-enqueued %d queries whose messages were lost", len(lost))
        return len(lost)

    def _recover_dead_holders(self, now: int) -> int:
        with self.sessions() as session:
            rows = session.execute(
                select(
                    col(Query.id),
                    col(Query.priority),
                    col(Query.worker_id),
                    col(Query.lease_expires_at),
                    col(Query.batch_id),
                    col(Query.tenant_id),
                )
                .where(col(Query.status) == QueryStatus.RUNNING)
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
        priorities = {r.id: r.priority for r in orphans}
        with self.sessions.begin() as session:
            # The calls the dead workers had in flight become ``abandoned`` in the same transaction.
            moved = hand_back(session, [(r.id, r.worker_id) for r in orphans], now, dead=sorted(dead))
        handed_back = [(qid, priorities[qid]) for qid in moved]
        if handed_back:
            moved_ids = set(moved)
            lanes = self._lanes([r for r in orphans if r.id in moved_ids])
            enqueue_messages(
                self.broker,
                (query_message(qid, priority) for qid, priority in handed_back),
                lambda m: lanes[m.message_id],
            )
            log.warning("handed %d queries of dead workers back to the queue", len(handed_back))
        return len(handed_back)

    def _lanes(self, rows: Sequence[Any]) -> dict[str, Lane]:
        """Each query's fair lane (its batch's, due at the batch's window end), for re-sends: they
        take their turn among the tenants' lanes like the first send (the weight Redis has)."""
        batch_ids = {r.batch_id for r in rows}
        with self.sessions() as session:
            deadlines = dict(
                session.execute(
                    select(col(Batch.id), col(Batch.expires_at)).where(col(Batch.id).in_(batch_ids))
                ).all()
            )
        return {r.id: Lane(r.tenant_id, r.batch_id, deadlines.get(r.batch_id, 0)) for r in rows}

    def _dramatiq_maintenance(self) -> None:
        try:
            run_maintenance(self.broker, DEAD_AFTER_S * 1000)
        except redis.RedisError as exc:
            log.warning("queue maintenance skipped: %s", type(exc).__name__)


def reconcile(sessions: sessionmaker[Session], broker: RedisBroker, now: int | None = None) -> int:
    """One full pass from the start (tests, one-off use)."""
    return Reconciler(sessions, broker).run(now)
