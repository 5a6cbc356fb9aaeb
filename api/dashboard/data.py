"""What the dashboard's pages read and do, behind the session cookie: JSON views, the event
stream, the results download and cancel.

Each route is another view of the JSON API's read model: the batch object and its stage counts
(``shared.batches``, ``shared.progress``), the same event stream as ``/v1/batches/{id}/events``,
the same results and cancel services, the same operator read functions as ``/v1/admin/*``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse

from api.dashboard.auth import SameOrigin, SessionOperator, SessionPrincipal, SessionWriter
from api.deps import SessionDep, StateDep
from api.responses import JSONBytes
from api.routes import batches as batch_routes
from api.streams import StreamAskDep, open_stream
from shared import insights, progress
from shared.batches import read, service
from shared.liveness import alive_workers
from shared.metrics import recent_counts
from shared.providers.health import provider_health
from shared.queue.inspect import queue_stats

router = APIRouter(prefix="/dashboard", include_in_schema=False)

MODELS_WINDOW_S = 24 * 3600
# What the operations page shows of each provider's health (/v1/admin/providers has all of it).
OPERATIONS_PROVIDER_FIELDS = (
    "provider",
    "circuit",
    "window_calls",
    "window_error_rate",
    "latency_p50_ms",
    "latency_p95_ms",
    "rpm",
    "rpm_headroom",
)


def batch_view(state: Any, session: Any, rows: list[Any]) -> list[dict[str, Any]]:
    """Batch objects with their progress document, stage counts read in one round trip."""
    counts = read.counts_for(session, [b.id for b in rows])
    sets = progress.read_stage_sets_many(
        state.broker.client, state.settings.queue_namespace, [b.id for b in rows]
    )
    out = []
    for b in rows:
        obj = read.batch_object(b, counts[b.id])
        obj["progress"] = progress.progress_document(obj, progress.stage_counts(sets[b.id], obj))
        out.append(obj)
    return out


@router.get("/data/batches")
def data_batches(state: StateDep, session: SessionDep, principal: SessionPrincipal) -> JSONBytes:
    rows, has_more = read.list_batches(session, principal.tenant_id, limit=20, after=None, status=None)
    return JSONBytes({"object": "list", "data": batch_view(state, session, rows), "has_more": has_more})


@router.get("/data/batches/{batch_id}")
def data_batch(batch_id: str, state: StateDep, session: SessionDep, principal: SessionPrincipal) -> JSONBytes:
    batch = read.get_batch(session, principal.tenant_id, batch_id)
    (obj,) = batch_view(state, session, [batch])
    obj["failures_by_type"] = insights.failures_by_type(session, batch.id)
    obj["members"] = insights.model_figures(session, batch_id=batch.id)
    return JSONBytes(obj)


@router.get("/data/models")
def data_models(session: SessionDep, principal: SessionPrincipal) -> JSONBytes:
    since = int(time.time()) - MODELS_WINDOW_S
    rows = insights.model_figures(session, tenant_id=principal.tenant_id, since=since)
    return JSONBytes({"object": "list", "data": rows, "window_seconds": MODELS_WINDOW_S})


@router.get("/data/operations")
def data_operations(state: StateDep, session: SessionDep, principal: SessionOperator) -> JSONBytes:
    """What ``/v1/admin/queues`` and ``/v1/admin/providers`` show, from the same read functions,
    plus the cost of today (UTC) and the per-minute throughput series for the chart."""
    client, ns = state.broker.client, state.broker.namespace
    now = time.time()
    queues = [asdict(q) for q in queue_stats(state.broker)]
    health = provider_health(client, ns, state.catalog, session, now)
    providers = [{k: row[k] for k in OPERATIONS_PROVIDER_FIELDS} for row in health]
    per_minute = recent_counts(client, ns, "finished", 15)
    return JSONBytes(
        {
            "queues": queues,
            "workers_alive": len(alive_workers(client, ns)),
            "queries_in_flight": sum(q["in_flight"] for q in queues),
            "providers": providers,
            "cost_today_usd": insights.cost_since(session, int(now) // 86400 * 86400),
            "finished_per_minute": per_minute,
            "now": int(now),
        }
    )


@router.get("/batches/{batch_id}/events")
async def events(
    batch_id: str, state: StateDep, principal: SessionPrincipal, ask: StreamAskDep
) -> EventSourceResponse:
    return await open_stream(ask, state, principal.tenant_id, batch_id)


@router.get("/batches/{batch_id}/results")
def results(
    batch_id: str,
    state: StateDep,
    session: SessionDep,
    principal: SessionPrincipal,
    format: Literal["jsonl", "csv"] = "jsonl",
) -> StreamingResponse:
    return batch_routes.batch_results(batch_id, state, session, principal, format=format)


@router.post("/batches/{batch_id}/cancel", dependencies=[SameOrigin])
def cancel(batch_id: str, state: StateDep, principal: SessionWriter) -> JSONBytes:
    batch, counts = service.cancel_batch(state.sessions, principal.tenant_id, batch_id)
    return JSONBytes(read.batch_object(batch, counts))
