"""``/v1/admin/*`` (admins of the operator tenant): queues and workers, provider health and
anomalies, a tenant's tier, limits and budget."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.deps import OperatorDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.analytics.anomalies import read_anomalies
from shared.budget import budget_changed
from shared.errors import InvalidField, NotFound
from shared.liveness import alive_workers
from shared.metrics import recent_counts
from shared.models import Tenant
from shared.providers.health import provider_health
from shared.queue.fair import urgent_batches
from shared.queue.inspect import queue_stats
from shared.settings import PRIORITIES, TierLimits
from shared.tenants import check_tier
from shared.usage import UNLIMITED_BUDGET, budget_for

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/queues", responses=ERROR_RESPONSES)
def queues(state: StateDep, principal: OperatorDep) -> JSONBytes:
    client = state.broker.client
    ns = state.broker.namespace
    data = [
        {
            "queue": q.queue,
            "depth": q.depth,
            "delayed": q.delayed,
            "dead_lettered": q.dead_lettered,
            "in_flight": q.in_flight,
        }
        for q in queue_stats(state.broker)
    ]
    workers = alive_workers(client, ns)
    per_minute = recent_counts(client, ns, "finished", 15)
    throughput = {
        "queries_per_minute_last_1m": per_minute[-1],
        "queries_per_minute_last_5m": round(sum(per_minute[-5:]) / 5, 2),
        "queries_per_minute_last_15m": round(sum(per_minute) / 15, 2),
    }
    return JSONBytes(
        {
            "object": "queues",
            "data": data,
            "workers_alive": len(workers),
            "workers": workers,
            "throughput": throughput,
        }
    )


@router.get("/providers", responses=ERROR_RESPONSES)
def providers(state: StateDep, session: SessionDep, principal: OperatorDep) -> JSONBytes:
    client, ns = state.broker.client, state.broker.namespace
    return list_page(provider_health(client, ns, state.catalog, session, time.time()))


@router.get("/anomalies", responses=ERROR_RESPONSES)
def anomalies(state: StateDep, principal: OperatorDep) -> JSONBytes:
    """Current anomalies (degraded providers and why, batches that would miss their window, the
    latest run's slow queries) and the recent ones, newest first (SPEC §13)."""
    broker = state.broker
    current = read_anomalies(broker.client, broker.namespace)
    at_risk = [{"batch_id": b, "priority": p} for p in PRIORITIES for b in urgent_batches(broker, p)]
    return JSONBytes({"object": "anomalies", **current, "batches_at_risk": at_risk})


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str | None = Field(default=None, min_length=1, max_length=32)
    limits: dict[str, Any] | None = None  # overrides of the tier's limits; null: none
    budget_usd_monthly: float | None = Field(default=None, ge=0)  # null: unlimited


@router.patch("/tenants/{tenant_id}", responses=ERROR_RESPONSES)
def patch_tenant(tenant_id: str, body: TenantPatch, state: StateDep, principal: OperatorDep) -> JSONBytes:
    """Set a tenant's tier, limit overrides or monthly budget (SPEC §17). A changed budget takes
    effect for queries already queued: those waiting for budget start within seconds."""
    given = body.model_fields_set
    settings = state.settings
    with state.sessions.begin() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}", param="tenant_id")
        before = budget_for(tenant, settings)
        if "tier" in given:
            problem = check_tier(settings, body.tier or "")
            if problem:
                raise InvalidField(problem, param="tier")
            tenant.tier = body.tier or tenant.tier
        if "limits" in given:
            base = settings.tiers.get(tenant.tier) or settings.tiers["free"]
            try:
                TierLimits.model_validate({**base.model_dump(), **(body.limits or {})})
            except ValidationError as exc:
                raise InvalidField(f"limits: {exc.errors()[0]['msg']}", param="limits") from exc
            unknown = sorted(set(body.limits or {}) - set(TierLimits.model_fields))
            if unknown:
                raise InvalidField(f"unknown limit {unknown[0]!r}", param=f"limits.{unknown[0]}")
            tenant.limits = body.limits or None
        if "budget_usd_monthly" in given:
            tenant.monthly_budget_usd = (
                UNLIMITED_BUDGET if body.budget_usd_monthly is None else body.budget_usd_monthly
            )
        after = budget_for(tenant, settings)
        shown = _tenant_object(tenant, after)
    if after != before:
        budget_changed(
            state.broker.client,
            state.broker.namespace,
            state.sessions,
            tenant_id,
            rebuild=before is None or after is None,
        )
    return JSONBytes(shown)


def _tenant_object(tenant: Tenant, budget: float | None) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "object": "tenant",
        "name": tenant.name,
        "tier": tenant.tier,
        "is_operator": tenant.is_operator,
        "limits": tenant.limits,
        "budget_usd_monthly": budget,
        "created_at": tenant.created_at,
    }
