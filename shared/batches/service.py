"""The batch service: accept a batch (admission, bulk insert, pipelined enqueue) and cancel it.

Routes call these functions. Accepting a batch commits the rows first and enqueues second: a
worker can never pick up a message for a row that is not there yet, and if the process dies in
between, the queued rows are still the truth and reconciliation enqueues them. Status changes
go through ``shared/lifecycle``; reads through ``shared/batches/read.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import RedisError
from sqlalchemy import delete, insert, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.batches import admission
from shared.batches.read import Counts, counts_for, get_batch
from shared.db import write_transaction
from shared.errors import Conflict, DependencyDown, InvalidField
from shared.ids import new_id, new_ids
from shared.lifecycle.statuses import BatchStatus, QueryStatus
from shared.lifecycle.transitions import begin_cancel, finalize_if_done
from shared.models import BATCHES, QUERIES, Batch, Query
from shared.providers.config import Catalog
from shared.queue.contract import query_message
from shared.queue.enqueue import enqueue_messages
from shared.quota import Reservation, reserve_daily_quota
from shared.schemas import BatchCreate
from shared.settings import Settings, TierLimits, parse_window
from shared.webhooks.endpoints import check_webhook_url

log = logging.getLogger("conclave.batches")


# ---------------------------------------------------------------- create


def create_batch(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    catalog: Catalog,
    settings: Settings,
    *,
    tenant_id: str,
    payload: BatchCreate,
    idempotency_key: str | None = None,
    limits: TierLimits | None = None,
    budget: float | Literal["lookup"] | None = "lookup",
    trace: dict[str, str] | None = None,
) -> tuple[Batch, Counts, bool]:
    """Store and enqueue a batch. Returns (batch, counts, created); ``created`` is False for a replay.
    ``budget``: the tenant's monthly budget when the caller knows it (the API's principal
    carries it), saving a read per request; ``"lookup"`` reads it from the tenant."""
    fingerprint = admission.request_fingerprint(payload) if idempotency_key else None
    if idempotency_key:
        with sessions() as session:
            existing = _by_idempotency_key(session, tenant_id, idempotency_key)
            if existing is not None:
                return _replay(session, existing, fingerprint)

    admission.check_queries(payload, settings)
    if limits is not None:
        admission.check_tier(limits, payload)
    council = admission.resolve_council(payload, catalog)
    metadata = admission.check_metadata(payload.metadata)
    if payload.webhook_url is not None:
        check_webhook_url(
            payload.webhook_url, allow_private=settings.webhook_allow_private, param="webhook_url"
        )
    admission.check_budget(sessions, settings, tenant_id, budget)
    window = payload.completion_window or settings.default_completion_window
    try:
        window_s = parse_window(window)
    except ValueError as exc:
        raise InvalidField(str(exc), param="completion_window") from exc
    reservation = None
    if limits is not None and limits.queries_per_day is not None:
        reservation = reserve_daily_quota(
            broker.client, broker.namespace, sessions, tenant_id, len(payload.queries), limits.queries_per_day
        )
    try:
        return _store_and_enqueue(
            sessions,
            broker,
            tenant_id,
            payload,
            idempotency_key,
            fingerprint,
            council,
            metadata,
            window,
            window_s,
            trace,
            reservation,
        )
    except BaseException:
        if reservation is not None:
            reservation.release()
        raise


def _store_and_enqueue(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    tenant_id: str,
    payload: BatchCreate,
    idempotency_key: str | None,
    fingerprint: str | None,
    council: dict[str, Any],
    metadata: dict[str, str],
    window: str,
    window_s: int,
    trace: dict[str, str] | None,
    reservation: Reservation | None,
) -> tuple[Batch, Counts, bool]:

    now = int(time.time())
    batch = Batch(
        id=new_id("batch"),
        tenant_id=tenant_id,
        status=BatchStatus.IN_PROGRESS,
        priority=payload.priority,
        council=council,
        knowledge=payload.knowledge.model_dump() if payload.knowledge else None,
        webhook_url=payload.webhook_url,
        meta=metadata,
        completion_window=window,
        total=len(payload.queries),
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        created_at=now,
        in_progress_at=now,
        expires_at=now + window_s,
    )
    query_ids = new_ids("query", len(payload.queries))
    rows = [
        {
            "id": qid,
            "batch_id": batch.id,
            "tenant_id": tenant_id,
            "seq": i,
            "custom_id": q.custom_id,
            "status": QueryStatus.QUEUED,
            "priority": payload.priority,
            "request": _request_doc(q),
            "attempts": 0,
            "enqueued_at": now,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": 0.0,
        }
        for i, (qid, q) in enumerate(zip(query_ids, payload.queries, strict=True))
    ]
    try:
        with write_transaction(sessions) as session:
            # Core inserts: the ORM's unit of work costs more than the statement for one row.
            session.execute(insert(BATCHES), [_batch_row(batch)])
            session.execute(insert(QUERIES), rows)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # Lost the race with an identical concurrent request: answer with the winner.
        with sessions() as session:
            existing = _by_idempotency_key(session, tenant_id, idempotency_key)
            if existing is None:
                raise
            if reservation is not None:
                reservation.release()  # the winner reserved these queries already
            return _replay(session, existing, fingerprint)

    try:
        enqueue_messages(broker, (query_message(qid, payload.priority, trace) for qid in query_ids))
    except RedisError as exc:
        log.warning(
            "enqueue of batch %s failed (%s: %s); removing its rows", batch.id, type(exc).__name__, exc
        )
        # Nothing half-stored: the client is told to retry, and the rows go away.
        with sessions.begin() as session:
            session.execute(delete(QUERIES).where(col(Query.batch_id) == batch.id))
            session.execute(delete(BATCHES).where(col(Batch.id) == batch.id))
        raise DependencyDown("the queue is unavailable; nothing was stored, retry later") from exc
    return batch, Counts(total=batch.total, queued=batch.total), True


_BATCH_COLUMNS = [(a.key, a.columns[0].key) for a in sa_inspect(Batch).column_attrs]


def _batch_row(batch: Batch) -> dict[str, Any]:
    """The batch as a Core insert wants it: keyed by column (``meta`` is stored as ``metadata``)."""
    return {column: getattr(batch, attr) for attr, column in _BATCH_COLUMNS}


def _request_doc(q: Any) -> dict[str, Any]:
    messages = (
        [{"role": "user", "content": q.prompt}]
        if q.prompt is not None
        else [{"role": m.role, "content": m.content} for m in q.messages]
    )
    return {"messages": messages, "max_tokens": q.max_tokens, "temperature": q.temperature}


def _by_idempotency_key(session: Session, tenant_id: str, key: str) -> Batch | None:
    return session.scalars(
        select(Batch).where(col(Batch.tenant_id) == tenant_id, col(Batch.idempotency_key) == key)
    ).first()


def _replay(session: Session, batch: Batch, fingerprint: str | None) -> tuple[Batch, Counts, bool]:
    if batch.request_hash != fingerprint:
        raise Conflict("this Idempotency-Key was used with a different request body", param="Idempotency-Key")
    return batch, counts_for(session, [batch.id])[batch.id], False


# ---------------------------------------------------------------- cancel


def cancel_batch(sessions: sessionmaker[Session], tenant_id: str, batch_id: str) -> tuple[Batch, Counts]:
    """Queued queries become cancelled at once; running ones may finish; the last one out
    (or this call, when none runs) moves the batch to ``cancelled``."""
    now = int(time.time())
    with sessions.begin() as session:
        get_batch(session, tenant_id, batch_id)
        begin_cancel(session, batch_id, now)
    # Checked after the commit, in a new transaction, so that this call or the worker that
    # commits last always sees every terminal query (see lifecycle.transitions.finalize_if_done).
    with sessions.begin() as session:
        finalize_if_done(session, batch_id, now=now)
        batch = get_batch(session, tenant_id, batch_id)
        return batch, counts_for(session, [batch_id])[batch_id]
