"""Tenant-facing webhook management: endpoints, the signing secret and its rotation, deliveries.

Routes call these; the SSRF guard runs at registration (and again at every delivery).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.db import id_page
from shared.errors import InvalidField, NotFound
from shared.ids import new_id
from shared.lifecycle.statuses import DeliveryStatus
from shared.models import Tenant, WebhookDelivery, WebhookEndpoint
from shared.tenants import new_webhook_secret
from shared.webhooks.events import EVENT_TYPES
from shared.webhooks.ssrf import UnsafeURL, check_url

ROTATION_OVERLAP_S = 24 * 3600
MAX_ENDPOINTS = 20


def check_webhook_url(url: str, *, allow_private: bool, param: str = "url") -> None:
    try:
        check_url(url, allow_private=allow_private)
    except UnsafeURL as exc:
        raise InvalidField(f"webhook URL refused: {exc}", param=param) from exc


def endpoint_object(e: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "webhook_endpoint",
        "url": e.url,
        "events": e.events,
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "created_at": e.created_at,
    }


def register_endpoint(
    session: Session, tenant_id: str, url: str, events: list[str], *, allow_private: bool
) -> WebhookEndpoint:
    unknown = [e for e in events if e not in EVENT_TYPES and e != "*"]
    if not events or unknown:
        raise InvalidField(
            f"events must be a non-empty list of {', '.join(EVENT_TYPES)} (or '*'); unknown: {unknown}",
            param="events",
        )
    check_webhook_url(url, allow_private=allow_private)
    count = len(
        session.scalars(
            select(col(WebhookEndpoint.id)).where(col(WebhookEndpoint.tenant_id) == tenant_id)
        ).all()
    )
    if count >= MAX_ENDPOINTS:
        raise InvalidField(f"a tenant has at most {MAX_ENDPOINTS} endpoints", param="url")
    endpoint = WebhookEndpoint(
        id=new_id("we"), tenant_id=tenant_id, url=url, events=sorted(set(events)), created_at=int(time.time())
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def list_endpoints(session: Session, tenant_id: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(col(WebhookEndpoint.tenant_id) == tenant_id)
            .order_by(col(WebhookEndpoint.id))
        )
    )


def delete_endpoint(session: Session, tenant_id: str, endpoint_id: str) -> None:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.tenant_id != tenant_id:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}", param="webhook_id")
    session.execute(
        update(WebhookDelivery)
        .where(
            col(WebhookDelivery.endpoint_id) == endpoint_id,
            col(WebhookDelivery.status) == DeliveryStatus.PENDING,
        )
        .values(status=DeliveryStatus.FAILED, last_error="endpoint deleted")
    )
    session.delete(endpoint)


def current_secret(session: Session, tenant_id: str) -> str:
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    return tenant.webhook_secret


def rotate_secret(session: Session, tenant_id: str) -> tuple[str, int]:
    """A new secret; the old one keeps signing beside it for 24 h. Returns (secret, old_expires_at)."""
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    now = int(time.time())
    tenant.previous_webhook_secret = tenant.webhook_secret
    tenant.previous_secret_expires_at = now + ROTATION_OVERLAP_S
    tenant.webhook_secret = new_webhook_secret()
    session.flush()
    return tenant.webhook_secret, tenant.previous_secret_expires_at


def delivery_object(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "object": "webhook_delivery",
        "event_type": d.event_type,
        "url": d.url,
        "endpoint_id": d.endpoint_id,
        "batch_id": d.batch_id,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at if d.status == DeliveryStatus.PENDING else None,
        "last_attempt_at": d.last_attempt_at,
        "last_status_code": d.last_status_code,
        "last_error": d.last_error,
        "delivered_at": d.delivered_at,
        "created_at": d.created_at,
    }


def list_deliveries(
    session: Session, tenant_id: str, *, status: str | None, limit: int, after: str | None
) -> tuple[list[WebhookDelivery], bool]:
    stmt = select(WebhookDelivery).where(col(WebhookDelivery.tenant_id) == tenant_id)
    if status:
        stmt = stmt.where(col(WebhookDelivery.status) == status)
    return id_page(session, stmt, col(WebhookDelivery.id), limit=limit, after=after)


def redeliver(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    """Send a delivery again from the start of the schedule (same ``webhook-id``)."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise NotFound(f"no webhook delivery {delivery_id!r}", param="delivery_id")
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = int(time.time())
    delivery.delivered_at = None
    session.flush()
    return delivery
