"""Usage and cost, derived from the provider-call ledger (SPEC §5.3): reports, month-to-date
spend, and the budget a tenant has. Nothing here is stored twice: totals are always sums of
recorded calls."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.lifecycle.statuses import CallStatus
from shared.models import ApiKey, Batch, ProviderCall, Tenant
from shared.settings import Settings

GroupBy = Literal["day", "provider", "model", "key", "project"]


def _sums() -> list[Any]:
    # A ``cached`` row is a hit (SPEC §14), not a call: counted apart, with what it saved.
    cached = col(ProviderCall.status) == CallStatus.CACHED
    return [
        func.coalesce(func.sum(case((cached, 0), else_=1)), 0).label("calls"),
        func.coalesce(func.sum(case((cached, 1), else_=0)), 0).label("cache_hits"),
        func.coalesce(func.sum(col(ProviderCall.saved_usd)), 0.0).label("cost_saved_usd"),
        func.coalesce(func.sum(col(ProviderCall.input_tokens)), 0).label("input_tokens"),
        func.coalesce(func.sum(col(ProviderCall.output_tokens)), 0).label("output_tokens"),
        func.coalesce(func.sum(col(ProviderCall.cost_usd)), 0.0).label("cost_usd"),
    ]


def _totals(row: Any) -> dict[str, Any]:
    return {
        "calls": int(row.calls),
        "input_tokens": int(row.input_tokens),
        "output_tokens": int(row.output_tokens),
        "total_tokens": int(row.input_tokens) + int(row.output_tokens),
        "cost_usd": round(float(row.cost_usd), 8),
        "cache_hits": int(row.cache_hits),
        "cost_saved_usd": round(float(row.cost_saved_usd), 8),
    }


def usage_report(
    session: Session, tenant_id: str, start: int, end: int, group_by: GroupBy | None
) -> dict[str, Any]:
    """Totals over ``[start, end)`` (Unix seconds) and, if asked, one row per day/provider/model,
    or per key/project (SPEC §17): a call belongs to the key that created its batch (joined
    through ``batches.key_id``), and to that key's project; calls of batches with no key (made
    outside the API, or by keys since deleted) and of keys without a project are under ``null``."""
    where = (
        col(ProviderCall.tenant_id) == tenant_id,
        col(ProviderCall.created_at) >= start,
        col(ProviderCall.created_at) < end,
    )
    total = session.execute(select(*_sums()).where(*where)).one()
    report: dict[str, Any] = {"object": "usage", "from": start, "to": end, **_totals(total)}
    if group_by is None:
        return report
    if group_by in ("key", "project"):
        report["data"] = _by_key(session, where, group_by)
        return report
    if group_by == "model":
        key: Any = col(ProviderCall.model)
    elif group_by == "day":
        key = col(ProviderCall.created_at) - col(ProviderCall.created_at) % 86400
    else:
        key = None
    if key is not None:
        rows = session.execute(
            select(key.label("key"), *_sums()).where(*where).group_by(key).order_by(key)
        ).all()
        groups = [{group_by: _label(group_by, r.key), **_totals(r)} for r in rows]
    else:
        # A model id is "<provider>:<model>": fold the models into their providers.
        by_model = session.execute(
            select(col(ProviderCall.model).label("key"), *_sums())
            .where(*where)
            .group_by(col(ProviderCall.model))
        ).all()
        merged: dict[str, dict[str, Any]] = {}
        for r in by_model:
            provider = str(r.key).partition(":")[0]
            acc = merged.setdefault(
                provider,
                {
                    "calls": 0,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "cost_usd": 0.0,
                    "cache_hits": 0,
                    "cost_saved_usd": 0.0,
                },
            )
            acc["calls"] += int(r.calls)
            acc["input_tokens"] += int(r.input_tokens)
            acc["output_tokens"] += int(r.output_tokens)
            acc["cost_usd"] += float(r.cost_usd)
            acc["cache_hits"] += int(r.cache_hits)
            acc["cost_saved_usd"] += float(r.cost_saved_usd)
        groups = [
            {
                "provider": p,
                **v,
                "total_tokens": v["input_tokens"] + v["output_tokens"],
                "cost_usd": round(v["cost_usd"], 8),
                "cost_saved_usd": round(v["cost_saved_usd"], 8),
            }
            for p, v in sorted(merged.items())
        ]
    report["data"] = groups
    return report


def _by_key(session: Session, where: tuple[Any, ...], group_by: str) -> list[dict[str, Any]]:
    key: Any = col(Batch.key_id) if group_by == "key" else col(ApiKey.project)
    query = select(key.label("key"), *_sums()).select_from(ProviderCall)
    query = query.outerjoin(Batch, col(Batch.id) == col(ProviderCall.batch_id))
    if group_by == "project":
        query = query.outerjoin(ApiKey, col(ApiKey.id) == col(Batch.key_id))
    rows = session.execute(query.where(*where).group_by(key)).all()
    # Sorted here, nulls last: SQLite and PostgreSQL order NULL differently.
    rows = sorted(rows, key=lambda r: (r.key is None, r.key or ""))
    return [{group_by: r.key, **_totals(r)} for r in rows]


def _label(group_by: str, key: Any) -> Any:
    if group_by == "day":
        return datetime.fromtimestamp(int(key), UTC).date().isoformat()
    return key


def month_start(now: int) -> int:
    d = datetime.fromtimestamp(now, UTC)
    return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp())


def month_to_date_cost(session: Session, tenant_id: str, now: int) -> float:
    cost = session.scalar(
        select(func.coalesce(func.sum(col(ProviderCall.cost_usd)), 0.0)).where(
            col(ProviderCall.tenant_id) == tenant_id, col(ProviderCall.created_at) >= month_start(now)
        )
    )
    return float(cost or 0.0)


def key_month_to_date_cost(session: Session, key_id: str, now: int) -> float:
    """What the calls of the batches ``key_id`` created cost this month (read when a key's spend
    counter is rebuilt, not per query)."""
    cost = session.scalar(
        select(func.coalesce(func.sum(col(ProviderCall.cost_usd)), 0.0))
        .select_from(ProviderCall)
        .join(Batch, col(Batch.id) == col(ProviderCall.batch_id))
        .where(col(Batch.key_id) == key_id, col(ProviderCall.created_at) >= month_start(now))
    )
    return float(cost or 0.0)


# A tenant's own ``monthly_budget_usd`` of this value: no budget at all, whatever its tier's
# (``PATCH /v1/admin/tenants/{id} {"budget_usd_monthly": null}``); None: its tier's budget.
UNLIMITED_BUDGET = -1.0


def effective_budget(own: float | None, tier: str, settings: Settings) -> float | None:
    """The monthly budget that applies (None = unlimited): the tenant's own, else its tier's."""
    if own is not None:
        return None if own < 0 else own
    return settings.tier_monthly_budget_usd.get(tier)


def budget_for(tenant: Tenant, settings: Settings) -> float | None:
    return effective_budget(tenant.monthly_budget_usd, tenant.tier, settings)
