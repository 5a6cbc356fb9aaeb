"""Deleting a batch's content (SPEC §17): ``DELETE /v1/batches/{id}`` and the retention purge.

What goes: the batch's row, its queries (requests and results), its output and error files (views,
``shared.files.views``) and its input file when no other batch was made from it, its progress sets
and lanes in Redis, and every other row keyed by it — found from the tables themselves, not listed here: any
table with a ``batch_id`` column (its counters, analytics rollups, webhook deliveries, whose bodies
hold the batch object), any with a ``query_id`` column (feedback, whose comments are content) and
any with a ``file_id`` column (an upload's chunks). A table added later is covered the day it is
added; ``tests/integration/test_batch_data.py`` checks every such table of the migrated schema.

What stays (``KEPT``): the cost ledger. ``provider_calls`` rows hold model, stage, status, tokens,
cost and ids, no prompt or answer, and ``/v1/usage`` and budgets are sums over them, so spend
already incurred stays spent. ``batch_usage`` is their per-batch sum. Tenant-wide analytics
rollups (per model and day) hold counts keyed by tenant, not by batch, and stay too. Audit rows
are append-only (SPEC §17) and never touched. The exact cache (``shared.cache``) is keyed by a
digest of the call, not by batch: its entries age out with ``CONCLAVE_CACHE_TTL_S``, and
``DELETE /v1/cache`` drops a tenant's at once.

Only a terminal batch is deleted (409 otherwise): a terminal batch never changes status again and
has no open query, so nothing is written for it after the check but ledger rows of calls that
were already in flight, which are content-free and stay anyway.

Transactions: queries go ``PAGE`` rows per transaction (a 50,000-query batch's rows are about
100 MB of JSON; one statement for all of them would hold the write lock — on SQLite, the whole
database's — for as long), then everything else in one last transaction that removes the batch's
row. A deletion cut short leaves a terminal batch with fewer queries, never rows without a batch:
calling it again (the client's retry, or the retention job) finishes it.
"""

from __future__ import annotations

import logging

import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Table, delete, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import SQLModel

from shared import progress
from shared.batches.read import get_batch
from shared.db import write_transaction
from shared.errors import Conflict
from shared.lifecycle.statuses import BATCH_TERMINAL
from shared.models import BATCHES, FILES, QUERIES
from shared.queue.fair import drop_lanes

log = logging.getLogger("conclave.batches")

# Query rows deleted per transaction.
PAGE = 1000

# Tables keyed by batch or query that keep their rows: amounts without content (module docstring).
KEPT = frozenset({"provider_calls", "batch_usage"})
# Append-only by contract (SPEC §17, the audit log): never deleted from, whatever its columns.
APPEND_ONLY_PREFIX = "audit"


def _keyed_by(column: str) -> list[Table]:
    """Tables with ``column`` whose rows go with the batch, dependents first (foreign keys)."""
    return [
        table
        for table in reversed(SQLModel.metadata.sorted_tables)
        if column in table.c
        and table.name not in KEPT
        and table.name not in (QUERIES.name, BATCHES.name)
        and not table.name.startswith(APPEND_ONLY_PREFIX)
    ]


def delete_batch(sessions: sessionmaker[Session], broker: RedisBroker, tenant_id: str, batch_id: str) -> None:
    """``DELETE /v1/batches/{id}``: the tenant's terminal batch and its content (404 for another
    tenant's or a missing batch, 409 for one still running)."""
    with sessions() as session:
        batch = get_batch(session, tenant_id, batch_id)
        if batch.status not in BATCH_TERMINAL:
            raise Conflict(
                f"batch is {batch.status}; only a batch that has ended can be deleted (cancel it first)",
                param="batch_id",
            )
    purge_batch(sessions, broker, batch_id)


def purge_batch(sessions: sessionmaker[Session], broker: RedisBroker, batch_id: str) -> int:
    """Delete a batch's content, whoever's it is (the caller checked it is terminal); idempotent.
    Returns how many query rows went."""
    deleted = 0
    query_keyed = _keyed_by("query_id")
    while True:
        with write_transaction(sessions) as session:
            ids = list(
                session.scalars(
                    select(QUERIES.c.id)
                    .where(QUERIES.c.batch_id == batch_id)
                    .order_by(QUERIES.c.seq)
                    .limit(PAGE)
                )
            )
            if not ids:
                break
            for table in query_keyed:
                session.execute(delete(table).where(table.c.query_id.in_(ids)))
            session.execute(delete(QUERIES).where(QUERIES.c.id.in_(ids)))
        deleted += len(ids)
    with write_transaction(sessions) as session:
        _delete_rest(session, batch_id)
    _forget_redis(broker, batch_id)
    return deleted


def _delete_rest(session: Session, batch_id: str) -> None:
    input_file = session.scalar(select(BATCHES.c.input_file_id).where(BATCHES.c.id == batch_id))
    files = set(session.scalars(select(FILES.c.id).where(FILES.c.batch_id == batch_id)))
    # An upload several batches were made from stays until the last of them goes.
    if input_file is not None and not _used_elsewhere(session, input_file, batch_id):
        files.add(input_file)
    if files:
        for table in _keyed_by("file_id"):
            session.execute(delete(table).where(table.c.file_id.in_(sorted(files))))
    for table in _keyed_by("batch_id"):
        session.execute(delete(table).where(table.c.batch_id == batch_id))
    if files:
        session.execute(delete(FILES).where(FILES.c.id.in_(sorted(files))))
    session.execute(delete(BATCHES).where(BATCHES.c.id == batch_id))


def _used_elsewhere(session: Session, file_id: str, batch_id: str) -> bool:
    return (
        session.scalar(
            select(BATCHES.c.id).where(BATCHES.c.input_file_id == file_id, BATCHES.c.id != batch_id).limit(1)
        )
        is not None
    )


def _forget_redis(broker: RedisBroker, batch_id: str) -> None:
    """Drop what Redis holds of the batch: its stage sets (query ids) and its fair lanes, should
    any message still wait there (an ended batch's seldom do). Neither holds content and both
    would expire or drain on their own, so Redis being down does not fail the deletion."""
    try:
        broker.client.delete(*(progress.stage_key(broker.namespace, batch_id, s) for s in progress.STAGES))
        drop_lanes(broker, [batch_id])
    except redis.RedisError as exc:
        log.warning(
            "batch %s: Redis keeps its progress sets until they expire (%s)", batch_id, type(exc).__name__
        )
