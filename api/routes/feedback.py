"""``POST /v1/queries/{id}/feedback`` (SPEC §13): a user's rating of a query's answer.

One rating per key and query; a second replaces the first (``shared.analytics.feedback``)."""

from __future__ import annotations

import time

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import StateDep, WriterDep
from api.responses import ERROR_RESPONSES, JSONBytes
from shared.analytics.feedback import record_feedback
from shared.db import write_transaction

router = APIRouter(prefix="/v1/queries", tags=["queries"])


class FeedbackIn(BaseModel):
    rating: int = Field(ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)


@router.post("/{query_id}/feedback", responses=ERROR_RESPONSES)
def post_feedback(query_id: str, body: FeedbackIn, state: StateDep, principal: WriterDep) -> JSONBytes:
    with write_transaction(state.sessions) as session:
        stored = record_feedback(
            session,
            principal.tenant_id,
            principal.key_id,
            query_id,
            body.rating,
            body.comment,
            int(time.time()),
        )
    return JSONBytes(stored)
