"""``GET /metrics``: Prometheus text for the whole deployment (see ``shared/metrics.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlmodel import col
from starlette.concurrency import run_in_threadpool

from api.deps import StateDep
from shared.lifecycle.statuses import QueryStatus
from shared.metrics import DeploymentCollector, render
from shared.models import Batch, Query
from shared.queue.inspect import queue_depths

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(state: StateDep) -> Response:
    def snapshot() -> dict[str, Any]:
        with state.sessions() as session:
            batches = dict(
                session.execute(select(col(Batch.status), func.count()).group_by(col(Batch.status))).all()
            )
            in_flight = (
                session.scalar(select(func.count()).where(col(Query.status) == QueryStatus.RUNNING)) or 0
            )
        return {"queue_depth": queue_depths(state.broker), "batches": batches, "in_flight": in_flight}

    def build() -> bytes:
        if state.metrics is not None:
            state.metrics.flush()
        return render(DeploymentCollector(state.broker.client, state.settings.queue_namespace, snapshot))

    return Response(await run_in_threadpool(build), media_type=CONTENT_TYPE_LATEST)
