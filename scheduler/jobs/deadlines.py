"""Deadlines: a batch that would miss its window at its current rate goes ahead (SPEC §15).

Every few seconds the running batches with queued work are weighed: at the rate a batch has
finished queries so far (the same estimate as its ``eta_seconds``), does the rest finish inside
its window? One that would not is marked urgent in its priority's fair lanes
(``shared/queue/fair.py``): its queries are sent before every tenant's fair share until it
is drained or safe again. A batch with nothing finished yet has no rate; it counts as at risk
once half its window has gone by.

Only the order of what waits changes, and a Redis that lost its lanes simply has no urgent
batches until reconciliation sends their queries again. The one write: a batch found at risk
sends ``batch.at_risk`` (SPEC §13) to its tenant's subscribed endpoints and its own
``webhook_url``, once per batch (a ``Notice`` keyed by the batch id commits with the delivery,
so a batch that turns safe and at risk again, or is weighed again after a Redis restart, is not
announced twice), and the anomaly log (``shared.analytics.anomalies``) lists it.
"""

from __future__ import annotations

import logging
import time

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.analytics.anomalies import iso, record
from shared.batches.read import Counts, batch_object, counts_for, eta_seconds
from shared.lifecycle.statuses import BatchStatus
from shared.models import Batch
from shared.queue.fair import clear_urgent, mark_urgent, urgent_batches
from shared.settings import PRIORITIES
from shared.webhooks.events import emit_once, once_period

log = logging.getLogger("conclave.scheduler")

# Running batches weighed per run, soonest deadline first (the ones that can be at risk first).
SCAN_LIMIT = 2_000


def would_miss(batch: Batch, counts: Counts, now: int) -> bool:
    """Would the batch's queued queries miss its window at the rate it has finished so far?"""
    if counts.queued == 0 or batch.expires_at <= now:
        return False  # nothing waits to be moved, or expiry has it
    started = batch.in_progress_at or batch.created_at
    eta = eta_seconds(batch, counts, now)
    if eta is None:  # nothing finished yet: no rate to project
        return now - started >= (batch.expires_at - started) / 2
    return now + eta > batch.expires_at


def promote_at_risk(
    sessions: sessionmaker[Session], broker: RedisBroker, now: int | None = None
) -> dict[str, list[str]]:
    """Mark the batches that would miss their window urgent, and unmark those safe again.
    Returns the urgent batches per priority."""
    now = now or int(time.time())
    with sessions() as session:
        batches = session.scalars(
            select(Batch)
            .where(col(Batch.status) == BatchStatus.IN_PROGRESS, col(Batch.expires_at) > now)
            .order_by(col(Batch.expires_at))
            .limit(SCAN_LIMIT)
        ).all()
        counts = counts_for(session, [b.id for b in batches])
    at_risk: dict[str, dict[str, int]] = {p: {} for p in PRIORITIES}
    by_id = {b.id: b for b in batches}
    for batch in batches:
        if would_miss(batch, counts[batch.id], now):
            at_risk[batch.priority][batch.id] = batch.expires_at
    urgent: dict[str, list[str]] = {}
    for priority in PRIORITIES:
        before = set(urgent_batches(broker, priority))
        new = {b: d for b, d in at_risk[priority].items() if b not in before}
        if new and mark_urgent(broker, priority, new):
            log.warning("batches %s would miss their window: sent ahead", sorted(new))
        for batch_id in sorted(new):
            announce_at_risk(sessions, broker, by_id[batch_id], counts[batch_id], now)
        # A batch that is safe again (or was not weighed: finished, cancelled) takes its turn again.
        clear_urgent(broker, priority, before - set(at_risk[priority]))
        urgent[priority] = urgent_batches(broker, priority)
    return urgent


def announce_at_risk(
    sessions: sessionmaker[Session], broker: RedisBroker, batch: Batch, counts: Counts, now: int
) -> bool:
    """``batch.at_risk`` (data: the batch object, with its ``eta_seconds``), once per batch."""
    data = batch_object(batch, counts, now)
    sent = emit_once(
        sessions,
        batch.tenant_id,
        "batch.at_risk",
        once_period(batch.id),
        data,
        now,
        batch_id=batch.id,
        batch_webhook_url=batch.webhook_url,
    )
    if sent:
        entry = {"kind": "batch.at_risk", "at": iso(now), "batch_id": batch.id, "tenant_id": batch.tenant_id}
        record(broker.client, broker.namespace, entry | {"expires_at": iso(batch.expires_at)})
    return sent
