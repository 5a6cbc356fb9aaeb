"""``GET /v1/queries/{id}``: one query with every stage and every provider call."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep, SessionDep
from api.responses import ERROR_RESPONSES, JSONBytes
from shared.batches.results import query_detail

router = APIRouter(prefix="/v1/queries", tags=["queries"])


@router.get("/{query_id}", responses=ERROR_RESPONSES)
def get_query(query_id: str, session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    return JSONBytes(query_detail(session, principal.tenant_id, query_id))
