"""``/v1/batches``: create, read, list, cancel, results (SPEC §3.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse
from opentelemetry.trace import SpanKind
from starlette.concurrency import run_in_threadpool

from api.deps import AppState, PrincipalDep, SessionDep, StateDep, WriterDep
from api.responses import ERROR_RESPONSES, JSONBytes, attachment, list_page
from api.schemas import BatchList, BatchObject
from shared.batches import read, service
from shared.batches.csv_results import csv_lines
from shared.batches.read import Counts
from shared.batches.results import iter_results
from shared.files import intake
from shared.lifecycle.statuses import BatchStatus, QueryStatus
from shared.models import Batch
from shared.schemas import BatchCreate
from shared.tenants import Principal
from shared.tracing import carrier, tracer

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# Literal types so the OpenAPI document lists the values (JSON Schema enums), from the StrEnums.
TerminalStatus = Literal[
    QueryStatus.SUCCEEDED, QueryStatus.FAILED, QueryStatus.CANCELLED, QueryStatus.EXPIRED
]


async def submit(
    create: Callable[..., tuple[Batch, Counts, bool]],
    state: AppState,
    principal: Principal,
    idempotency_key: str | None,
    **request: Any,
) -> tuple[Batch, Counts, bool]:
    """Run a batch service's create (inline, file or Anthropic batch, or a re-run) off the event
    loop, as the principal: its tenant, tier limits and budget, and the request's trace.
    ``request``: the service's own arguments (``payload=``, or a re-run's ``batch_id=``, ``statuses=``)."""
    return await run_in_threadpool(
        create,
        state.sessions,
        state.broker,
        state.catalog,
        state.settings,
        tenant_id=principal.tenant_id,
        idempotency_key=idempotency_key,
        limits=principal.limits(state.settings),
        budget=principal.budget(state.settings),
        trace=carrier(),
        **request,
    )


@router.post("", status_code=202, response_model=BatchObject, responses=ERROR_RESPONSES)
async def create_batch(
    payload: BatchCreate,
    state: StateDep,
    principal: WriterDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JSONBytes:
    with tracer().start_as_current_span("POST /v1/batches", kind=SpanKind.SERVER) as span:
        span.set_attribute("conclave.tenant_id", principal.tenant_id)
        span.set_attribute("conclave.queries", len(payload.queries))
        # OpenAI's file batch (input_file_id + endpoint) or an inline one (queries): one service.
        create = intake.create_file_batch if payload.input_file_id is not None else service.create_batch
        batch, counts, _ = await submit(create, state, principal, idempotency_key, payload=payload)
        span.set_attribute("conclave.batch_id", batch.id)
    return JSONBytes(read.batch_object(batch, counts), status_code=202)


@router.get("", response_model=BatchList, responses=ERROR_RESPONSES)
def list_batches(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
    status: BatchStatus | None = None,
) -> JSONBytes:
    rows, has_more = read.list_batches(session, principal.tenant_id, limit=limit, after=after, status=status)
    counts = read.counts_for(session, [b.id for b in rows])
    data = [read.batch_object(b, counts[b.id]) for b in rows]
    return list_page(data, has_more)


@router.get("/{batch_id}", response_model=BatchObject, responses=ERROR_RESPONSES)
def get_batch(batch_id: str, session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    batch = read.get_batch(session, principal.tenant_id, batch_id)
    return JSONBytes(read.batch_object(batch, read.counts_for(session, [batch.id])[batch.id]))


@router.post("/{batch_id}/cancel", response_model=BatchObject, responses=ERROR_RESPONSES)
def cancel_batch(batch_id: str, state: StateDep, principal: WriterDep) -> JSONBytes:
    batch, counts = service.cancel_batch(state.sessions, principal.tenant_id, batch_id)
    return JSONBytes(read.batch_object(batch, counts))


def _chunked(lines: Iterator[bytes], size: int = 64 * 1024) -> Iterator[bytes]:
    buf: list[bytes] = []
    n = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
    if buf:
        yield b"".join(buf)


@router.get(
    "/{batch_id}/results",
    responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}}}, **ERROR_RESPONSES},
    response_class=StreamingResponse,
)
def batch_results(
    batch_id: str,
    state: StateDep,
    session: SessionDep,
    principal: PrincipalDep,
    format: Literal["jsonl", "csv"] = "jsonl",
    status: TerminalStatus | None = None,
    include: Literal["stages"] | None = None,
) -> StreamingResponse:
    batch = read.get_batch(session, principal.tenant_id, batch_id)
    records = iter_results(state.sessions, batch.id, status=status, include_stages=include == "stages")
    if format == "csv":
        body = _chunked(csv_lines(records))
        media = "text/csv"
    else:
        body = _chunked(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records)
        media = "application/x-ndjson"
    return attachment(body, media, f"{batch.id}.{format}")
