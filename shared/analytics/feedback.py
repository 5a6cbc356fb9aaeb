"""User feedback on a query's answer (SPEC §13): one rating per API key and query.

A second rating by the same key replaces the first (an upsert, answered 200 both times): a user
correcting a rating is the common case, and "one rating per key" holds by the unique
(query_id, key_id). Only a query with an answer (``succeeded``) can be rated; the rating is
credited to the model that wrote the answer (``answered_by``: the chairman, or the member whose
answer stood), which is how the leaderboard's ``feedback`` reads it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from shared.errors import Conflict, NotFound
from shared.lifecycle.statuses import QueryStatus
from shared.models import FEEDBACK, Query, QueryFeedback


def record_feedback(
    session: Session,
    tenant_id: str,
    key_id: str,
    query_id: str,
    rating: int,
    comment: str | None,
    now: int,
) -> dict[str, Any]:
    query = session.get(Query, query_id)
    if query is None or query.tenant_id != tenant_id:
        raise NotFound(f"no query {query_id!r}", param="query_id")
    if query.status != QueryStatus.SUCCEEDED:
        raise Conflict(f"query {query_id!r} is {query.status}: only an answered query can be rated")
    model = (query.result or {}).get("answered_by")
    upsert = (postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(
        FEEDBACK
    )
    session.execute(
        upsert.values(
            query_id=query_id,
            key_id=key_id,
            tenant_id=tenant_id,
            model=model,
            rating=rating,
            comment=comment,
            created_at=now,
            updated_at=now,
        ).on_conflict_do_update(
            index_elements=[FEEDBACK.c.query_id, FEEDBACK.c.key_id],
            set_={"rating": rating, "comment": comment, "updated_at": now},
        )
    )
    stored = session.scalars(
        select(QueryFeedback).where(
            FEEDBACK.c.query_id == query_id,
            FEEDBACK.c.key_id == key_id,
        )
    ).one()
    return feedback_object(stored)


def feedback_object(row: QueryFeedback) -> dict[str, Any]:
    return {
        "object": "query.feedback",
        "query_id": row.query_id,
        "rating": row.rating,
        "comment": row.comment,
        "model": row.model,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }
