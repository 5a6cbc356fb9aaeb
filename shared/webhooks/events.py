"""Events become delivery rows, in the same transaction as the state change they report.

``emit`` writes one ``WebhookDelivery`` per target: the batch's own ``webhook_url`` for its
``batch.*`` events, and every enabled tenant endpoint subscribed to the event type. Delivery
itself is the scheduler's job (``scheduler/jobs/webhooks.py``); because the rows commit with
the change, an event is never lost and never emitted twice.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import orjson
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches.read import batch_object, counts_for
from shared.ids import new_id
from shared.lifecycle.statuses import BatchStatus, DeliveryStatus
from shared.models import DELIVERIES, Batch, Notice, WebhookEndpoint

log = logging.getLogger("conclave.webhooks")

EventType = Literal[
    "batch.completed",
    "batch.cancelled",
    "batch.expired",
    "cost.budget_warning",
    "cost.budget_exceeded",
    "cost.daily_summary",
    "batch.at_risk",
    "provider.degraded",
    "provider.recovered",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
BATCH_EVENTS: dict[str, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.CANCELLED: "batch.cancelled",
    BatchStatus.EXPIRED: "batch.expired",
}


def emit(
    session: Session,
    tenant_id: str,
    event_type: str,
    data: dict[str, Any],
    *,
    batch_id: str | None = None,
    batch_webhook_url: str | None = None,
    now: int | None = None,
) -> list[str]:
    """Queue ``event_type`` for every target; returns the delivery ids. Caller commits."""
    now = now or int(time.time())
    body = orjson.dumps(
        {"type": event_type, "timestamp": datetime.fromtimestamp(now, UTC).isoformat(), "data": data}
    ).decode()
    targets: list[tuple[str | None, str]] = []
    if batch_webhook_url and event_type.startswith("batch."):
        targets.append((None, batch_webhook_url))
    endpoints = session.execute(
        select(col(WebhookEndpoint.id), col(WebhookEndpoint.url), col(WebhookEndpoint.events)).where(
            col(WebhookEndpoint.tenant_id) == tenant_id, col(WebhookEndpoint.enabled).is_(True)
        )
    ).all()
    targets += [(e.id, e.url) for e in endpoints if event_type in e.events or "*" in e.events]
    rows = [
        {
            "id": new_id("msg"),
            "tenant_id": tenant_id,
            "endpoint_id": endpoint_id,
            "batch_id": batch_id,
            "url": url,
            "event_type": event_type,
            "body": body,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for endpoint_id, url in targets
    ]
    if rows:
        session.execute(insert(DELIVERIES), rows)
    return [str(r["id"]) for r in rows]


def emit_once(
    sessions: sessionmaker[Session],
    tenant_id: str,
    kind: str,
    period: str,
    data: dict[str, Any],
    now: int,
    *,
    batch_id: str | None = None,
    batch_webhook_url: str | None = None,
) -> bool:
    """Emit ``kind`` to the tenant once per ``period``: a ``Notice`` with a unique (tenant, kind,
    period) commits with the event, so two processes (or two runs of a job) cannot both send it.
    Returns whether this call sent it."""
    try:
        with sessions.begin() as session:
            session.add(Notice(tenant_id=tenant_id, kind=kind, period=period, created_at=now))
            session.flush()
            emit(
                session,
                tenant_id,
                kind,
                data,
                batch_id=batch_id,
                batch_webhook_url=batch_webhook_url,
                now=now,
            )
    except IntegrityError:
        return False  # already sent for this period
    log.info("%s sent to tenant %s for %s", kind, tenant_id, period)
    return True


def once_period(key: str) -> str:
    """A ``Notice`` period (16 characters) standing for any key: a batch id, a provider's
    degradation episode. 64 bits of SHA-256: two keys of one tenant and kind do not collide."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def subscribers(session: Session, event_type: str) -> list[str]:
    """The tenants with an enabled endpoint subscribed to ``event_type`` (or to ``*``): who
    hears of an event that belongs to no tenant (a provider's health)."""
    rows = session.execute(
        select(col(WebhookEndpoint.tenant_id), col(WebhookEndpoint.events)).where(
            col(WebhookEndpoint.enabled).is_(True)
        )
    ).all()
    return sorted({r.tenant_id for r in rows if event_type in r.events or "*" in r.events})


def emit_batch_event(session: Session, batch_id: str, final_status: str, now: int | None = None) -> list[str]:
    """The ``batch.*`` event for a batch that just reached ``final_status`` (data = the batch object)."""
    event_type = BATCH_EVENTS.get(final_status)
    batch = session.get(Batch, batch_id)
    if event_type is None or batch is None:
        return []
    data = batch_object(batch, counts_for(session, [batch_id])[batch_id], now)
    return emit(
        session,
        batch.tenant_id,
        event_type,
        data,
        batch_id=batch_id,
        batch_webhook_url=batch.webhook_url,
        now=now,
    )
