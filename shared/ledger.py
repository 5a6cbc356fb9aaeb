"""The call ledger (SPEC §5.3): one row per attempt at one provider call, the source of every total.

Owns ``CallRecord`` (what a worker knows of an attempt) and the insert of those rows. Batch,
tenant and usage totals are read from here; nothing else writes ``provider_calls``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.models import PROVIDER_CALLS, ProviderCall


@dataclass(frozen=True)
class CallRecord:
    """One attempt at one provider call, as stored in ``provider_calls``."""

    model: str
    stage: str
    attempt: int
    status: str
    error_category: str | None
    latency_ms: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    created_at: int
    # When the attempt ended (ns since the epoch): for trace spans, not stored.
    ended_ns: int = field(default=0, compare=False)

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        del data["ended_ns"]
        return data


@dataclass(frozen=True)
class CallOwner:
    """The query a call was made for: every ledger row names it."""

    query_id: str
    batch_id: str
    tenant_id: str


def record_calls(session: Session, calls: Iterable[tuple[CallOwner, CallRecord]]) -> int:
    """Insert ledger rows in the caller's transaction (one executemany); returns how many."""
    rows = [
        {**call.row(), "query_id": owner.query_id, "batch_id": owner.batch_id, "tenant_id": owner.tenant_id}
        for owner, call in calls
    ]
    if rows:
        session.execute(insert(PROVIDER_CALLS), rows)
    return len(rows)


# Latency percentiles are over the last quarter hour of recorded attempts.
LATENCY_WINDOW_S = 900
LATENCY_SAMPLE = 20_000


def recent_latencies(session: Session, since: int) -> dict[str, list[int]]:
    rows = session.execute(
        select(col(ProviderCall.model), col(ProviderCall.latency_ms))
        .where(col(ProviderCall.created_at) >= since)
        .order_by(col(ProviderCall.id).desc())
        .limit(LATENCY_SAMPLE)
    ).all()
    """Latencies (ms) of the most recent attempts since ``since``, by provider."""
    by_provider: dict[str, list[int]] = {}
    for model, latency in rows:
        by_provider.setdefault(model.partition(":")[0], []).append(latency)
    return by_provider
