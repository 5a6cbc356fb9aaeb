"""``GET /v1/analytics/models`` and ``GET /v1/batches/{id}/report`` (SPEC §13): views of the
analytics rollups (``shared.analytics.reports``), kept up by the scheduler's fold."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, SessionDep
from api.responses import ERROR_RESPONSES, JSONBytes
from api.routes.usage import From, To, parse_instant
from shared.analytics.reports import batch_report, leaderboard

router = APIRouter(tags=["analytics"])
DEFAULT_RANGE_S = 30 * 86400
# The interval level: 0.95 unless asked (a test of "includes chance" wants a wider one).
Confidence = Annotated[float, Query(gt=0.5, lt=1.0)]


@router.get("/v1/analytics/models", responses=ERROR_RESPONSES)
def models(
    session: SessionDep,
    principal: PrincipalDep,
    from_: From = None,
    to: To = None,
    confidence: Confidence = 0.95,
) -> JSONBytes:
    """The model leaderboard of the caller's tenant (every tenant's for the operator's admins)."""
    now = int(time.time())
    start = parse_instant(from_, "from", now - DEFAULT_RANGE_S)
    end = max(parse_instant(to, "to", now + 1), start)
    scope = None if principal.operates else principal.tenant_id
    rows = leaderboard(session, scope, start, end, confidence)
    return JSONBytes(
        {
            "object": "list",
            "data": rows,
            "has_more": False,
            "first_id": None,
            "last_id": None,
            "from": start,
            "to": end,
            "confidence": confidence,
        }
    )


@router.get("/v1/batches/{batch_id}/report", responses=ERROR_RESPONSES)
def report(
    batch_id: str, session: SessionDep, principal: PrincipalDep, confidence: Confidence = 0.95
) -> JSONBytes:
    return JSONBytes(batch_report(session, principal.tenant_id, batch_id, confidence))
