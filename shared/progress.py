"""Per-stage progress of a batch (SPEC §12): workers record which queries passed which council
stage, the API reads the counts for its event streams and dashboard.

Owns the Redis layout of progress and nothing else: the batch's status, request counts, cost
and ETA come from the database through the batch read model (``shared.batches``); this module
adds the three stage counts and combines both into the ``progress`` document.

Layout, per batch (keys expire a week after the last write):
- ``{ns}:progress:{batch}:{stage}`` — a set of the query ids that passed ``stage``. A set, not a
  counter: a query that runs twice (a worker died, an open circuit sent it back to the queue)
  is counted once, and a count read is ``SCARD``, O(1).
- ``{ns}:progress-changed:{batch}`` — a pub/sub channel; one message per flush that touched the
  batch, so the API's reader wakes at once instead of on its next poll.

A query "passes" a stage when it is done with it, whether it went through it or skipped it:
the worker adds a finished query to every stage, so every bar ends full however many queries
failed. Queries that never reached a worker (cancelled or expired while queued) are added from
the database counts, and the database's terminal count is a floor: if Redis loses the sets,
the counts fall back to what is durable instead of to zero.

Workers buffer their marks in memory and write them in one pipeline per flush (every
``flush_s``, ``FLUSH_S`` by default), as ``shared.metrics.MetricsBuffer`` does for metrics:
passing a stage costs a query no round trip of its own.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from shared import keys
from shared.lifecycle.statuses import QUERY_TERMINAL, QueryStatus
from shared.models import QUERIES

log = logging.getLogger("conclave.progress")

STAGES = ("answer", "review", "synthesis")
KEY_TTL_S = 7 * 24 * 3600


stage_key = keys.progress_stage
changed_channel = keys.progress_changed


def batch_of_channel(namespace: str, channel: str) -> str:
    return channel.removeprefix(keys.progress_changed(namespace, ""))


# SPEC §12 caps progress events at one a second, so a change waits up to a second for the next
# event by itself; with the p95 target of 1 s from change to event, the worker's flush must stay
# small beside that (0.25 s put p95 at 0.99-1.10 s). An idle worker flushes nothing (no marks).
FLUSH_S = 0.05


class ProgressBuffer:
    """A worker process's stage marks, written to Redis in one pipeline per flush.

    ``start()`` runs a daemon thread that flushes every ``flush_s``; ``flush()`` may also be
    called directly (tests, shutdown)."""

    def __init__(self, client: redis.Redis, namespace: str, flush_s: float = FLUSH_S):
        self.client = client
        self.namespace = namespace
        self.flush_s = flush_s
        self._pending: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def passed(self, batch_id: str, query_id: str, stage: str) -> None:
        """``query_id`` is done with ``stage`` (and with the stages before it)."""
        upto = STAGES.index(stage) + 1
        with self._lock:
            for s in STAGES[:upto]:
                self._pending[(batch_id, s)].add(query_id)

    def finished(self, batch_id: str, query_id: str) -> None:
        """The query reached a terminal status: it has passed (or skipped) every stage."""
        self.passed(batch_id, query_id, STAGES[-1])

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(set)
        if not pending:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for (batch_id, stage), members in pending.items():
                key = stage_key(self.namespace, batch_id, stage)
                pipe.sadd(key, *members)
                pipe.expire(key, KEY_TTL_S)
            for batch_id in {b for b, _ in pending}:
                pipe.publish(changed_channel(self.namespace, batch_id), b"1")
            pipe.execute()
        except redis.RedisError as exc:
            # Progress must never break work. Lost marks are covered by the database floor
            # (terminal queries count as having passed every stage).
            log.warning("progress flush failed (%s); %d marks dropped", type(exc).__name__, len(pending))

    def start(self) -> ProgressBuffer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="progress-flush", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()


# A call of this stage being recorded means every call of the stage before it has ended.
_AFTER = {"review": "answer", "synthesis": "review"}


class StageCalls(list[Any]):  # a list[CallRecord] that notices the stages end
    """The runner appends each provider call to the query's call list as the call ends; the
    council starts reviews only once every answer is in, and the synthesis only once every
    review is. So the first ``review`` record marks the answer stage passed and the first
    ``synthesis`` record the review stage — without the runner knowing about progress."""

    def __init__(self, buffer: ProgressBuffer, batch_id: str, query_id: str):
        super().__init__()
        self._buffer, self._batch_id, self._query_id = buffer, batch_id, query_id
        self._marked: set[str] = set()

    def append(self, record: Any) -> None:
        super().append(record)
        passed = _AFTER.get(getattr(record, "stage", ""))
        if passed is not None and passed not in self._marked:
            self._marked.add(passed)
            self._buffer.passed(self._batch_id, self._query_id, passed)


def read_stage_sets(client: redis.Redis, namespace: str, batch_id: str) -> dict[str, int]:
    """How many queries each stage's set holds (0 for every stage when Redis is unreachable)."""
    return read_stage_sets_many(client, namespace, [batch_id])[batch_id]


def read_stage_sets_many(
    client: redis.Redis, namespace: str, batch_ids: list[str]
) -> dict[str, dict[str, int]]:
    """``read_stage_sets`` for many batches in one round trip."""
    try:
        pipe = client.pipeline(transaction=False)
        for batch_id in batch_ids:
            for stage in STAGES:
                pipe.scard(stage_key(namespace, batch_id, stage))
        values = [int(n) for n in pipe.execute()]
    except redis.RedisError:
        values = [0] * (len(batch_ids) * len(STAGES))
    n = len(STAGES)
    return {
        batch_id: dict(zip(STAGES, values[i * n : i * n + n], strict=True))
        for i, batch_id in enumerate(batch_ids)
    }


@dataclass(frozen=True)
class StageCounts:
    """Done per stage, counted in queries; every stage's total is the batch's."""

    answer: int
    review: int
    synthesis: int
    total: int

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {s: {"done": getattr(self, s), "total": self.total} for s in STAGES}

    def at_least(self, floor: StageCounts | None) -> StageCounts:
        """Never below what a client was already shown (Redis lost its sets, another replica)."""
        if floor is None:
            return self
        return StageCounts(
            max(self.answer, floor.answer),
            max(self.review, floor.review),
            max(self.synthesis, floor.synthesis),
            self.total,
        )


def stage_counts(sets: dict[str, int], batch: dict[str, Any]) -> StageCounts:
    """Combine the workers' marks with the database's counts of the batch object.

    Queries cancelled or expired before a worker ran them never reach a set, so they are added;
    the sum is capped at the total, and the terminal count is a floor (a terminal query passed
    every stage, whatever Redis remembers)."""
    counts = batch["request_counts"]
    total = int(counts["total"])
    never_ran = int(counts["cancelled"]) + int(counts["expired"])
    terminal = never_ran + int(counts["completed"]) + int(counts["failed"])
    done = [min(total, max(terminal, sets.get(s, 0) + never_ran)) for s in STAGES]
    return StageCounts(done[0], done[1], done[2], total)


def progress_document(batch: dict[str, Any], stages: StageCounts) -> dict[str, Any]:
    """The ``data`` of an ``event: progress`` (SPEC §12)."""
    return {
        "status": batch["status"],
        "request_counts": batch["request_counts"],
        "stages": stages.as_dict(),
        "eta_seconds": batch["eta_seconds"],
        "cost_usd": batch["cost_usd"],
    }


@dataclass(frozen=True)
class FinishedQuery:
    """One ``event: query``; ``(finished_at, query_id)`` is its place in the batch's finish order."""

    finished_at: int
    query_id: str
    custom_id: str
    status: str

    def as_dict(self) -> dict[str, str]:
        return {"query_id": self.query_id, "custom_id": self.custom_id, "status": self.status}


# A claim or a cancel is committed within this long of the time it stamps on its rows.
# How far back a claim may still be committing: its ``started_at`` is stamped before its
# transaction waits for the database, which a busy SQLite can stretch to seconds (CI under load saw
# more than 3 s, and a follower then met a query below a cursor it had already passed).
CLAIM_SETTLE_S = 15


def settled_before(session: Session, batch_id: str, now: int) -> int:
    """The finish order of the batch is final for every ``finished_at`` below this.

    A worker stamps ``finished_at`` when the query ends and commits a moment (or, with a busy
    database, seconds) later; until then the query is ``running`` in the database, and its
    ``finished_at`` will be at least its ``started_at``. So nothing can still appear below the
    oldest ``started_at`` of the batch's running queries — nor below the last few seconds, which
    claims and cancels may still be committing. A query held by a dead worker holds the order
    back until reconciliation takes it over: events wait, they are never reordered or lost."""
    q = QUERIES.c
    oldest_running = session.scalar(
        select(func.min(q.started_at)).where(q.batch_id == batch_id, q.status == QueryStatus.RUNNING)
    )
    bound = now - CLAIM_SETTLE_S
    return bound if oldest_running is None else min(bound, int(oldest_running))


def finished_queries(
    session: Session,
    batch_id: str,
    after: tuple[int, str] | None,
    finished_before: int | None,
    limit: int = 10_000,
) -> list[FinishedQuery]:
    """Terminal queries of the batch in finish order, after the ``(finished_at, query_id)``
    cursor, and (while the batch runs) ``finished_at`` below ``finished_before`` — see
    ``settled_before``: the order read from any replica, at any time, is then the same."""
    q = QUERIES.c
    stmt = select(q.finished_at, q.id, q.custom_id, q.status).where(
        q.batch_id == batch_id, q.status.in_(QUERY_TERMINAL), q.finished_at.is_not(None)
    )
    if after is not None:
        stmt = stmt.where(or_(q.finished_at > after[0], and_(q.finished_at == after[0], q.id > after[1])))
    if finished_before is not None:
        stmt = stmt.where(q.finished_at < finished_before)
    rows = session.execute(stmt.order_by(q.finished_at, q.id).limit(limit)).all()
    return [FinishedQuery(int(r.finished_at), r.id, r.custom_id, r.status) for r in rows]


def parse_event_stream(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """``text/event-stream`` lines → ``{event, id, data}`` dicts (comments skipped), for clients."""
    event: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in event:
                event.setdefault("event", "message")
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            event["data"] = f"{event['data']}\n{value}" if "data" in event else value
        elif name in ("event", "id"):
            event[name] = value
