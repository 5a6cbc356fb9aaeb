"""Actors and messages: what a producer sends and a worker runs (one message = one query).

One queue per priority (``high``, ``normal``, ``low``): dramatiq's Redis broker has no
per-message priority, so a worker pool chooses what it serves by the queues it consumes, and
within one process the actor priority orders what it has prefetched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from dramatiq.message import Message

from shared.settings import PRIORITIES, Priority

# Actor priority within one worker process: lower runs first.
ACTOR_PRIORITY = {"high": 0, "normal": 10, "low": 20}
ACTOR_NAMES = {p: f"run_query_{p}" for p in PRIORITIES}

# A query's time limit stays this far inside its lease: a query killed by the limit has ended
# before anyone may take it over, so one query never runs twice at once however the lease is set.
LEASE_MARGIN_S = 30


def time_limit_ms(lease_s: int) -> int:
    """dramatiq's time limit for a query, derived from the lease (``CONCLAVE_QUERY_LEASE_SECONDS``)."""
    return max(1, lease_s - LEASE_MARGIN_S) * 1000


def query_message(query_id: str, priority: Priority, trace: dict[str, str] | None = None) -> Message:
    # The query id doubles as the Redis message id, so reconciliation can ask Redis whether a
    # query's message still exists (queued or in flight) with one HEXISTS per query.
    options: dict[str, object] = {"redis_message_id": query_id}
    if trace:
        options["trace"] = trace
    return Message(
        queue_name=priority,
        actor_name=ACTOR_NAMES[priority],
        args=(query_id,),
        kwargs={},
        options=options,
        message_id=query_id,  # unique already; saves a uuid4 per message
    )


# Threads kept for ``high`` in a process that also serves lower queues (see workers/broker.py):
# `conclave worker` adds them on top of --threads and tells the worker how many through this
# environment variable.
HIGH_RESERVE = 0.125
HIGH_RESERVE_ENV = "CONCLAVE_HIGH_RESERVE_THREADS"


def serves_high_and_lower(queues: Iterable[str]) -> bool:
    served = set(queues)
    return "high" in served and bool(served & {"normal", "low"})


def high_reserve(threads: int, queues: Iterable[str]) -> int:
    """Extra threads a process gets for ``high`` work on top of ``threads`` for the rest."""
    return max(1, math.ceil(threads * HIGH_RESERVE)) if serves_high_and_lower(queues) else 0
