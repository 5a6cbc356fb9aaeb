"""Re-running a batch's finished queries as a new batch (SPEC §17, ``POST /v1/batches/{id}/rerun``).

The new batch holds exactly the original's queries whose status is one of those asked for
(``failed`` and ``expired`` by default), in their original order, each with its ``custom_id`` and
its stored request doc unchanged — a file or Anthropic batch's line keeps the ``council`` its
``model`` resolved to. The batch keeps the original's council, priority, knowledge, webhook,
metadata, completion window and endpoint (so its results render as the original's did); it has no
``input_file_id`` (it was not made from a file) and a new window from now.

It goes in through the one way in, ``shared.batches.service.submit``: the tier's priority cap and
batch size, the monthly budget and the daily quota are checked as for any new batch, and the
webhook URL and metadata pass ``admission.check_terms`` again (an address that resolved publicly
when the original was made may not any more). An inline batch's council is checked against the
configured models again; a file line's own council is not (a model removed since fails that query
with its error, as it would in the original).

A batch still running may be re-run: only terminal query statuses can be asked for, a query that
reached one never leaves it, so the new batch holds the queries that had the status when the
rerun was asked for, and the original goes on running the rest. Asking again later re-runs those
again along with any that failed since: what to re-run is the caller's choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, cast

import orjson
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.batches import admission, service
from shared.batches.read import Counts, get_batch
from shared.errors import InvalidField, NotFound, PayloadTooLarge
from shared.lifecycle.statuses import QUERY_TERMINAL
from shared.models import QUERIES, Batch
from shared.providers.config import Catalog
from shared.settings import Priority, Settings, TierLimits

# Query rows read per transaction while the new batch's rows are written.
PAGE = 1000
DEFAULT_STATUSES = ("failed", "expired")


def rerun_batch(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    catalog: Catalog,
    settings: Settings,
    *,
    tenant_id: str,
    batch_id: str,
    statuses: Sequence[str] = DEFAULT_STATUSES,
    idempotency_key: str | None = None,
    limits: TierLimits | None = None,
    budget: float | Literal["lookup"] | None = "lookup",
    trace: dict[str, str] | None = None,
) -> tuple[Batch, Counts, bool]:
    """A new batch of ``batch_id``'s queries with these ``statuses``; (batch, counts, created) as
    ``service.create_batch`` returns. 404 for another tenant's batch, 422 when no query matches."""
    wanted = sorted(set(statuses))
    for i, status in enumerate(wanted):
        if status not in QUERY_TERMINAL:
            raise InvalidField(
                f"only finished queries can be re-run ({', '.join(QUERY_TERMINAL)}), not {status!r}",
                param=f"statuses[{i}]",
            )
    fingerprint = _fingerprint(batch_id, wanted) if idempotency_key else None
    if idempotency_key:
        replayed = service.replay(sessions, tenant_id, idempotency_key, fingerprint)
        if replayed is not None:
            return replayed
    with sessions() as session:
        original = get_batch(session, tenant_id, batch_id)
        total = session.scalar(
            select(func.count())
            .select_from(QUERIES)
            .where(QUERIES.c.batch_id == batch_id, QUERIES.c.status.in_(wanted))
        )
    if not total:
        raise InvalidField(f"no query of batch {batch_id!r} is {' or '.join(wanted)}", param="statuses")
    most = min(settings.max_batch_queries, limits.max_batch_queries if limits else settings.max_batch_queries)
    if total > most:
        raise PayloadTooLarge(f"a batch holds at most {most} queries; {total} match", param="statuses")
    return service.submit(
        sessions,
        broker,
        settings,
        tenant_id=tenant_id,
        admitted=_admitted(original, catalog, settings, limits),
        requests=_requests(sessions, batch_id, wanted, total),
        total=total,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        limits=limits,
        budget=budget,
        trace=trace,
    )


def _admitted(
    original: Batch, catalog: Catalog, settings: Settings, limits: TierLimits | None
) -> service.Admitted:
    priority = cast(Priority, original.priority)
    if limits is not None:
        admission.check_priority(limits, priority)
    if original.endpoint == "/v1/council":
        council = original.council
        for i, model in enumerate(council.get("members") or ()):
            if problem := catalog.check_model(model):
                raise InvalidField(f"the batch's council: {problem}", param=f"council.members[{i}]")
        if council.get("chairman") and (problem := catalog.check_model(council["chairman"])):
            raise InvalidField(f"the batch's council: {problem}", param="council.chairman")
    terms = admission.check_terms(
        settings,
        metadata=original.meta,
        webhook_url=original.webhook_url,
        completion_window=original.completion_window,
    )
    return service.Admitted(
        priority=priority,
        council=dict(original.council),
        metadata=terms.metadata,
        window=terms.window,
        window_s=terms.window_s,
        knowledge=original.knowledge,
        webhook_url=original.webhook_url,
        endpoint=original.endpoint,
    )


def _requests(
    sessions: sessionmaker[Session], batch_id: str, statuses: list[str], total: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The matching queries' (custom_id, request doc) in input order, a page per short read,
    at most ``total`` of them (the count admitted; a running batch may finish more meanwhile)."""
    after, sent = -1, 0
    while sent < total:
        with sessions() as session:
            rows = session.execute(
                select(QUERIES.c.seq, QUERIES.c.custom_id, QUERIES.c.request)
                .where(
                    QUERIES.c.batch_id == batch_id,
                    QUERIES.c.status.in_(statuses),
                    QUERIES.c.seq > after,
                )
                .order_by(QUERIES.c.seq)
                .limit(min(PAGE, total - sent))
            ).all()
        if not rows:
            # Fewer than counted: the original was deleted meanwhile. Nothing is stored.
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        for row in rows:
            yield row.custom_id, row.request
        sent += len(rows)
        after = rows[-1].seq


def _fingerprint(batch_id: str, statuses: list[str]) -> str:
    return hashlib.sha256(orjson.dumps({"rerun": batch_id, "statuses": statuses})).hexdigest()
