"""The dashboard's breakdowns (shared.insights) on the session's database (SQLite, or PostgreSQL
with CONCLAVE_TEST_DB=postgresql): PostgreSQL cannot group a ``json`` column, so the failure
breakdown groups on the extracted error type."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert

from shared.ids import new_id
from shared.insights import failures_by_type, model_figures
from shared.models import BATCHES, PROVIDER_CALLS, QUERIES
from tests.conftest import new_key

pytestmark = pytest.mark.integration


def test_failures_by_type_and_per_model_figures(sessions: Any) -> None:
    _, tenant_id = new_key(sessions)
    batch_id = new_id("batch")
    errors = [
        {"type": "timeout", "message": "a"},
        {"type": "timeout", "message": "b"},
        {"type": "insufficient_answers", "message": "c"},
        None,
    ]
    with sessions.begin() as session:
        session.execute(
            insert(BATCHES),
            [
                {
                    "id": batch_id,
                    "tenant_id": tenant_id,
                    "status": "in_progress",
                    "priority": "normal",
                    "council": {},
                    "metadata": {},
                    "completion_window": "24h",
                    "total": len(errors) + 1,
                    "created_at": 1,
                    "expires_at": 2,
                }
            ],
        )
        session.execute(
            insert(QUERIES),
            [
                {
                    "id": new_id("query"),
                    "batch_id": batch_id,
                    "tenant_id": tenant_id,
                    "seq": i,
                    "custom_id": f"c{i}",
                    "status": "failed" if i < len(errors) else "succeeded",
                    "priority": "normal",
                    "request": {},
                    "attempts": 1,
                    "error": errors[i] if i < len(errors) else None,
                    "input_tokens": 0,
                    "output_tokens": 0,
                    "cost_usd": 0.0,
                }
                for i in range(len(errors) + 1)
            ],
        )
        calls = [("sim:alpha", "succeeded", None, 100, 0.5), ("sim:alpha", "failed", "timeout", 300, 0.0)]
        calls += [("sim:beta", "succeeded", None, 200, 0.25), ("sim:beta", "cached", None, 0, 0.0)]
        session.execute(
            insert(PROVIDER_CALLS),
            [
                {
                    "query_id": "q",
                    "batch_id": batch_id,
                    "tenant_id": tenant_id,
                    "model": model,
                    "stage": "answer",
                    "attempt": 1,
                    "status": status,
                    "error_category": category,
                    "latency_ms": latency,
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cost_usd": cost,
                    "created_at": 100,
                }
                for model, status, category, latency, cost in calls
            ],
        )
    with sessions() as session:
        assert failures_by_type(session, batch_id) == {"timeout": 2, "insufficient_answers": 1, "unknown": 1}
        figures = {m["model"]: m for m in model_figures(session, batch_id=batch_id)}
        assert figures["sim:alpha"]["calls"] == 2 and figures["sim:alpha"]["failed"] == 1
        assert figures["sim:alpha"]["cached"] == 0
        assert figures["sim:alpha"]["errors"] == {"timeout": 1}
        assert figures["sim:alpha"]["latency_p50_ms"] == 300 and figures["sim:alpha"]["cost_usd"] == 0.5
        assert figures["sim:beta"] == {
            "model": "sim:beta",
            "calls": 2,
            "failed": 0,
            "cached": 1,
            "error_rate": 0.0,
            "errors": {},
            # The cache hit (0 ms) is not a provider's latency.
            "latency_p50_ms": 200,
            "latency_p95_ms": 200,
            "tokens": 30,
            "cost_usd": 0.25,
        }
        assert model_figures(session, tenant_id=tenant_id, since=101) == []
