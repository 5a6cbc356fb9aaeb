"""Cost jobs: the daily summary per tenant and the monthly budget check, each sent once per period.

"Once" is held by the database: a ``Notice`` row with a unique (tenant, kind, period) is written
in the same transaction as the event, so two runs (or two leaders in a handover) cannot both
send it.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.budget import emit_key_once
from shared.models import ApiKey, Notice, ProviderCall, Tenant
from shared.settings import Settings
from shared.usage import (
    budget_for,
    key_month_to_date_cost,
    month_start,
    month_to_date_cost,
    usage_report,
)
from shared.webhooks.events import emit_once

log = logging.getLogger("conclave.scheduler")

# How far back the daily summary catches up after downtime: a month, and then some.
MAX_CATCH_UP_DAYS = 35
# The job's own progress marks are notices of no tenant, of a kind no webhook event has.
_JOB = ""
_SUMMARISED = "job.daily_summary"


def daily_summaries(sessions: sessionmaker[Session], now: int | None = None) -> int:
    """``cost.daily_summary`` to every tenant that made calls, for yesterday (UTC) and for every
    earlier day the job missed (the scheduler was down at midnight), each day once.

    A day is marked summarised (a ``Notice`` of the job itself) once every tenant's summary for it
    is sent; the next run starts the day after the latest mark, so a run that died half-way
    through a day does that day again (tenants already sent to are skipped by their own notice).
    Without any mark (a new deployment) it starts with yesterday; it never reaches back more than
    ``MAX_CATCH_UP_DAYS``.
    """
    now = now or int(time.time())
    yesterday = datetime.fromtimestamp(now, UTC).date() - timedelta(days=1)
    with sessions() as session:
        latest = session.scalar(select(func.max(col(Notice.period))).where(col(Notice.kind) == _SUMMARISED))
    first = date.fromisoformat(latest) + timedelta(days=1) if latest else yesterday
    first = max(first, yesterday - timedelta(days=MAX_CATCH_UP_DAYS - 1))
    sent = 0
    day = first
    while day <= yesterday:
        sent += _summarise_day(sessions, day, now)
        _mark(sessions, _SUMMARISED, day.isoformat(), now)
        day += timedelta(days=1)
    return sent


def _summarise_day(sessions: sessionmaker[Session], day: date, now: int) -> int:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    end = start + 86400
    with sessions() as session:
        tenants = session.scalars(
            select(col(ProviderCall.tenant_id))
            .distinct()
            .where(col(ProviderCall.created_at) >= start, col(ProviderCall.created_at) < end)
        ).all()
    sent = 0
    for tenant_id in tenants:
        with sessions() as session:
            report = usage_report(session, tenant_id, start, end, "model")
        data = {"date": day.isoformat(), **{k: v for k, v in report.items() if k != "object"}}
        sent += emit_once(sessions, tenant_id, "cost.daily_summary", day.isoformat(), data, now)
    return sent


def _mark(sessions: sessionmaker[Session], kind: str, period: str, now: int) -> None:
    try:
        with sessions.begin() as session:
            session.add(Notice(tenant_id=_JOB, kind=kind, period=period, created_at=now))
    except IntegrityError:
        pass  # another run (a leader in a handover) marked it first


def budget_checks(sessions: sessionmaker[Session], settings: Settings, now: int | None = None) -> int:
    """``cost.budget_exceeded`` once per month to each tenant whose spend reached its budget, and
    for each key whose batches' spend reached the key's own budget (to its tenant, naming it)."""
    now = now or int(time.time())
    period = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
    with sessions() as session:
        spenders = session.scalars(
            select(col(ProviderCall.tenant_id))
            .distinct()
            .where(col(ProviderCall.created_at) >= month_start(now))
        ).all()
        tenants = (
            session.scalars(select(Tenant).where(col(Tenant.id).in_(spenders))).all() if spenders else []
        )
        over = []
        for tenant in tenants:
            budget = budget_for(tenant, settings)
            spent = month_to_date_cost(session, tenant.id, now)
            if budget is not None and spent >= budget:
                over.append((tenant.id, budget, spent))
        # Keys with budgets of their own (SPEC §17), among the tenants that spent this month.
        keyed = (
            session.scalars(
                select(ApiKey).where(
                    col(ApiKey.tenant_id).in_(spenders), col(ApiKey.monthly_budget_usd).is_not(None)
                )
            ).all()
            if spenders
            else []
        )
        keys_over = []
        for key in keyed:
            key_spent = key_month_to_date_cost(session, key.id, now)
            if key.monthly_budget_usd is not None and key_spent >= key.monthly_budget_usd:
                keys_over.append((key.tenant_id, key.id, key.monthly_budget_usd, key_spent))
    sent = 0
    for tenant_id, budget, spent in over:
        data = {"period": period, "budget_usd": budget, "spent_usd": round(spent, 8)}
        sent += emit_once(sessions, tenant_id, "cost.budget_exceeded", period, data, now)
    for tenant_id, key_id, budget, spent in keys_over:
        data = {"period": period, "budget_usd": budget, "spent_usd": round(spent, 8)}
        sent += emit_key_once(sessions, tenant_id, key_id, "cost.budget_exceeded", period, data, now)
    return sent
