"""The batch service: accept a batch (validate, bulk insert, pipelined enqueue), read, list, cancel.

Routes call these functions; only this module and ``shared/queries.py`` write batches and
queries. Accepting a batch commits the rows first and enqueues second: a worker can never
pick up a message for a row that is not there yet, and if the process dies in between, the
queued rows are still the truth and reconciliation enqueues them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import RedisError
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from api.schemas import BatchCreate
from shared.db import affected, write_transaction
from shared.errors import (
    Conflict,
    DependencyDown,
    Forbidden,
    InvalidField,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
)
from shared.ids import new_id, new_ids
from shared.models import BATCH_TERMINAL, BATCHES, QUERIES, Batch, Query, Tenant
from shared.providers.config import Catalog
from shared.queries import finalize_if_done
from shared.quota import Reservation, reserve_daily_quota
from shared.settings import Settings, TierLimits, parse_window
from shared.usage import budget_for, month_to_date_cost
from shared.webhooks.endpoints import check_webhook_url
from workers.broker import enqueue_messages, query_message

log = logging.getLogger("conclave.batches")

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512


@dataclass(frozen=True)
class Counts:
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    queued: int = 0
    running: int = 0
    cancelled: int = 0
    expired: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def terminal(self) -> int:
        return self.succeeded + self.failed + self.cancelled + self.expired


# ---------------------------------------------------------------- validation


def _check_queries(payload: BatchCreate, settings: Settings) -> None:
    if not payload.queries:
        raise InvalidField("queries must hold at least one query", param="queries")
    if len(payload.queries) > settings.max_batch_queries:
        raise PayloadTooLarge(
            f"a batch holds at most {settings.max_batch_queries} queries, got {len(payload.queries)}",
            param="queries",
        )
    seen: dict[str, int] = {}
    for i, q in enumerate(payload.queries):
        if (q.prompt is None) == (q.messages is None):
            raise InvalidField(
                "exactly one of 'prompt' or 'messages' is required", param=f"queries[{i}].prompt"
            )
        if q.custom_id in seen:
            raise InvalidField(
                f"custom_id {q.custom_id!r} is used by queries[{seen[q.custom_id]}] too",
                param=f"queries[{i}].custom_id",
            )
        seen[q.custom_id] = i
        size = len(q.prompt) if q.prompt is not None else sum(len(m.content) for m in q.messages or ())
        if size > settings.max_prompt_chars:
            raise InvalidField(
                f"query text is {size} characters; the limit is {settings.max_prompt_chars}",
                param=f"queries[{i}].{'prompt' if q.prompt is not None else 'messages'}",
            )
        if q.messages is not None and not any(m.role == "user" for m in q.messages):
            raise InvalidField("messages need at least one 'user' message", param=f"queries[{i}].messages")


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    if len(metadata) > METADATA_MAX_KEYS:
        raise InvalidField(f"metadata holds at most {METADATA_MAX_KEYS} keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            raise InvalidField(
                f"metadata keys are at most {METADATA_MAX_KEY} characters", param=f"metadata.{key[:64]}"
            )
        if len(value) > METADATA_MAX_VALUE:
            raise InvalidField(
                f"metadata values are at most {METADATA_MAX_VALUE} characters", param=f"metadata.{key}"
            )
    return metadata


def resolve_council(payload: BatchCreate, catalog: Catalog) -> dict[str, Any]:
    """The batch's council with omitted parts filled from the configured defaults."""
    council = payload.council
    mode = council.mode if council else "council"
    members = list(council.members) if council and council.members else list(catalog.members)
    chairman = council.chairman if council and council.chairman else catalog.chairman
    if len(set(members)) != len(members):
        raise InvalidField("council members must be distinct", param="council.members")
    for i, model in enumerate(members):
        problem = catalog.check_model(model)
        if problem:
            raise InvalidField(problem, param=f"council.members[{i}]")
    problem = catalog.check_model(chairman)
    if problem:
        raise InvalidField(problem, param="council.chairman")
    return {"mode": mode, "members": members, "chairman": chairman}


def request_fingerprint(payload: BatchCreate) -> str:
    return hashlib.sha256(
        orjson.dumps(payload.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


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
    fingerprint = request_fingerprint(payload) if idempotency_key else None
    if idempotency_key:
        with sessions() as session:
            existing = _by_idempotency_key(session, tenant_id, idempotency_key)
            if existing is not None:
                return _replay(session, existing, fingerprint)

    _check_queries(payload, settings)
    if limits is not None:
        _check_tier(sessions, limits, tenant_id, payload)
    council = resolve_council(payload, catalog)
    metadata = _check_metadata(payload.metadata)
    if payload.webhook_url is not None:
        check_webhook_url(
            payload.webhook_url, allow_private=settings.webhook_allow_private, param="webhook_url"
        )
    _check_budget(sessions, settings, tenant_id, budget)
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
        status="in_progress",
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
            "status": "queued",
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


PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


def _check_tier(
    sessions: sessionmaker[Session], limits: TierLimits, tenant_id: str, payload: BatchCreate
) -> None:
    if len(payload.queries) > limits.max_batch_queries:
        raise PayloadTooLarge(
            f"your tier allows batches of at most {limits.max_batch_queries} queries, "
            f"got {len(payload.queries)}",
            param="queries",
        )
    if PRIORITY_RANK[payload.priority] > PRIORITY_RANK[limits.max_priority]:
        raise Forbidden(
            f"your tier allows priority up to {limits.max_priority!r}, not {payload.priority!r}",
            param="priority",
        )


def _check_budget(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant_id: str,
    budget: float | Literal["lookup"] | None = "lookup",
) -> None:
    if budget is None:
        return  # no budget: nothing to read
    with sessions() as session:
        if budget == "lookup":
            tenant = session.get(Tenant, tenant_id)
            budget = budget_for(tenant, settings) if tenant else None
            if budget is None:
                return
        spent = month_to_date_cost(session, tenant_id, int(time.time()))
    if spent >= budget:
        raise PaymentRequired(
            f"this month's budget of ${budget:,.2f} is spent (${spent:,.2f}); new batches are refused"
        )


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


# ---------------------------------------------------------------- read


def counts_for(session: Session, batch_ids: Sequence[str]) -> dict[str, Counts]:
    """Per-batch status counts and usage in one grouped query (always consistent: derived)."""
    acc: dict[str, dict[str, Any]] = {bid: {} for bid in batch_ids}
    if not batch_ids:
        return {}
    rows = session.execute(
        select(
            col(Query.batch_id),
            col(Query.status),
            func.count(),
            func.coalesce(func.sum(col(Query.input_tokens)), 0),
            func.coalesce(func.sum(col(Query.output_tokens)), 0),
            func.coalesce(func.sum(col(Query.cost_usd)), 0.0),
        )
        .where(col(Query.batch_id).in_(batch_ids))
        .group_by(col(Query.batch_id), col(Query.status))
    ).all()
    for batch_id, status, n, tin, tout, cost in rows:
        d = acc[batch_id]
        d[status] = d.get(status, 0) + n
        d["total"] = d.get("total", 0) + n
        d["input_tokens"] = d.get("input_tokens", 0) + int(tin)
        d["output_tokens"] = d.get("output_tokens", 0) + int(tout)
        d["cost_usd"] = d.get("cost_usd", 0.0) + float(cost)
    return {bid: Counts(**d) for bid, d in acc.items()}


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    # Another tenant's batch is indistinguishable from a missing one.
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return batch


def list_batches(
    session: Session, tenant_id: str, *, limit: int, after: str | None, status: str | None
) -> tuple[list[Batch], bool]:
    stmt = select(Batch).where(col(Batch.tenant_id) == tenant_id)
    if status:
        stmt = stmt.where(col(Batch.status) == status)
    if after:
        # Ids are time-ordered, so "newest first after X" is simply "id < X".
        stmt = stmt.where(col(Batch.id) < after)
    rows = list(session.scalars(stmt.order_by(col(Batch.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def batch_object(batch: Batch, counts: Counts, now: int | None = None) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/council",
        "status": batch.status,
        "priority": batch.priority,
        "council": batch.council,
        "knowledge": batch.knowledge,
        "webhook_url": batch.webhook_url,
        "metadata": batch.meta,
        "completion_window": batch.completion_window,
        "input_file_id": batch.input_file_id,
        "output_file_id": None,
        "error_file_id": None,
        "errors": batch.errors,
        "request_counts": {
            "total": batch.total,
            "completed": counts.succeeded,
            "failed": counts.failed,
            "queued": counts.queued,
            "running": counts.running,
            "cancelled": counts.cancelled,
            "expired": counts.expired,
        },
        "usage": {
            "input_tokens": counts.input_tokens,
            "output_tokens": counts.output_tokens,
            "total_tokens": counts.input_tokens + counts.output_tokens,
        },
        "cost_usd": round(counts.cost_usd, 8),
        "eta_seconds": _eta(batch, counts, now or int(time.time())),
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "expires_at": batch.expires_at,
        "expired_at": batch.expired_at,
        "failed_at": batch.failed_at,
    }


def _eta(batch: Batch, counts: Counts, now: int) -> int | None:
    if batch.status in BATCH_TERMINAL:
        return 0
    done = counts.terminal
    if done == 0 or batch.in_progress_at is None:
        return None
    elapsed = max(1, now - batch.in_progress_at)
    return int(elapsed / done * (batch.total - done))


# ---------------------------------------------------------------- cancel


def cancel_batch(sessions: sessionmaker[Session], tenant_id: str, batch_id: str) -> tuple[Batch, Counts]:
    """Queued queries become cancelled at once; running ones may finish; the last one out
    (or this call, when none runs) moves the batch to ``cancelled``."""
    now = int(time.time())
    with sessions.begin() as session:
        get_batch(session, tenant_id, batch_id)
        moved = affected(
            session.execute(
                update(Batch)
                .where(col(Batch.id) == batch_id, col(Batch.status).in_(("validating", "in_progress")))
                .values(status="cancelling", cancelling_at=now)
            )
        )
        if not moved:
            # Decided by the update, not by an earlier read: a batch that finished a moment ago
            # is refused exactly like one that finished long ago.
            status = session.scalar(select(col(Batch.status)).where(col(Batch.id) == batch_id))
            if status not in ("cancelling", "cancelled"):
                raise Conflict(f"batch is already {status}", param="batch_id")
        else:
            # The conditional update is what makes cancel race-free against workers: a worker
            # only runs a query it moved from 'queued' to 'running' itself.
            session.execute(
                update(Query)
                .where(col(Query.batch_id) == batch_id, col(Query.status) == "queued")
                .values(status="cancelled", finished_at=now, lease_expires_at=None)
            )
    # Checked after the commit, in a new transaction, so that this call or the worker that
    # commits last always sees every terminal query (see shared.queries.finalize_if_done).
    with sessions.begin() as session:
        finalize_if_done(session, batch_id, now=now)
        batch = get_batch(session, tenant_id, batch_id)
        return batch, counts_for(session, [batch_id])[batch_id]
