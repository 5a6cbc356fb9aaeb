"""``/v1/messages/batches`` (SPEC §11): Anthropic's Message Batches shape over the same batches.

Create, retrieve, list, cancel, results; thin: the batch service and read model do the work,
``shared.files.anthropic`` draws the shapes. Authenticated like every route, so the ``x-api-key``
header Anthropic's SDK sends works (``api.deps``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import PrincipalDep, SessionDep, StateDep, WriterDep
from api.responses import ERROR_RESPONSES, JSONBytes, attachment, list_page
from api.routes.batches import submit
from shared.batches import read, service
from shared.batches.read import Counts
from shared.files import anthropic, intake, views
from shared.models import Batch
from shared.schemas import MessageBatchCreate

router = APIRouter(prefix="/v1/messages/batches", tags=["message batches"])


def _view(request: Request, batch: Batch, counts: Counts) -> dict[str, Any]:
    results_url = f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{batch.id}/results"
    return anthropic.message_batch(read.batch_object(batch, counts), results_url)


@router.post("", responses=ERROR_RESPONSES)
async def create_message_batch(
    payload: MessageBatchCreate,
    request: Request,
    state: StateDep,
    principal: WriterDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JSONBytes:
    batch, counts, _ = await submit(
        intake.create_message_batch, state, principal, idempotency_key, payload=payload
    )
    return JSONBytes(_view(request, batch, counts))


@router.get("", responses=ERROR_RESPONSES)
def list_message_batches(
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after_id: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONBytes:
    rows, has_more = read.list_batches(session, principal.tenant_id, limit=limit, after=after_id, status=None)
    counts = read.counts_for(session, [b.id for b in rows])
    return list_page([_view(request, b, counts[b.id]) for b in rows], has_more)


@router.get("/{batch_id}", responses=ERROR_RESPONSES)
def get_message_batch(
    batch_id: str, request: Request, session: SessionDep, principal: PrincipalDep
) -> JSONBytes:
    batch = read.get_batch(session, principal.tenant_id, batch_id)
    return JSONBytes(_view(request, batch, read.counts_for(session, [batch.id])[batch.id]))


@router.post("/{batch_id}/cancel", responses=ERROR_RESPONSES)
def cancel_message_batch(batch_id: str, request: Request, state: StateDep, principal: WriterDep) -> JSONBytes:
    batch, counts = service.cancel_batch(state.sessions, principal.tenant_id, batch_id)
    return JSONBytes(_view(request, batch, counts))


@router.get(
    "/{batch_id}/results",
    responses={200: {"content": {"application/x-ndjson": {}}}, **ERROR_RESPONSES},
    response_class=StreamingResponse,
)
def message_batch_results(
    batch_id: str, state: StateDep, session: SessionDep, principal: PrincipalDep
) -> StreamingResponse:
    """One result line per finished request, in request order (Anthropic promises no order)."""
    batch = read.get_batch(session, principal.tenant_id, batch_id)
    return attachment(
        views.anthropic_results(state.sessions, batch.id), "application/x-ndjson", f"{batch.id}_results.jsonl"
    )
