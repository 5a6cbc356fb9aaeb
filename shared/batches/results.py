"""The results read model: one record per terminal query (SPEC §3.1), and one query in full.

Records are rendered from the query rows alone, in batch order, a page at a time, so a
50,000-query download streams in bounded memory with short transactions.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import orjson
from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.analytics import experiments
from shared.errors import NotFound
from shared.lifecycle.statuses import QUERY_TERMINAL
from shared.models import ProviderCall, Query

RESULT_PAGE = 1000


def _member_identity(m: dict[str, Any]) -> dict[str, Any]:
    """Who a member's entry is about: ``model`` answered, ``requested_model`` was asked (they
    differ when a fallback answered; results stored before the distinction name the member only)."""
    return {
        "model": m["model"],
        "requested_model": m.get("requested_model", m["model"]),
        "status": m["status"],
    }


def result_record(
    row: Any, include_stages: bool = False, result: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The record of a finished query's row; ``result`` is its stored result, when read apart
    (``iter_results``), else ``row.result``."""
    result = (row.result if result is None else result) or {}
    record: dict[str, Any] = {
        "custom_id": row.custom_id,
        "query_id": row.id,
        "status": row.status,
        "answer": result.get("answer"),
        "error": row.error,
        "synthesis": result.get("synthesis"),
        "chairman": result.get("chairman"),
        "members": [
            {
                **_member_identity(m),
                "error": m.get("error"),
                "latency_ms": m.get("latency_ms"),
                # "exact" or "semantic" when the answer came from the cache (SPEC §14); a
                # semantic hit also says how close, and to which earlier question.
                "cached": m.get("cached"),
                **(
                    {"similarity": m.get("similarity"), "cached_question": m.get("cached_question")}
                    if m.get("cached") == "semantic"
                    else {}
                ),
            }
            for m in result.get("members", [])
        ],
        "aggregate_ranking": result.get("aggregate_ranking", []),
        "citations": result.get("citations", []),
        "usage": {
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "total_tokens": row.input_tokens + row.output_tokens,
        },
        "cost_usd": round(row.cost_usd, 8),
        "latency_ms": row.latency_ms,
    }
    if result.get("simulated"):
        record["simulated"] = True
    if "cache_hits" in result:  # a batch with the cache on: what it reused and saved
        record["cache_hits"] = result["cache_hits"]
        record["cost_saved_usd"] = result["cost_saved_usd"]
    if include_stages:
        record["stages"] = {
            "answers": [
                {
                    **_member_identity(m),
                    "answer": m.get("answer"),
                    "error": m.get("error"),
                    # Set when the same model answered for another member: only that answer was reviewed.
                    "duplicate_of": m.get("duplicate_of"),
                }
                for m in result.get("members", [])
            ],
            "reviews": result.get("reviews", []),
            "routing": row.routing,
        }
    return record


# What every rendering of a finished query reads (rows are read by column name, not position).
OUTCOME_COLUMNS = (
    col(Query.seq),
    col(Query.id),
    col(Query.custom_id),
    col(Query.status),
    col(Query.result),
    col(Query.error),
    col(Query.input_tokens),
    col(Query.output_tokens),
)
_RESULT_COLUMNS = (*OUTCOME_COLUMNS, col(Query.routing), col(Query.cost_usd), col(Query.latency_ms))
# For a download: the result as its stored text, decoded here. psycopg's JSON loader (a Python
# function, a copy of the bytes, then orjson) cost 29 µs a row for a 9 KB council result, its
# text loader and orjson 14 µs: about a third of the API's CPU per record (benchmarks/scale.py).
_RESULT_TEXT = cast(col(Query.result), Text).label("result_text")
_DOWNLOAD_COLUMNS = tuple(_RESULT_TEXT if c is col(Query.result) else c for c in _RESULT_COLUMNS)


def iter_rows_in_order(
    sessions: sessionmaker[Session],
    batch_id: str,
    columns: Sequence[Any],
    statuses: Collection[str],
    page: int = RESULT_PAGE,
) -> Iterator[Any]:
    """``columns`` of a batch's queries in ``statuses``, in batch order (``seq``), a window of
    ``page`` seqs per short transaction, so memory stays bounded however large the batch.

    Windows of ``seq`` (``seq >= lo AND seq < lo + page``) rather than a keyset page
    (``seq > last ... LIMIT page``): with the status filter, PostgreSQL picks the
    ``(batch_id, status)`` index and sorts every remaining row for each page, quadratic in the
    batch (50,000 queries: 425 ms a page, 40 s for an output file), while a window is a range
    scan of ``ix_queries_batch_seq`` (16 ms). A query's ``seq`` runs from 0 without gaps.

    Read one window after another: reading the next in a helper thread meanwhile cost the API
    more CPU per record than it saved in waiting (48-52 µs a record without, 54-59 with, on
    2 cores; ``benchmarks/scale.py``), and 13 MB more memory."""
    with sessions() as session:
        last = session.scalar(select(func.max(col(Query.seq))).where(col(Query.batch_id) == batch_id))
    if last is None:
        return
    for lo in range(0, last + 1, page):
        with sessions() as session:
            rows = session.execute(
                select(*columns)
                .where(
                    col(Query.batch_id) == batch_id,
                    col(Query.seq) >= lo,
                    col(Query.seq) < lo + page,
                    col(Query.status).in_(statuses),
                )
                .order_by(col(Query.seq))
            ).all()
        yield from rows


def iter_results(
    sessions: sessionmaker[Session], batch_id: str, *, status: str | None = None, include_stages: bool = False
) -> Iterator[dict[str, Any]]:
    """Terminal queries in batch order, a page at a time (bounded memory, short transactions)."""
    statuses = (status,) if status else QUERY_TERMINAL
    rows = iter_rows_in_order(sessions, batch_id, _DOWNLOAD_COLUMNS, statuses)
    with sessions() as session:
        in_experiment = experiments.batch_has_experiment(session, batch_id)
    if in_experiment:
        yield from _with_experiment(sessions, batch_id, rows, include_stages)
        return
    for row in rows:
        # None, SQL NULL or JSON null alike: no result.
        result = orjson.loads(row.result_text) if row.result_text else None
        yield result_record(row, include_stages, result or {})


def _with_experiment(
    sessions: sessionmaker[Session], batch_id: str, rows: Iterator[Any], include_stages: bool
) -> Iterator[dict[str, Any]]:
    """The records of a batch in an experiment, each with its ``experiment: {name, variant}``
    (SPEC §13), looked up a page of rows at a time."""
    while page := list(itertools.islice(rows, RESULT_PAGE)):
        with sessions() as session:
            tags = experiments.batch_variants(session, batch_id, [row.id for row in page])
        for row in page:
            result = orjson.loads(row.result_text) if row.result_text else None
            record = result_record(row, include_stages, result or {})
            record["experiment"] = tags.get(row.id)
            yield record


def query_detail(session: Session, tenant_id: str, query_id: str) -> dict[str, Any]:
    query = session.get(Query, query_id)
    if query is None or query.tenant_id != tenant_id:
        raise NotFound(f"no query {query_id!r}", param="query_id")
    calls = session.scalars(
        select(ProviderCall).where(col(ProviderCall.query_id) == query_id).order_by(col(ProviderCall.id))
    ).all()
    detail = result_record(query, include_stages=True)
    if "experiment" in query.request:
        detail["experiment"] = query.request["experiment"]
    detail.update(
        {
            "object": "query",
            "id": query.id,
            "batch_id": query.batch_id,
            "request": query.request,
            "priority": query.priority,
            "attempts": query.attempts,
            "enqueued_at": query.enqueued_at,
            "started_at": query.started_at,
            "finished_at": query.finished_at,
            "provider_calls": [
                {
                    "model": c.model,
                    "stage": c.stage,
                    "attempt": c.attempt,
                    "status": c.status,
                    "error_category": c.error_category,
                    "latency_ms": c.latency_ms,
                    "input_tokens": c.input_tokens,
                    "output_tokens": c.output_tokens,
                    "cost_usd": c.cost_usd,
                    "created_at": c.created_at,
                }
                for c in calls
            ],
        }
    )
    return detail
