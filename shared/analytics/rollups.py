"""The analytics rollups (SPEC §13): what every finished query adds, folded in by the scheduler.

Why a scheduler fold and not the worker's outcome write: the worker's settle step is the hot path
of every query (one coalesced transaction per group of outcomes, ``workers/pipeline.py``), and
the rollups need rows the worker does not hold in one place (the ledger rows of every attempt,
the stored council result). Folding after the fact keeps that path as it is, costs one indexed
read of finished queries and their calls per page, and makes the analytics a read model that can
be rebuilt from scratch (reset the cursor and the rollup tables, fold again). The price is
staleness: a query shows up in the leaderboard one fold interval plus ``SETTLE_S`` after it ends.

How the fold stays exact:
- A cursor (``analytics_cursor``) on (finished_at, query id) says what has been folded; each page
  of queries is folded in one transaction that also advances the cursor, with the cursor row
  locked, so a fold is applied once or not at all, even when two schedulers overlap in a
  leadership change (the second waits for the lock, then sees the advanced cursor).
- Only queries finished at least ``SETTLE_S`` ago are read: the worker stamps ``finished_at``
  before its (coalesced) outcome transaction commits, so a fresher query with a smaller stamp
  than one already read could still be on its way. Commits take milliseconds; ``SETTLE_S`` is
  the margin for a slow one.
- Every rollup column is a sum, written as an additive upsert (``col = col + excluded.col``), so
  a range over days is a sum and a fold never reads what it writes.

Per model (and tenant, UTC day of the query's end): provider calls, failed calls, timed-out calls
(``error_category`` ``timeout``), stage 1 answers written and members that failed to answer, the
latency histogram of succeeded calls, rank sums and votes, first places, cost; per ordered pair
of models, how often a valid review ranked one above the other. Per batch: reviews by status,
Kendall's W of each query whose reviews form a balanced design, reviews whose first-shown answer
was ranked first (by how many answers were shown), synthesis sources, and calls, failures, cost
and a latency histogram per stage.

Not counted: a call whose worker died (``abandoned``) is neither a success nor a provider failure;
a late call row written after its query was folded (a worker that lost its lease and reported
afterwards) is not picked up.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, select, tuple_
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from shared.analytics.fitting import kendall_w, latency_bucket
from shared.db import write_transaction
from shared.lifecycle.statuses import QUERY_TERMINAL, CallStatus, ReviewStatus
from shared.models import (
    BATCH_LATENCY,
    BATCH_POSITION,
    BATCH_ROLLUP,
    BATCH_STAGE,
    MODEL_DAY,
    MODEL_LATENCY,
    PAIRS,
    PROVIDER_CALLS,
    QUERIES,
    AnalyticsCursor,
)

CURSOR = "council"
SETTLE_S = 30
PAGE = 500
DAY_S = 86400
# The label of the answer a reviewer is shown first (SPEC §5.1: "Response A", "Response B", …).
FIRST_SHOWN = "Response A"
SYNTHESIS_SOURCES = ("chairman", "fallback_chairman", "top_ranked", "single")

Key = tuple[Any, ...]
_FLOAT_COLUMNS = frozenset({"cost_usd", "agreement_sum", "agreement_chance_sum"})


@dataclass
class Increments:
    """What a page of queries adds to each rollup table: primary key → column → amount."""

    tables: dict[str, dict[Key, dict[str, float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    )

    def add(self, table: Table, key: Key, **amounts: float) -> None:
        row = self.tables[table.name][key]
        for column, amount in amounts.items():
            row[column] += amount


_TABLES = {
    t.name: t
    for t in (MODEL_DAY, MODEL_LATENCY, PAIRS, BATCH_ROLLUP, BATCH_POSITION, BATCH_STAGE, BATCH_LATENCY)
}


def day_of(ts: int) -> int:
    return ts - ts % DAY_S


def add_query(inc: Increments, query: Any, calls: Iterable[Any]) -> None:
    """Add one finished query (a row of ``queries``) and its ledger rows to ``inc``."""
    tenant, batch, day = query.tenant_id, query.batch_id, day_of(query.finished_at)
    for call in calls:
        if call.status not in (CallStatus.SUCCEEDED, CallStatus.FAILED):
            continue
        failed = call.status == CallStatus.FAILED
        inc.add(
            MODEL_DAY,
            (tenant, day, call.model),
            calls=1,
            call_failures=failed,
            call_timeouts=failed and call.error_category == "timeout",
            cost_usd=call.cost_usd,
        )
        inc.add(BATCH_STAGE, (batch, call.stage), calls=1, failures=failed, cost_usd=call.cost_usd)
        if not failed:
            bucket = latency_bucket(call.latency_ms)
            inc.add(MODEL_LATENCY, (tenant, day, call.model, bucket), calls=1)
            inc.add(BATCH_LATENCY, (batch, call.stage, bucket), calls=1)

    result = query.result or {}
    inc.add(BATCH_ROLLUP, (batch,), queries=1)
    for member in result.get("members", []):
        if member.get("status") == CallStatus.SUCCEEDED and not member.get("duplicate_of"):
            inc.add(MODEL_DAY, (tenant, day, member["model"]), answers=1)
        elif member.get("status") == CallStatus.FAILED:
            inc.add(
                MODEL_DAY, (tenant, day, member.get("requested_model", member["model"])), answer_failures=1
            )

    reviews = result.get("reviews", [])
    valid: list[list[str]] = []
    for review in reviews:
        status = review.get("status")
        inc.add(
            BATCH_ROLLUP,
            (batch,),
            reviews=1,
            reviews_valid=status == ReviewStatus.VALID,
            reviews_invalid=status == ReviewStatus.INVALID,
            reviews_failed=status == ReviewStatus.FAILED,
        )
        ranking = review.get("ranking")
        if status != ReviewStatus.VALID or not ranking:
            continue
        valid.append(ranking)
        for place, model in enumerate(ranking, start=1):
            inc.add(MODEL_DAY, (tenant, day, model), rank_sum=place, rank_votes=1, first_places=place == 1)
        for i, winner in enumerate(ranking):
            for loser in ranking[i + 1 :]:
                inc.add(PAIRS, (tenant, day, winner, loser), wins=1)
        labels = review.get("labels") or {}
        inc.add(
            BATCH_POSITION,
            (batch, len(labels)),
            reviews=1,
            first_ranked_first=labels.get(FIRST_SHOWN) == ranking[0],
        )
    # Agreement needs every reviewer's ranking: one invalid review unbalances the design.
    if reviews and len(valid) == len(reviews):
        concordance = kendall_w(valid)
        if concordance is not None:
            inc.add(
                BATCH_ROLLUP,
                (batch,),
                agreement_sum=concordance.w,
                agreement_chance_sum=concordance.chance,
                agreement_queries=1,
            )
    source = result.get("synthesis")
    if source in SYNTHESIS_SOURCES:
        inc.add(BATCH_ROLLUP, (batch,), **{f"synthesis_{source}": 1})


def apply(session: Session, inc: Increments, tenants: dict[str, str]) -> None:
    """Upsert every increment: ``col = col + excluded.col``, rows in key order (no deadlocks)."""
    dialect = session.get_bind().dialect.name
    for name, rows in inc.tables.items():
        if not rows:
            continue
        table = _TABLES[name]
        keys = [c.name for c in table.primary_key.columns]
        columns = sorted({c for amounts in rows.values() for c in amounts})
        extra = ["tenant_id"] if table is BATCH_ROLLUP else []
        upsert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(table)
        stmt = upsert.on_conflict_do_update(
            index_elements=[table.c[k] for k in keys],
            set_={c: table.c[c] + upsert.excluded[c] for c in columns},
        )
        params = []
        for key in sorted(rows):
            amounts = rows[key]
            row: dict[str, Any] = dict(zip(keys, key, strict=True))
            for c in columns:
                value = amounts.get(c, 0)
                row[c] = value if c in _FLOAT_COLUMNS else int(value)
            if extra:
                row["tenant_id"] = tenants[key[0]]
            params.append(row)
        session.execute(stmt, params)


_QUERY_COLUMNS = (
    QUERIES.c.id,
    QUERIES.c.batch_id,
    QUERIES.c.tenant_id,
    QUERIES.c.finished_at,
    QUERIES.c.result,
)
_CALL_COLUMNS = (
    PROVIDER_CALLS.c.query_id,
    PROVIDER_CALLS.c.model,
    PROVIDER_CALLS.c.stage,
    PROVIDER_CALLS.c.status,
    PROVIDER_CALLS.c.error_category,
    PROVIDER_CALLS.c.latency_ms,
    PROVIDER_CALLS.c.cost_usd,
)


def fold_page(session: Session, now: int, settle_s: int = SETTLE_S, page: int = PAGE) -> int:
    """Fold the next page of finished queries in the caller's transaction; how many were folded."""
    cursor = session.scalars(
        select(AnalyticsCursor).where(AnalyticsCursor.name == CURSOR).with_for_update()  # type: ignore[arg-type]
    ).first()
    if cursor is None:
        cursor = AnalyticsCursor(name=CURSOR)
        session.add(cursor)
        session.flush()
    q = QUERIES.c
    rows = session.execute(
        select(*_QUERY_COLUMNS)
        .where(
            q.finished_at.is_not(None),
            q.finished_at <= now - settle_s,
            tuple_(q.finished_at, q.id) > tuple_(cursor.finished_at, cursor.query_id),
            q.status.in_(QUERY_TERMINAL),
        )
        .order_by(q.finished_at, q.id)
        .limit(page)
    ).all()
    if not rows:
        return 0
    calls: dict[str, list[Any]] = defaultdict(list)
    ids = [r.id for r in rows]
    for call in session.execute(select(*_CALL_COLUMNS).where(PROVIDER_CALLS.c.query_id.in_(ids))):
        calls[call.query_id].append(call)
    inc = Increments()
    for row in rows:
        add_query(inc, row, calls.get(row.id, ()))
    apply(session, inc, {r.batch_id: r.tenant_id for r in rows})
    last = rows[-1]
    cursor.finished_at, cursor.query_id = last.finished_at, last.id
    cursor.folded += len(rows)
    cursor.updated_at = now
    return len(rows)


def fold_finished(
    sessions: sessionmaker[Session],
    now: int | None = None,
    settle_s: int = SETTLE_S,
    page: int = PAGE,
    max_pages: int | None = None,
) -> int:
    """Fold every query finished ``settle_s`` before ``now`` and not folded yet, a page per
    transaction; how many were folded."""
    now = int(time.time()) if now is None else now
    total = 0
    pages = 0
    while max_pages is None or pages < max_pages:
        with write_transaction(sessions) as session:
            folded = fold_page(session, now, settle_s, page)
        total += folded
        pages += 1
        if folded < page:
            break
    return total
