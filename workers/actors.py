"""dramatiq actors: thin shells that claim a query, run the council on the process's event loop,
and record the outcome. One message = one query; one actor per priority queue.

Run with ``dramatiq workers.actors --queues high normal low --processes P --threads T``: each
thread carries one query; provider calls run on the one event loop the AsyncIO middleware
owns, through one pooled HTTP client per process; claims and outcomes go through coalescers
(``workers.coalesce``) that write the whole process's in-flight queries in few transactions.

Why a thread per query and not one asyncio consumer: measured with ``benchmarks/council.py``
(5,000 queries, 2 s simulated latency, 2 processes × 256 threads) the threads cost little —
they sleep on a future while the event loop works — and the batch finished within 1.12× of the
ideal makespan at about 155 MB per process. Replacing dramatiq's worker would also mean
re-doing its prefetch, acks, heartbeats and shutdown; what cost CPU was the per-query
database round trips, which the coalescers remove.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import dramatiq
import redis
import redis.asyncio as aioredis
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import CurrentMessage
from sqlalchemy.exc import OperationalError

from shared.db import make_engine, make_sessionmaker, write_transaction
from shared.knowledge.grounding import ground
from shared.logs import batch_id_var, configure_logging
from shared.metrics import MetricsBuffer
from shared.providers.config import load_catalog
from shared.providers.http import make_client
from shared.providers.registry import build_providers
from shared.queries import (
    CallRecord,
    ClaimedQuery,
    Outcome,
    batch_config,
    claim_queries,
    finalize_batches,
    record_outcomes,
)
from shared.settings import PRIORITIES, get_settings
from shared.tracing import extract, setup_tracing, tracer
from workers.broker import ACTOR_NAMES, ACTOR_PRIORITY, install_broker
from workers.coalesce import Coalescer
from workers.council import KnowledgeSnippet
from workers.heartbeat import WorkerHeartbeat, worker_identity
from workers.routing import route
from workers.runner import Runner, circuit_requeue_delay
from workers.spans import record_call_spans

log = logging.getLogger("conclave.worker")
# A query whose claim met a database error is sent again after this long (the database may be
# restarting); reconciliation would find it too, but later.
DB_RETRY_DELAY_MS = 5_000
DB_WRITE_ATTEMPTS = 4
settings = get_settings()
broker = install_broker(settings.redis_url, settings.queue_namespace)
WORKER_ID = worker_identity(broker)
METRICS = MetricsBuffer(redis.Redis.from_url(settings.redis_url), settings.queue_namespace)
broker.add_middleware(
    WorkerHeartbeat(
        redis.Redis.from_url(settings.redis_url), settings.queue_namespace, WORKER_ID, METRICS.flush
    )
)


class WorkerContext:
    """Everything a worker process builds once: DB pool, providers, HTTP client, runner."""

    BATCH_CACHE_SIZE = 1024

    def __init__(self) -> None:
        self.settings = settings
        setup_tracing(settings, "conclave-worker")
        configure_logging(settings.log_level, "conclave-worker")
        self.sessions = make_sessionmaker(make_engine(settings.database_url, pool_size=settings.db_pool_size))
        self.catalog = load_catalog(settings.providers_file, settings.sim_provider_url)
        self.runner = Runner(
            self.catalog,
            build_providers(self.catalog),
            make_client(),
            retry_budget=settings.query_retry_budget,
            max_attempts=settings.call_max_attempts,
            min_answers=settings.min_answers,
            redis_client=aioredis.Redis(
                # Many calls report to the breaker at once: wait for a connection, never fail for want of one.
                connection_pool=aioredis.BlockingConnectionPool.from_url(
                    settings.redis_url, max_connections=64, timeout=10
                )
            ),
            namespace=settings.queue_namespace,
        )
        self.worker_id = WORKER_ID
        # A batch's council never changes once accepted, so it is read once per process.
        self._batches: OrderedDict[str, tuple[dict[str, Any], dict[str, Any] | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.claims: Coalescer[str, ClaimedQuery | None] = Coalescer("claims", self._claim)
        self.outcomes: Coalescer[Outcome, bool] = Coalescer("outcomes", self._record)

    def _claim(self, query_ids: Sequence[str]) -> list[ClaimedQuery | None]:
        now = int(time.time())
        with write_transaction(self.sessions) as session:
            claimed = claim_queries(
                session, query_ids, self.worker_id, self.settings.query_lease_seconds, now
            )
        # pop: should one message reach this process twice in a group, only one thread runs it.
        return [claimed.pop(query_id, None) for query_id in query_ids]

    def _record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Outcomes in one transaction, then their batches finalised in a second one (it must
        start after the first commits; see ``shared.queries.finalize_if_done``)."""
        for attempt in range(1, DB_WRITE_ATTEMPTS + 1):
            try:
                with write_transaction(self.sessions) as session:
                    written = record_outcomes(session, outcomes, self.worker_id)
                break
            except OperationalError as exc:
                # A deadlock with a cancel or an expiry, a busy SQLite: the transaction is
                # all-or-nothing, so it can simply run again. The provider calls it holds
                # were paid for, so giving up early would lose them from the ledger.
                if attempt == DB_WRITE_ATTEMPTS:
                    raise
                log.warning("recording %d outcomes failed (%s); retrying", len(outcomes), type(exc).__name__)
                time.sleep(0.2 * 2**attempt)
        batch_ids = [o.claimed.batch_id for o, ok in zip(outcomes, written, strict=True) if ok]
        if batch_ids:
            try:
                with write_transaction(self.sessions) as session:
                    finals = finalize_batches(session, batch_ids, now=max(o.now for o in outcomes))
            except OperationalError as exc:
                # The outcomes are stored; reconciliation finalises a batch left like this.
                log.warning("finalising %d batches failed (%s)", len(set(batch_ids)), type(exc).__name__)
                finals = {}
            for batch_id, final in finals.items():
                log.info("batch %s %s", batch_id, final)
        return written

    def batch(self, session: Any, batch_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        with self._lock:
            found = self._batches.get(batch_id)
            if found is not None:
                self._batches.move_to_end(batch_id)
                return found
        found = batch_config(session, batch_id)
        with self._lock:
            self._batches[batch_id] = found
            while len(self._batches) > self.BATCH_CACHE_SIZE:
                self._batches.popitem(last=False)
        return found


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def context() -> WorkerContext:
    global _context
    if _context is None:
        with _context_lock:
            if _context is None:
                _context = WorkerContext()
    return _context


def _process_query(query_id: str, span: Any) -> None:
    ctx = context()
    try:
        claimed = ctx.claims.submit(query_id)
    except OperationalError as exc:
        log.warning("claiming query %s failed (%s); sending it again", query_id, type(exc).__name__)
        message = CurrentMessage.get_current_message()
        if message is not None:
            broker.enqueue(message.copy(), delay=DB_RETRY_DELAY_MS)
        return
    if claimed is None:
        return  # finished, cancelled, or held by a live worker: nothing to do
    batch_id_var.set(claimed.batch_id)
    with ctx.sessions() as session:
        council, knowledge = ctx.batch(session, claimed.batch_id)
        snippets = (
            ground(session, claimed.tenant_id, claimed.request["messages"], knowledge) if knowledge else []
        )

    started = time.perf_counter()
    calls: list[CallRecord] = []
    routing = None
    members = council["members"]
    mode = council.get("mode", "council")
    if mode == "auto":
        decision = route(claimed.request["messages"], members, lambda m: _price(ctx, m))
        routing, mode, members = decision.to_dict(), decision.mode, list(decision.members)
    spec = ctx.runner.council_spec({**council, "members": members}, mode)
    try:
        loop = get_event_loop_thread()
        assert loop is not None, "the AsyncIO middleware starts the event loop at worker boot"
        grounding = tuple(KnowledgeSnippet(s["id"], s["title"], s["content"]) for s in snippets)
        result = loop.run_coroutine(
            ctx.runner.run(claimed.id, claimed.request, spec, knowledge=grounding, calls=calls)
        )
        status, error = result.status, result.error
        record = result.to_dict()
        record["citations"] = [s["id"] for s in snippets]
        if ctx.catalog.simulated:
            record["simulated"] = True
    except Exception:
        log.exception("query %s crashed", claimed.id)
        status, error, record = "failed", {"type": "internal_error", "message": "the worker failed"}, None
    latency_ms = int((time.perf_counter() - started) * 1000)

    finished = int(time.time())
    requeue_in = circuit_requeue_delay(claimed.attempts, status, calls)
    written = ctx.outcomes.submit(
        Outcome(
            claimed,
            status,
            record,
            error,
            routing,
            calls,
            latency_ms,
            finished,
            requeue_at=finished + requeue_in if requeue_in else None,
        )
    )
    if requeue_in and written:
        record_metrics(calls, None)
        message = CurrentMessage.get_current_message()
        log.warning("query %s waits %d s for an open circuit", claimed.id, requeue_in)
        if message is not None:
            # If this send is lost, reconciliation finds the query queued and sends it again.
            with contextlib.suppress(redis.RedisError):
                broker.enqueue(message.copy(), delay=requeue_in * 1000)
        return
    record_metrics(calls, status)
    span.set_attribute("conclave.batch_id", claimed.batch_id)
    span.set_attribute("conclave.status", status)
    record_call_spans(span, calls)
    if not written:
        log.warning("query %s was taken over before it finished; its outcome was not written", claimed.id)


def process_query(query_id: str) -> None:
    context()  # tracing is set up with the rest of the process's state
    message = CurrentMessage.get_current_message()
    parent = extract(message.options.get("trace") if message else None)
    with tracer().start_as_current_span(
        "query", context=parent, attributes={"conclave.query_id": query_id}
    ) as span:
        _process_query(query_id, span)


def record_metrics(calls: list[CallRecord], status: str | None) -> None:
    for call in calls:
        provider = call.model.partition(":")[0]
        METRICS.observe_latency(provider, call.model, call.latency_ms / 1000)
        if call.status == "failed":
            METRICS.inc("provider_call_errors", provider, call.error_category or "unknown")
        if call.input_tokens or call.output_tokens:
            METRICS.inc("tokens", provider, call.model, "input", value=call.input_tokens)
            METRICS.inc("tokens", provider, call.model, "output", value=call.output_tokens)
        if call.cost_usd:
            METRICS.inc("cost_usd", provider, call.model, value=call.cost_usd)
    if status is not None:  # None: handed back to the queue, not finished
        METRICS.inc("queries_finished", status)
        METRICS.count_minute("finished")


def _price(ctx: WorkerContext, model: str) -> float:
    m = ctx.catalog.model(model)
    return m.input_usd_per_mtok + m.output_usd_per_mtok


for _priority in PRIORITIES:
    dramatiq.actor(
        actor_name=ACTOR_NAMES[_priority], queue_name=_priority, priority=ACTOR_PRIORITY[_priority]
    )(process_query)
