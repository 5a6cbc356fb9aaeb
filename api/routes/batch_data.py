"""A batch's data lifecycle (SPEC §17): re-run its finished queries, delete its content.

Thin: ``shared.batches.rerun`` builds the new batch (through the batch service's one way in) and
``shared.batches.deletion`` deletes; the retention purge (``scheduler/jobs/retention.py``) deletes
the same way.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import StateDep, WriterDep
from api.responses import ERROR_RESPONSES, JSONBytes
from api.routes.batches import TerminalStatus, submit
from api.schemas import BatchObject
from shared.batches import deletion, read, rerun
from shared.lifecycle.statuses import QueryStatus

router = APIRouter(prefix="/v1/batches", tags=["batches"])


def _failed_and_expired() -> list[TerminalStatus]:
    return [QueryStatus.FAILED, QueryStatus.EXPIRED]


class RerunRequest(BaseModel):
    """Which of the batch's finished queries to run again (``failed`` and ``expired`` by default)."""

    model_config = ConfigDict(extra="forbid")

    statuses: list[TerminalStatus] = Field(default_factory=_failed_and_expired, min_length=1, max_length=4)


@router.post("/{batch_id}/rerun", status_code=202, response_model=BatchObject, responses=ERROR_RESPONSES)
async def rerun_batch(
    batch_id: str,
    state: StateDep,
    principal: WriterDep,
    payload: RerunRequest | None = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JSONBytes:
    """A new batch (202) of this batch's queries with the statuses asked for: same ``custom_id``s,
    requests, council, priority, knowledge and webhook; 422 when none matches. A batch still
    running may be re-run: its queries that have already reached those statuses are."""
    statuses = (payload or RerunRequest()).statuses
    batch, counts, _ = await submit(
        rerun.rerun_batch, state, principal, idempotency_key, batch_id=batch_id, statuses=statuses
    )
    return JSONBytes(read.batch_object(batch, counts), status_code=202)


@router.delete("/{batch_id}", status_code=204, response_class=Response, responses=ERROR_RESPONSES)
def delete_batch(batch_id: str, state: StateDep, principal: WriterDep) -> Response:
    """Delete an ended batch's queries, results and files (204); 409 while it runs (cancel it
    first). The cost ledger keeps its amounts: ``/v1/usage`` does not change."""
    deletion.delete_batch(state.sessions, state.broker, principal.tenant_id, batch_id)
    return Response(status_code=204)
