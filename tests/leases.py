"""One-query forms of the lease protocol (``shared/lifecycle/transitions.py`` works on groups),
for tests that play a worker by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from shared.ledger import CallRecord
from shared.lifecycle.transitions import ClaimedQuery, Outcome, claim_queries, record_outcomes


def claim_query(
    session: Session, query_id: str, worker_id: str, lease_s: int, now: int
) -> ClaimedQuery | None:
    """Take a query for this worker, or None when it is not ours to run (done, cancelled, held)."""
    return claim_queries(session, [query_id], worker_id, lease_s, now).get(query_id)


def record_outcome(
    session: Session,
    claimed: ClaimedQuery,
    worker_id: str,
    *,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    routing: dict[str, Any] | None,
    calls: Sequence[CallRecord],
    latency_ms: int,
    now: int,
) -> bool:
    """Store the calls and the outcome. Returns False when the query was no longer ours."""
    outcome = Outcome(claimed, status, result, error, routing, calls, latency_ms, now)
    return record_outcomes(session, [outcome], worker_id)[0]
