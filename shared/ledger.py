"""The call ledger (SPEC §5.3, §17): one row per attempt at one provider call, and the batch totals
kept with it.

A call that is sent is written first, ``in_flight`` with its input-token estimate and that
estimate's cost (``start_calls``), and completed by its ``call_key`` when it ends
(``finish_calls``): so a worker killed mid-call (``kill -9``, a time limit, a lost host) leaves its
calls in the ledger, and reconciliation marks them ``abandoned`` (``abandon_calls``), keeping the
estimate. A call refused before it was sent (an open circuit, the local rate limiter) is written
once, when its query settles (``record_calls``).

``batch_usage`` (one row per batch, upserted) changes in the same transaction as every ledger row
of its batch (start: +1 call and the estimate; finish: actual − estimate), so a batch's totals
equal the sum of its ledger rows at every commit, whatever happened to the queries. Nothing else
writes ``provider_calls``.

Fencing (SPEC §16): a worker writes a call only under the lease it still holds. A start is refused
unless its query is still ``running`` under that worker (the call is then not sent: the journal
raises ``LeaseLost``); a completion is refused once its row is ``abandoned``, which reconciliation
does in the transaction that hands a dead worker's queries on. So a worker cut off from the network
for longer than the heartbeat timeout, which comes back with completions and new calls of queries
that now belong to another worker, changes nothing: each refusal is logged (``call write refused
(lease lost)``) and the abandoned row keeps its estimate. A query whose lease merely ran out (its
worker is alive) keeps its calls in flight, and their completions are written: nobody else will
ever end those rows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.lifecycle.statuses import CallStatus, QueryStatus
from shared.models import BATCH_USAGE, PROVIDER_CALLS, QUERIES, ProviderCall

log = logging.getLogger("conclave.ledger")
# The start of every refusal's log line: operators (and the partition test) count them by it.
REFUSED = "call write refused (lease lost)"


class LeaseLost(Exception):
    """A call was not started: its query's lease was handed on to another worker."""


@dataclass(frozen=True)
class CallRecord:
    """One attempt at one provider call, as stored in ``provider_calls``."""

    model: str
    stage: str
    attempt: int
    status: str
    error_category: str | None
    latency_ms: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    created_at: int
    # When the attempt ended (ns since the epoch): for trace spans, not stored.
    ended_ns: int = field(default=0, compare=False)
    # Set when the call was sent (its in-flight row exists); None for a call refused before sending.
    call_key: str | None = field(default=None, compare=False)
    # A ``cached`` call (answered from shared/cache.py, never sent): what it would have cost.
    saved_usd: float = 0.0

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        del data["ended_ns"]
        return data


@dataclass(frozen=True)
class CallOwner:
    """The query a call was made for: every ledger row names it."""

    query_id: str
    batch_id: str
    tenant_id: str


@dataclass(frozen=True)
class StartedCall:
    """A call about to be sent: its in-flight row."""

    call_key: str
    owner: CallOwner
    worker_id: str
    model: str
    stage: str
    attempt: int
    input_tokens: int  # the estimate
    cost_usd: float  # the estimate's input cost
    created_at: int


def start_calls(session: Session, started: Sequence[StartedCall]) -> list[StartedCall]:
    """Write the in-flight rows of calls about to be sent, for queries their worker still holds;
    returns the refused ones (not written: they must not be sent)."""
    if not started:
        return []
    session.execute(
        insert(PROVIDER_CALLS),
        [
            {
                "call_key": s.call_key,
                "worker_id": s.worker_id,
                "query_id": s.owner.query_id,
                "batch_id": s.owner.batch_id,
                "tenant_id": s.owner.tenant_id,
                "model": s.model,
                "stage": s.stage,
                "attempt": s.attempt,
                "status": CallStatus.IN_FLIGHT,
                "error_category": None,
                "latency_ms": 0,
                "input_tokens": s.input_tokens,
                "output_tokens": 0,
                "cost_usd": s.cost_usd,
                "created_at": s.created_at,
            }
            for s in started
        ],
    )
    # Checked after the insert: on SQLite the insert took the write lock, so this read cannot go
    # stale before the commit. On PostgreSQL the rows are share-locked until the commit: a
    # hand-back (an UPDATE) waits for it and then abandons these rows, or it went first and this
    # read finds the query moved. The query rows are locked before ``batch_usage``, as the
    # hand-back does; an outcome write locks them after it, but never for a query whose calls
    # are still being started.
    q = QUERIES.c
    held = {
        (row.id, row.worker_id)
        for row in session.execute(
            select(q.id, q.worker_id)
            .where(q.id.in_(sorted({s.owner.query_id for s in started})), q.status == QueryStatus.RUNNING)
            .order_by(q.id)
            .with_for_update(read=True)
        )
    }
    refused = [s for s in started if (s.owner.query_id, s.worker_id) not in held]
    if refused:
        pc = PROVIDER_CALLS.c
        session.execute(delete(PROVIDER_CALLS).where(pc.call_key.in_([s.call_key for s in refused])))
        for s in refused:
            log.warning(
                "%s: query %s is no longer held by %s; call %s (%s) not sent",
                REFUSED,
                s.owner.query_id,
                s.worker_id,
                s.call_key,
                s.model,
            )
    usage: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for s in started:
        if (s.owner.query_id, s.worker_id) in held:
            u = usage[s.owner.batch_id]
            u[0] += 1
            u[1] += s.input_tokens
            u[3] += s.cost_usd
    _add_usage(session, usage)
    return refused


def finish_calls(session: Session, finished: Sequence[CallRecord]) -> list[CallRecord]:
    """Complete sent calls with what they really cost; returns the refused ones. A call already
    ``abandoned`` is refused: its worker was presumed dead and its query handed on, and a late
    report from it must not rewrite the row (it keeps its estimate; the lease is gone)."""
    by_key = {c.call_key: c for c in finished if c.call_key}
    if not by_key:
        return []
    pc = PROVIDER_CALLS.c
    # Locked: an abandonment racing this waits for it, or went first and the row no longer matches.
    stored = session.execute(
        select(pc.call_key, pc.batch_id, pc.input_tokens, pc.output_tokens, pc.cost_usd)
        .where(pc.call_key.in_(sorted(by_key)), pc.status == CallStatus.IN_FLIGHT)
        .order_by(pc.call_key)
        .with_for_update()
    ).all()
    found = {row.call_key for row in stored}
    refused = [c for key, c in by_key.items() if key not in found]
    for c in refused:
        log.warning(
            "%s: call %s (%s) was abandoned; its completion is not written", REFUSED, c.call_key, c.model
        )
    if not stored:
        return refused
    session.execute(
        update(PROVIDER_CALLS)
        .where(pc.call_key == bindparam("_key"))
        .values(
            status=bindparam("status"),
            error_category=bindparam("error_category"),
            latency_ms=bindparam("latency_ms"),
            input_tokens=bindparam("input_tokens"),
            output_tokens=bindparam("output_tokens"),
            cost_usd=bindparam("cost_usd"),
        ),
        [
            {
                "_key": row.call_key,
                "status": by_key[row.call_key].status,
                "error_category": by_key[row.call_key].error_category,
                "latency_ms": by_key[row.call_key].latency_ms,
                "input_tokens": by_key[row.call_key].input_tokens,
                "output_tokens": by_key[row.call_key].output_tokens,
                "cost_usd": by_key[row.call_key].cost_usd,
            }
            for row in stored
        ],
    )
    usage: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for row in stored:
        actual = by_key[row.call_key]
        u = usage[row.batch_id]
        u[1] += actual.input_tokens - row.input_tokens
        u[2] += actual.output_tokens - row.output_tokens
        u[3] += actual.cost_usd - row.cost_usd
    _add_usage(session, usage)
    return refused


def record_calls(session: Session, calls: Iterable[tuple[CallOwner, CallRecord]]) -> int:
    """Insert ledger rows of calls that were never sent (no in-flight row); returns how many."""
    rows = [
        {
            **call.row(),
            "query_id": owner.query_id,
            "batch_id": owner.batch_id,
            "tenant_id": owner.tenant_id,
        }
        for owner, call in calls
        if call.call_key is None
    ]
    if not rows:
        return 0
    session.execute(insert(PROVIDER_CALLS), rows)
    usage: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0, 0, 0.0])
    for r in rows:
        u = usage[r["batch_id"]]
        if r["status"] == CallStatus.CACHED:  # not a call: a hit, and what it saved
            u[4] += 1
            u[5] += r["saved_usd"]
            continue
        u[0] += 1
        u[1] += r["input_tokens"]
        u[2] += r["output_tokens"]
        u[3] += r["cost_usd"]
    _add_usage(session, usage)
    return len(rows)


def abandon_calls(session: Session, worker_ids: Sequence[str]) -> int:
    """The in-flight calls of workers that died: ``abandoned``, with their estimate (already in the
    batch's totals). Returns how many. Their completions are refused from now on (``finish_calls``).

    Their queries still running are locked first (in id order, as every writer of query rows
    does): a start of one of their calls that got its share lock in first commits before the
    read below, which then abandons it; one that comes later waits and finds the query gone."""
    if not worker_ids:
        return 0
    q = QUERIES.c
    session.execute(
        select(q.id)
        .where(q.worker_id.in_(sorted(worker_ids)), q.status == QueryStatus.RUNNING)
        .order_by(q.id)
        .with_for_update()
    ).all()
    pc = PROVIDER_CALLS.c
    keys = session.scalars(
        select(pc.call_key)
        .where(pc.worker_id.in_(sorted(worker_ids)), pc.status == CallStatus.IN_FLIGHT)
        .order_by(pc.call_key)
        .with_for_update()
    ).all()
    if keys:
        session.execute(
            update(PROVIDER_CALLS).where(pc.call_key.in_(keys)).values(status=CallStatus.ABANDONED)
        )
    return len(keys)


def _add_usage(session: Session, usage: dict[str, list[float]]) -> None:
    """Add to batches' totals; the first call of a batch creates its row (an upsert, on SQLite and
    PostgreSQL alike)."""
    if not usage:
        return
    dialect = session.get_bind().dialect.name
    upsert = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(BATCH_USAGE)
    u = BATCH_USAGE.c
    stmt = upsert.on_conflict_do_update(
        index_elements=[u.batch_id],
        set_={
            "calls": u.calls + upsert.excluded.calls,
            "input_tokens": u.input_tokens + upsert.excluded.input_tokens,
            "output_tokens": u.output_tokens + upsert.excluded.output_tokens,
            "cost_usd": u.cost_usd + upsert.excluded.cost_usd,
            "cache_hits": u.cache_hits + upsert.excluded.cache_hits,
            "saved_usd": u.saved_usd + upsert.excluded.saved_usd,
        },
    )
    # Sorted: every writer locks batch rows in the same order, so two never deadlock on them.
    session.execute(
        stmt,
        [
            {
                "batch_id": b,
                "calls": int(v[0]),
                "input_tokens": int(v[1]),
                "output_tokens": int(v[2]),
                "cost_usd": v[3],
                "cache_hits": int(v[4]) if len(v) > 4 else 0,
                "saved_usd": v[5] if len(v) > 4 else 0.0,
            }
            for b, v in sorted(usage.items())
        ],
    )


# Latency percentiles are over the last quarter hour of recorded attempts.
LATENCY_WINDOW_S = 900
LATENCY_SAMPLE = 20_000


def recent_latencies(session: Session, since: int) -> dict[str, list[int]]:
    """Latencies (ms) of the most recent finished attempts since ``since``, by provider."""
    rows = session.execute(
        select(col(ProviderCall.model), col(ProviderCall.latency_ms))
        .where(
            col(ProviderCall.created_at) >= since,
            col(ProviderCall.status).not_in((CallStatus.IN_FLIGHT, CallStatus.CACHED)),
        )
        .order_by(col(ProviderCall.id).desc())
        .limit(LATENCY_SAMPLE)
    ).all()
    by_provider: dict[str, list[int]] = {}
    for model, latency in rows:
        by_provider.setdefault(model.partition(":")[0], []).append(latency)
    return by_provider
