"""Breakdowns of the provider-call ledger and of query outcomes for the dashboard: a batch's
failures by error type and per-member latency and cost, and per-model figures for a tenant.

Read-only and derived, like ``shared.usage``: every figure is a grouped query over
``queries`` or ``provider_calls``; nothing is stored twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.lifecycle.statuses import CallStatus, QueryStatus
from shared.models import PROVIDER_CALLS, QUERIES

# Latency percentiles read at most this many recent calls per model.
LATENCY_SAMPLE = 5_000


def failures_by_type(session: Session, batch_id: str) -> dict[str, int]:
    """Failed queries of the batch counted by their error type, most frequent first."""
    q = QUERIES.c
    # Grouped on the extracted type: PostgreSQL has no equality for a whole ``json`` value.
    kind = func.coalesce(q.error["type"].as_string(), "unknown")
    rows = session.execute(
        select(kind, func.count())
        .where(q.batch_id == batch_id, q.status == QueryStatus.FAILED)
        .group_by(kind)
        .order_by(func.count().desc(), kind)
    ).all()
    return {str(k): int(n) for k, n in rows}


def model_figures(
    session: Session, *, batch_id: str | None = None, tenant_id: str | None = None, since: int | None = None
) -> list[dict[str, Any]]:
    """Per model: calls (cache hits among them), failed calls by category, p50/p95 latency of
    the calls a provider answered, tokens and cost — for one batch, or for a tenant since a time."""
    c = PROVIDER_CALLS.c
    where = []
    if batch_id is not None:
        where.append(c.batch_id == batch_id)
    if tenant_id is not None:
        where.append(c.tenant_id == tenant_id)
    if since is not None:
        where.append(c.created_at >= since)
    totals = session.execute(
        select(
            c.model,
            func.count(),
            func.coalesce(func.sum(c.input_tokens + c.output_tokens), 0),
            func.coalesce(func.sum(c.cost_usd), 0.0),
        )
        .where(*where)
        .group_by(c.model)
        .order_by(c.model)
    ).all()
    cached: dict[str, int] = {
        model: int(n)
        for model, n in session.execute(
            select(c.model, func.count()).where(*where, c.status == CallStatus.CACHED).group_by(c.model)
        ).all()
    }
    errors: dict[str, dict[str, int]] = {}
    for model, category, n in session.execute(
        select(c.model, c.error_category, func.count())
        .where(*where, c.status == CallStatus.FAILED)
        .group_by(c.model, c.error_category)
    ).all():
        errors.setdefault(model, {})[category or "unknown"] = int(n)
    out = []
    for model, calls, tokens, cost in totals:
        latencies = sorted(
            int(v)
            for v in session.scalars(
                # A call answered from the cache took no provider time: it would flatter the model.
                select(c.latency_ms)
                .where(*where, c.model == model, c.status != CallStatus.CACHED)
                .order_by(c.id.desc())
                .limit(LATENCY_SAMPLE)
            )
        )
        failed = sum(errors.get(model, {}).values())
        out.append(
            {
                "model": model,
                "calls": int(calls),
                "failed": failed,
                "cached": cached.get(model, 0),
                "error_rate": round(failed / calls, 4) if calls else 0.0,
                "errors": errors.get(model, {}),
                "latency_p50_ms": quantile(latencies, 0.50),
                "latency_p95_ms": quantile(latencies, 0.95),
                "tokens": int(tokens),
                "cost_usd": round(float(cost), 8),
            }
        )
    return out


def cost_since(session: Session, since: int) -> float:
    """Cost of every call of the deployment since ``since`` (the operator's "cost today")."""
    c = PROVIDER_CALLS.c
    return round(
        float(
            session.scalar(select(func.coalesce(func.sum(c.cost_usd), 0.0)).where(c.created_at >= since))
            or 0.0
        ),
        8,
    )


def quantile(ordered: list[int], q: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
