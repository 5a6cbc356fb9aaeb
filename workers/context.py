"""A worker process's world, built once from settings and handed to the pipeline.

Nothing here runs at import: ``build_context`` takes the settings and the broker (a real one in
``workers/actors.py``, dramatiq's ``StubBroker`` in tests) and builds the database pool, the
provider runner, the metrics buffer and the coalescers that group the process's database writes
(``workers/coalesce.py``). Tests pass their own sessions, runner or Redis client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from dramatiq.broker import Broker
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.batches.read import batch_config
from shared.budget import Budgets
from shared.cache import ExactCache
from shared.db import make_engine, make_sessionmaker, write_transaction
from shared.lifecycle.transitions import (
    ClaimedQuery,
    Outcome,
    claim_queries,
    finalize_batches,
    record_outcomes,
)
from shared.metrics import MetricsBuffer
from shared.progress import ProgressBuffer
from shared.providers.config import Catalog, load_catalog
from shared.providers.http import make_client
from shared.providers.registry import build_providers
from shared.settings import Settings
from workers.coalesce import Coalescer
from workers.journal import CallJournal
from workers.runner import Runner

log = logging.getLogger("conclave.worker")

# Outcome writes are all-or-nothing transactions: a deadlock with a cancel or an expiry, or a
# busy SQLite, simply runs them again, this many times in all, backing off from WRITE_BACKOFF_S.
DB_WRITE_ATTEMPTS = 4
WRITE_BACKOFF_S = 0.2

# council, knowledge, expires_at, the creating request's trace carrier
BatchConfig = tuple[dict[str, Any], dict[str, Any] | None, int, dict[str, str] | None]


@dataclass
class WorkerContext:
    """Everything a worker process builds once: settings, DB pool, catalog, runner, metrics."""

    settings: Settings
    broker: Broker
    sessions: sessionmaker[Session]
    catalog: Catalog
    runner: Runner
    metrics: MetricsBuffer
    worker_id: str
    journal: CallJournal
    write_backoff_s: float = WRITE_BACKOFF_S
    batch_cache_size: int = 1024
    progress: ProgressBuffer | None = None  # per-stage marks for the batch event streams
    budgets: Budgets | None = None  # admission by reservation (SPEC §17); None: no budgets checked
    _batches: OrderedDict[str, BatchConfig] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.claims: Coalescer[str, ClaimedQuery | None] = Coalescer("claims", self._claim)
        self.outcomes: Coalescer[Outcome, bool] = Coalescer("outcomes", self._record)

    def close(self) -> None:
        self.claims.close()
        self.outcomes.close()
        self.journal.close()
        if self.progress is not None:
            self.progress.stop()
        if self.budgets is not None:
            self.budgets.close()

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
        start after the first commits; see ``shared.lifecycle.transitions.finalize_if_done``)."""
        for attempt in range(1, DB_WRITE_ATTEMPTS + 1):
            # Completions the journal has not written yet go with the outcomes: a batch finalised
            # next must see every call it paid for.
            finished = self.journal.take_finished()
            try:
                with write_transaction(self.sessions) as session:
                    written = record_outcomes(session, outcomes, self.worker_id, finished)
                break
            except OperationalError as exc:
                self.journal.restore(finished)
                # The provider calls these outcomes hold were paid for, so giving up early
                # would lose them from the ledger.
                if attempt == DB_WRITE_ATTEMPTS:
                    raise
                log.warning("recording %d outcomes failed (%s); retrying", len(outcomes), type(exc).__name__)
                time.sleep(self.write_backoff_s * 2 ** (attempt - 1))
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

    def batch(self, session: Session, batch_id: str) -> BatchConfig:
        """A batch's council, knowledge request and end of window: they never change once
        accepted, so they are read once per process."""
        with self._lock:
            found = self._batches.get(batch_id)
            if found is not None:
                self._batches.move_to_end(batch_id)
                return found
        found = batch_config(session, batch_id)
        with self._lock:
            self._batches[batch_id] = found
            while len(self._batches) > self.batch_cache_size:
                self._batches.popitem(last=False)
        return found

    def price(self, model: str) -> float:
        m = self.catalog.model(model)
        return m.input_usd_per_mtok + m.output_usd_per_mtok


def build_runner(settings: Settings, catalog: Catalog, journal: CallJournal, worker_id: str) -> Runner:
    redis_client = aioredis.Redis(
        # Many calls report to the breaker at once: wait for a connection, never fail for want of one.
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=10
        )
    )
    return Runner(
        catalog,
        build_providers(catalog),
        make_client(),
        retry_budget=settings.query_retry_budget,
        max_attempts=settings.call_max_attempts,
        min_answers=settings.min_answers,
        review_max_tokens=settings.review_max_tokens,
        synthesis_max_tokens=settings.synthesis_max_tokens,
        redis_client=redis_client,
        namespace=settings.queue_namespace,
        journal=journal,
        worker_id=worker_id,
        cache=ExactCache(
            redis_client,
            settings.queue_namespace,
            ttl_s=settings.cache_ttl_s,
            lock_ttl_s=settings.cache_lock_ttl_s,
        ),
    )


def build_context(
    settings: Settings,
    broker: Broker,
    worker_id: str,
    *,
    metrics: MetricsBuffer | None = None,
    sessions: sessionmaker[Session] | None = None,
    catalog: Catalog | None = None,
    runner_factory: Callable[[Settings, Catalog, CallJournal, str], Runner] = build_runner,
    progress: ProgressBuffer | None = None,
) -> WorkerContext:
    catalog = catalog or load_catalog(settings.providers_file, settings.sim_provider_url)
    sessions = sessions or make_sessionmaker(
        make_engine(settings.database_url, pool_size=settings.db_pool_size)
    )
    journal = CallJournal(sessions)
    return WorkerContext(
        settings=settings,
        broker=broker,
        sessions=sessions,
        catalog=catalog,
        journal=journal,
        runner=runner_factory(settings, catalog, journal, worker_id),
        metrics=metrics or MetricsBuffer(redis.Redis.from_url(settings.redis_url), settings.queue_namespace),
        worker_id=worker_id,
        progress=progress
        or ProgressBuffer(redis.Redis.from_url(settings.redis_url), settings.queue_namespace).start(),
        budgets=Budgets(
            redis.Redis.from_url(settings.redis_url), settings.queue_namespace, sessions, settings
        ),
    )
