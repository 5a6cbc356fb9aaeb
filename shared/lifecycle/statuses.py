"""The statuses of batches, queries and provider calls (SPEC §3.1, §5.3), as ``StrEnum``s.

They compare equal to their strings, so rows, JSON and query parameters need no conversion.
Only ``shared/lifecycle/transitions.py`` writes a batch or query status.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class QueryStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class CallStatus(StrEnum):
    """One attempt at one provider call (the ledger's rows), and a council member's outcome.

    A call sent to a provider is written ``in_flight`` before it is sent; it ends ``succeeded`` or
    ``failed``, or ``abandoned`` when its worker died first (it keeps its input-token estimate)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    IN_FLIGHT = "in_flight"
    ABANDONED = "abandoned"
    # Answered from the exact cache (shared/cache.py): never sent, costs nothing; the row keeps
    # what the call would have cost (``saved_usd``).
    CACHED = "cached"


BATCH_TERMINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED}
)
# A batch still taking work: cancel and expiry move it on from here.
BATCH_ACCEPTING = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
QUERY_TERMINAL = (QueryStatus.SUCCEEDED, QueryStatus.FAILED, QueryStatus.CANCELLED, QueryStatus.EXPIRED)
QUERY_OPEN = (QueryStatus.QUEUED, QueryStatus.RUNNING)


class ReviewStatus(StrEnum):
    """One stage 2 review: its ranking parsed (``valid``), unparseable (``invalid``), or its call
    failed."""

    VALID = "valid"
    INVALID = "invalid"
    FAILED = "failed"


class DeliveryStatus(StrEnum):
    """One webhook delivery (``scheduler/jobs/webhooks.py`` moves it on)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
