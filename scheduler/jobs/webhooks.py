"""Webhook dispatch: sends due deliveries, schedules retries, marks exhausted ones failed.

Each run claims a page of due deliveries (pushing their ``next_attempt_at`` past the attempt's
own timeout, so a second dispatcher or a crashed run cannot send one twice at once), sends them
concurrently, then writes each outcome. Retries follow ``CONCLAVE_WEBHOOK_RETRY_SCHEDULE``
(attempt n+1 waits schedule[n] seconds, ±10% jitter) or the receiver's ``Retry-After`` when
longer; the last attempt failing marks the delivery ``failed``, listed and redeliverable.
A 410 disables the endpoint; a URL refused by the SSRF guard fails at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.db import affected
from shared.lifecycle.statuses import DeliveryStatus
from shared.metrics import MetricsBuffer
from shared.models import Tenant, WebhookDelivery, WebhookEndpoint
from shared.webhooks.delivery import AttemptResult, attempt_delivery, make_delivery_client
from shared.webhooks.signing import webhook_headers

log = logging.getLogger("conclave.webhooks")

PAGE = 200
TIMEOUT_S = 15.0
# A claimed delivery is not due again before its attempt has surely finished.
CLAIM_S = int(TIMEOUT_S * 2 + 5)


@dataclass(frozen=True)
class Due:
    id: str
    tenant_id: str
    endpoint_id: str | None
    url: str
    body: str
    attempts: int


def tenant_secrets(session: Session, tenant_ids: set[str], now: int) -> dict[str, list[str]]:
    """Signing secrets per tenant: the current one, plus the previous one during a rotation's overlap."""
    secrets: dict[str, list[str]] = {}
    rows = session.execute(
        select(
            col(Tenant.id),
            col(Tenant.webhook_secret),
            col(Tenant.previous_webhook_secret),
            col(Tenant.previous_secret_expires_at),
        ).where(col(Tenant.id).in_(tenant_ids))
    ).all()
    for tid, current, previous, expires in rows:
        secrets[tid] = [current] + ([previous] if previous and expires and expires > now else [])
    return secrets


class Dispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        schedule: list[int],
        allow_private: bool,
        rng: random.Random | None = None,
        metrics: MetricsBuffer | None = None,
    ):
        self.metrics = metrics
        self.sessions = sessions
        self.schedule = schedule
        self.allow_private = allow_private
        self._rng = rng or random.Random()

    def run(self, now: int | None = None) -> int:
        """Send what is due; returns how many attempts were made."""
        now = now or int(time.time())
        due = self._claim(now)
        if not due:
            return 0
        with self.sessions() as session:
            secrets = tenant_secrets(session, {d.tenant_id for d in due}, now)
        results = asyncio.run(self._send_all(due, secrets))
        with self.sessions.begin() as session:
            for delivery, result in zip(due, results, strict=True):
                self._record(session, delivery, result, int(time.time()))
        if self.metrics is not None:
            for result in results:
                self.metrics.inc("webhook_deliveries", result.outcome)
            self.metrics.flush()
        return len(due)

    def _claim(self, now: int) -> list[Due]:
        with self.sessions.begin() as session:
            rows = session.execute(
                select(
                    col(WebhookDelivery.id),
                    col(WebhookDelivery.tenant_id),
                    col(WebhookDelivery.endpoint_id),
                    col(WebhookDelivery.url),
                    col(WebhookDelivery.body),
                    col(WebhookDelivery.attempts),
                    col(WebhookDelivery.next_attempt_at),
                )
                .where(
                    col(WebhookDelivery.status) == DeliveryStatus.PENDING,
                    col(WebhookDelivery.next_attempt_at) <= now,
                )
                .order_by(col(WebhookDelivery.next_attempt_at))
                .limit(PAGE)
            ).all()
            claimed = []
            for row in rows:
                # Conditional on the value just read: of two dispatchers, one claims each row.
                won = affected(
                    session.execute(
                        update(WebhookDelivery)
                        .where(
                            col(WebhookDelivery.id) == row.id,
                            col(WebhookDelivery.status) == DeliveryStatus.PENDING,
                            col(WebhookDelivery.next_attempt_at) == row.next_attempt_at,
                        )
                        .values(next_attempt_at=now + CLAIM_S)
                    )
                )
                if won:
                    claimed.append(
                        Due(row.id, row.tenant_id, row.endpoint_id, row.url, row.body, row.attempts)
                    )
        return claimed

    async def _send_all(self, due: list[Due], secrets: dict[str, list[str]]) -> list[AttemptResult]:
        async with make_delivery_client(TIMEOUT_S) as client:

            async def send(d: Due) -> AttemptResult:
                body = d.body.encode()
                try:
                    headers = webhook_headers(secrets.get(d.tenant_id, []), d.id, int(time.time()), body)
                    return await attempt_delivery(
                        client, d.url, headers, body, allow_private=self.allow_private, timeout_s=TIMEOUT_S
                    )
                except Exception as exc:  # one broken delivery must not stop the others
                    log.exception("delivery %s crashed", d.id)
                    return AttemptResult("retry", None, f"internal: {type(exc).__name__}", None, None)

            return list(await asyncio.gather(*(send(d) for d in due)))

    def _record(self, session: Session, d: Due, result: AttemptResult, now: int) -> None:
        attempts = d.attempts + 1
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_attempt_at": now,
            "last_status_code": result.status_code,
            "last_error": (result.error or "")[:500] or None,
        }
        if result.outcome == "delivered":
            values.update(status=DeliveryStatus.DELIVERED, delivered_at=now)
        elif result.outcome in ("gone", "refused") or attempts >= len(self.schedule):
            values.update(status=DeliveryStatus.FAILED)
        else:
            delay = self.schedule[attempts] * self._rng.uniform(0.9, 1.1)
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            values.update(next_attempt_at=now + max(0, round(delay)))
        session.execute(update(WebhookDelivery).where(col(WebhookDelivery.id) == d.id).values(**values))
        if result.outcome == "gone" and d.endpoint_id:
            session.execute(
                update(WebhookEndpoint)
                .where(col(WebhookEndpoint.id) == d.endpoint_id)
                .values(enabled=False, disabled_reason="the endpoint answered 410 Gone")
            )
            # Nothing more goes to a disabled endpoint.
            session.execute(
                update(WebhookDelivery)
                .where(
                    col(WebhookDelivery.endpoint_id) == d.endpoint_id,
                    col(WebhookDelivery.status) == DeliveryStatus.PENDING,
                )
                .values(status=DeliveryStatus.FAILED, last_error="endpoint disabled (410 Gone)")
            )
        if values.get("status") == DeliveryStatus.FAILED:
            log.warning("webhook delivery %s failed after %d attempt(s)", d.id, attempts)
