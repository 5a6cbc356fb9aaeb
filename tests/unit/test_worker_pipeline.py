"""The worker pipeline in-process: dramatiq's ``StubBroker`` and ``Worker``, a real SQLite file, the
simulated provider over loopback HTTP. No Redis: the runner has no breaker or limiter here.

Faults are injected at the database driver (a statement that raises ``OperationalError``, as a
deadlock or a locked SQLite does), never by replacing our own functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from dramatiq import Worker
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AsyncIO, CurrentMessage, TimeLimit
from sqlalchemy import event, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import SQLModel, col

from shared.db import make_engine, make_sessionmaker
from shared.ids import new_id, new_ids
from shared.lifecycle.statuses import BatchStatus, CallStatus, QueryStatus
from shared.lifecycle.transitions import finalize_stragglers
from shared.logs import JsonFormatter
from shared.metrics import MetricsBuffer
from shared.models import BATCHES, QUERIES, Batch, BatchUsage, ProviderCall, Query, Tenant
from shared.providers.config import simulated_catalog
from shared.providers.http import make_client
from shared.providers.registry import build_providers
from shared.queue.contract import ACTOR_NAMES, LEASE_MARGIN_S
from shared.settings import Settings
from shared.sim import SimConfig, SimServer
from workers import pipeline
from workers.broker import make_worker_broker
from workers.context import WorkerContext, build_context
from workers.journal import CallJournal
from workers.pipeline import declare_actors
from workers.runner import Runner

pytestmark = pytest.mark.timeout(60)


class Faults:
    """Makes matching statements fail ``times`` times, at the driver, before they run."""

    def __init__(self, engine: Engine):
        self.rules: list[list[Any]] = []
        event.listen(engine, "before_cursor_execute", self._before)

    def fail(self, fragment: str, times: int) -> None:
        """Statements containing ``fragment`` (any case) fail."""
        self.rules.append([fragment.upper(), times])

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        for rule in self.rules:
            if rule[1] > 0 and rule[0] in " ".join(statement.upper().split()):
                rule[1] -= 1
                raise OperationalError(statement, {}, Exception("injected: database is locked"))


class Harness:
    def __init__(self, tmp_path: Path, sim_url: str, time_limit_ms: int | None = None):
        self.settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'pipeline.db'}",
            sim_provider_url=sim_url,
            providers_file=tmp_path / "absent.toml",
        )
        self.engine = make_engine(self.settings.database_url, pool_size=4)
        SQLModel.metadata.create_all(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.faults = Faults(self.engine)
        middleware: list[Any] = [CurrentMessage(), AsyncIO()]
        if time_limit_ms is not None:
            middleware.append(TimeLimit(time_limit=time_limit_ms, interval=50))
        self.broker = StubBroker(middleware=middleware)
        if time_limit_ms is not None:
            self.broker.emit_after("process_boot")  # starts the time limit's timer thread
        catalog = simulated_catalog(sim_url)

        def runner(settings: Settings, catalog: Any, journal: CallJournal, worker_id: str) -> Runner:
            return Runner(
                catalog,
                build_providers(catalog),
                make_client(),
                min_answers=2,
                journal=journal,
                worker_id=worker_id,
            )

        self.ctx: WorkerContext = build_context(
            self.settings,
            self.broker,
            "test-worker",
            metrics=MetricsBuffer(fakeredis.FakeRedis(), "pipeline-test"),
            sessions=self.sessions,
            catalog=catalog,
            runner_factory=runner,
        )
        self.ctx.write_backoff_s = 0.01
        self.actors = declare_actors(self.broker, lambda: self.ctx)
        with self.sessions.begin() as s:
            s.add(Tenant(id="tenant_1", name="t1", webhook_secret="whsec_x", created_at=0))

    def batch(self, n: int, request: dict[str, Any] | None = None) -> tuple[str, list[str]]:
        now = int(time.time())
        batch_id = new_id("batch")
        ids = new_ids("query", n)
        council = {
            "mode": "council",
            "members": ["sim:alpha", "sim:beta", "sim:gamma"],
            "chairman": "sim:chairman",
        }
        with self.sessions.begin() as s:
            s.execute(
                insert(BATCHES),
                [
                    {
                        "id": batch_id,
                        "tenant_id": "tenant_1",
                        "status": BatchStatus.IN_PROGRESS,
                        "priority": "normal",
                        "council": council,
                        "metadata": {},
                        "completion_window": "24h",
                        "total": n,
                        "created_at": now,
                        "in_progress_at": now,
                        "expires_at": now + 86400,
                    }
                ],
            )
            s.execute(
                insert(QUERIES),
                [
                    {
                        "id": qid,
                        "batch_id": batch_id,
                        "tenant_id": "tenant_1",
                        "seq": i,
                        "custom_id": f"c{i}",
                        "status": QueryStatus.QUEUED,
                        "priority": "normal",
                        "request": request
                        if request is not None
                        else {"messages": [{"role": "user", "content": f"question {i}"}]},
                        "enqueued_at": now,
                    }
                    for i, qid in enumerate(ids)
                ],
            )
        return batch_id, ids

    def start(self, threads: int = 4) -> None:
        self.worker = Worker(self.broker, worker_timeout=50, worker_threads=threads)
        self.worker.start()

    def run(self, query_ids: list[str]) -> None:
        """Send the queries and wait until the queue is drained and every message processed."""
        for qid in query_ids:
            self.actors["normal"].send(qid)
        self.broker.join("normal", timeout=30_000)
        self.worker.join()

    def close(self) -> None:
        loop = get_event_loop_thread()
        if loop is not None:
            loop.run_coroutine(self.ctx.runner.client.aclose())
        self.worker.stop()
        self.ctx.close()
        self.broker.close()
        self.engine.dispose()

    def queries(self, batch_id: str) -> list[Query]:
        with self.sessions() as s:
            return list(
                s.scalars(select(Query).where(col(Query.batch_id) == batch_id).order_by(col(Query.seq)))
            )

    def batch_status(self, batch_id: str) -> str:
        with self.sessions() as s:
            return s.get(Batch, batch_id).status  # type: ignore[union-attr]

    def calls(self, batch_id: str) -> int:
        with self.sessions() as s:
            return len(s.scalars(select(ProviderCall).where(col(ProviderCall.batch_id) == batch_id)).all())


@pytest.fixture
def harness(tmp_path: Path, sim_server: SimServer) -> Iterator[Harness]:
    h = Harness(tmp_path, sim_server.url)
    yield h
    h.close()


@pytest.fixture
def worker_logs() -> Iterator[list[dict[str, Any]]]:
    """Every line the worker logs, as the JSON formatter renders it in the logging thread."""
    lines: list[dict[str, Any]] = []
    formatter = JsonFormatter("conclave-worker")

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(orjson.loads(formatter.format(record)))

    handler = Capture(level=logging.INFO)
    logger = logging.getLogger("conclave.worker")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_a_batch_runs_through_claim_prepare_run_settle(harness: Harness) -> None:
    batch_id, ids = harness.batch(6)
    harness.start(threads=4)
    harness.run(ids)
    queries = harness.queries(batch_id)
    assert [q.status for q in queries] == [QueryStatus.SUCCEEDED] * 6
    assert all(q.attempts == 1 and q.result and q.result["synthesis"] == "chairman" for q in queries)
    assert harness.batch_status(batch_id) == BatchStatus.COMPLETED
    # 3 answers, 3 reviews, 1 synthesis per query: every one in the ledger.
    assert harness.calls(batch_id) == 6 * 7
    assert harness.ctx.claims.items == 6 and harness.ctx.outcomes.items == 6


def test_an_outcome_write_that_fails_is_retried_and_nothing_is_lost(
    harness: Harness, worker_logs: list[dict[str, Any]]
) -> None:
    batch_id, ids = harness.batch(3)
    # The outcome's own update: fail it three times (of four attempts).
    harness.faults.fail("result=?, error=?", times=3)
    harness.start(threads=1)
    harness.run(ids)
    assert [q.status for q in harness.queries(batch_id)] == [QueryStatus.SUCCEEDED] * 3
    assert harness.calls(batch_id) == 3 * 7  # each call exactly once: failed writes left nothing
    assert harness.batch_status(batch_id) == BatchStatus.COMPLETED
    retries = [line for line in worker_logs if "retrying" in line["message"]]
    assert len(retries) == 3


def test_call_rows_are_written_before_sending_and_a_failed_write_is_retried(
    harness: Harness, worker_logs: list[dict[str, Any]]
) -> None:
    batch_id, ids = harness.batch(2)
    harness.faults.fail("INSERT INTO provider_calls", times=2)
    harness.start(threads=2)
    harness.run(ids)
    assert [q.status for q in harness.queries(batch_id)] == [QueryStatus.SUCCEEDED] * 2
    with harness.sessions() as s:
        calls = s.scalars(select(ProviderCall).where(col(ProviderCall.batch_id) == batch_id)).all()
        usage = s.get(BatchUsage, batch_id)
    assert len(calls) == 2 * 7 and all(c.call_key and c.status == CallStatus.SUCCEEDED for c in calls)
    assert usage is not None and usage.calls == 14
    assert usage.cost_usd == pytest.approx(sum(c.cost_usd for c in calls))
    assert (usage.input_tokens, usage.output_tokens) == (
        sum(c.input_tokens for c in calls),
        sum(c.output_tokens for c in calls),
    )
    assert len([line for line in worker_logs if "call rows failed" in line["message"]]) == 2


def test_a_query_cut_off_too_often_fails_with_attempts_exhausted(harness: Harness) -> None:
    """Runs that ended without an outcome (a worker killed mid-run) count; circuit waits do not."""
    batch_id, (qid,) = harness.batch(1)
    with harness.sessions.begin() as s:
        s.execute(update(Query).where(col(Query.id) == qid).values(attempts=5, circuit_waits=2))
    harness.start(threads=1)
    harness.run([qid])
    (query,) = harness.queries(batch_id)
    assert (query.status, query.error) == (QueryStatus.FAILED, pipeline.EXHAUSTED_ERROR)
    assert harness.calls(batch_id) == 0
    assert harness.batch_status(batch_id) == BatchStatus.COMPLETED


def test_a_query_past_its_time_limit_fails_and_keeps_its_calls(tmp_path: Path) -> None:
    """dramatiq's time limit interrupts the thread (a BaseException): the query used to drop its
    call records and run again, with no cap. Now it ends ``failed`` (``timeout``) and every call
    that was sent is in the ledger, marked abandoned since its answer never came."""
    with SimServer(SimConfig(latency_ms=5_000)) as slow:
        h = Harness(tmp_path, slow.url, time_limit_ms=600)
        try:
            batch_id, (qid,) = h.batch(1)
            h.start(threads=1)
            h.run([qid])
            (query,) = h.queries(batch_id)
            assert (query.status, query.error) == (QueryStatus.FAILED, pipeline.TIME_LIMIT_ERROR)
            with h.sessions() as s:
                calls = s.scalars(select(ProviderCall).where(col(ProviderCall.batch_id) == batch_id)).all()
                usage = s.get(BatchUsage, batch_id)
            # The three stage 1 calls were sent, then cut off.
            assert sorted(c.status for c in calls) == [CallStatus.ABANDONED] * 3
            assert all(c.call_key and c.input_tokens > 0 for c in calls)
            assert usage is not None and usage.calls == 3
        finally:
            h.close()


def test_a_failed_finalise_leaves_the_outcomes_and_reconciliation_finishes_the_batch(
    harness: Harness, worker_logs: list[dict[str, Any]]
) -> None:
    batch_id, ids = harness.batch(2)
    harness.faults.fail("UPDATE BATCHES", times=1_000)
    harness.start(threads=1)
    harness.run(ids)
    assert [q.status for q in harness.queries(batch_id)] == [QueryStatus.SUCCEEDED] * 2
    assert harness.batch_status(batch_id) == BatchStatus.IN_PROGRESS
    assert any("finalising" in line["message"] for line in worker_logs)
    harness.faults.rules.clear()
    with harness.sessions.begin() as s:
        assert finalize_stragglers(s, int(time.time())) == {batch_id: BatchStatus.COMPLETED}
    assert harness.batch_status(batch_id) == BatchStatus.COMPLETED


def test_a_claim_that_meets_a_database_error_is_sent_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "DB_RETRY_DELAY_MS", 50)
    batch_id, ids = harness.batch(1)
    harness.faults.fail("UPDATE QUERIES", times=1)  # the claim
    harness.start(threads=1)
    harness.run(ids)
    # The stub broker's worker moves the delayed message back once due and runs it.
    deadline = time.monotonic() + 10
    while harness.queries(batch_id)[0].status != QueryStatus.SUCCEEDED and time.monotonic() < deadline:
        harness.run([])
    assert harness.queries(batch_id)[0].status == QueryStatus.SUCCEEDED


def test_worker_log_lines_carry_the_query_and_its_own_batch(
    harness: Harness, worker_logs: list[dict[str, Any]]
) -> None:
    """One thread runs queries of two batches in turn: each line names the query it was logged
    for and that query's batch, never the previous one's. (A request document with no messages
    makes the council crash, which is logged.)"""
    first, (q1,) = harness.batch(1, request={})
    second, (q2,) = harness.batch(1, request={})
    harness.start(threads=1)
    harness.run([q1, q2])
    crashes = {line["query_id"]: line for line in worker_logs if "crashed" in line["message"]}
    assert crashes[q1]["batch_id"] == first
    assert crashes[q2]["batch_id"] == second
    assert [q.status for q in harness.queries(first)] == [QueryStatus.FAILED]


def test_actors_are_named_by_the_queue_contract(harness: Harness) -> None:
    harness.start(threads=1)
    assert {a.actor_name for a in harness.actors.values()} == set(ACTOR_NAMES.values())


def test_the_time_limit_follows_the_lease() -> None:
    """A query is stopped before its lease can pass to another worker, whatever the lease."""
    for lease in (60, 300, 900, 3600):
        broker = make_worker_broker(Settings(query_lease_seconds=lease, redis_url="redis://127.0.0.1:1/0"))
        (limit,) = [m for m in broker.middleware if isinstance(m, TimeLimit)]
        assert limit.time_limit == (lease - LEASE_MARGIN_S) * 1000 < lease * 1000
    with pytest.raises(ValueError):
        Settings(query_lease_seconds=30)
