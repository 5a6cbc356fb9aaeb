"""``GET /v1/batches/{id}/events``: a batch's progress as Server-Sent Events (SPEC §12).

The stream itself (one reader per batch per process, resumable ids) is ``api.streams``; this
route authenticates, and the dashboard's stream is the same function behind a session cookie.
"""

from __future__ import annotations

from fastapi import APIRouter
from sse_starlette import EventSourceResponse

from api.deps import PrincipalDep, StateDep
from api.responses import ERROR_RESPONSES
from api.streams import StreamAskDep, open_stream

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.get(
    "/{batch_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def batch_events(
    batch_id: str, state: StateDep, principal: PrincipalDep, ask: StreamAskDep
) -> EventSourceResponse:
    """``event: progress`` at most once a second and only on change, ``event: query`` per
    finished query (``?queries=true``), ``event: end`` with the final batch object; every event
    has an id, and reconnecting with ``Last-Event-ID`` (to any replica) misses nothing."""
    return await open_stream(ask, state, principal.tenant_id, batch_id)
