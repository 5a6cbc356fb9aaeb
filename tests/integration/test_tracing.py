"""One trace per query (SPEC §9), across the real API and worker processes (spans written by each
process to its own JSON-lines file): every query's trace holds its stages and provider calls and
links to the ``POST /v1/batches`` span that created it, and stays the same when the query is run
again (handed back by reconciliation with a message that carries no trace)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlmodel import col

from scheduler.jobs.reconcile import reconcile
from shared.lifecycle.statuses import QueryStatus
from shared.models import Query
from shared.queue.broker import make_broker
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import poll, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration


def spans(trace_file: Path) -> list[dict[str, Any]]:
    found = []
    for path in trace_file.parent.glob(trace_file.name + ".*"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def links(span: dict[str, Any]) -> list[tuple[str, str]]:
    return [(link["context"]["trace_id"], link["context"]["span_id"]) for link in span.get("links") or []]


def query_spans(found: list[dict[str, Any]], query_id: str | None = None) -> list[dict[str, Any]]:
    return [
        s for s in found if s["name"] == "query" and query_id in (None, s["attributes"]["conclave.query_id"])
    ]


def wait_for_query_spans(trace_file: Path, count: int, query_id: str | None = None) -> list[dict[str, Any]]:
    """Every span written so far, once ``count`` query spans (of ``query_id``, if given) are there."""

    def check() -> list[dict[str, Any]] | None:
        found = spans(trace_file)
        return found if len(query_spans(found, query_id)) >= count else None

    return poll(check, timeout=30, what=f"{count} query spans")


@dataclass
class Traced:
    stack: Stack
    settings: Settings
    sessions: Any
    trace_file: Path


@pytest.fixture
def traced(settings: Settings, own_database_url: str, own_sessions: Any, tmp_path: Path) -> Iterator[Traced]:
    """A stack whose processes write their spans to ``spans.jsonl.<pid>``, on queues and a
    database of its own (reconciliation scans the whole database)."""
    own = settings.model_copy(
        update={"database_url": own_database_url, "queue_namespace": f"ctest-trace-{uuid.uuid4().hex[:8]}"}
    )
    trace_file = tmp_path / "spans.jsonl"
    env = {**os.environ, **settings_env(own), "CONCLAVE_TRACE_FILE": str(trace_file)}
    stack = Stack(env=env, logs=tmp_path / "logs")
    stack.logs.mkdir()
    try:
        yield Traced(stack, own, own_sessions, trace_file)
    finally:
        stack.stop()


def test_every_query_is_a_trace_of_its_own_linked_to_the_request(traced: Traced, sim: SimServer) -> None:
    stack, sessions, trace_file = traced.stack, traced.sessions, traced.trace_file
    httpx.post(
        f"{sim.url}/_sim/config",
        json={"models": {"gamma": {"error_rate": 1.0, "error_kinds": ["invalid_request"]}}},
    )
    url = stack.start_api()
    stack.start_workers(processes=1, threads=8)
    key, _ = new_key(sessions)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        batch_id = client.post("/v1/batches", json={"queries": tagged_queries(3, prefix="tr")}).json()["id"]
        assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"

    found = wait_for_query_spans(trace_file, 3)
    [request] = [
        s
        for s in found
        if s["name"] == "POST /v1/batches" and s["attributes"].get("conclave.batch_id") == batch_id
    ]
    queries = query_spans(found)
    assert len(queries) == 3
    trace_ids = {q["context"]["trace_id"] for q in queries}
    assert len(trace_ids) == 3 and request["context"]["trace_id"] not in trace_ids
    post = (request["context"]["trace_id"], request["context"]["span_id"])
    assert all(links(q) == [post] for q in queries)
    assert {q["resource"]["attributes"]["service.name"] for q in queries} == {"conclave-worker"}
    for query in queries:
        in_trace = [s for s in found if s["context"]["trace_id"] == query["context"]["trace_id"]]
        stages = [s for s in in_trace if s["name"].startswith("stage ")]
        assert {s["name"] for s in stages} == {"stage answer", "stage review", "stage synthesis"}
        assert all(s["parent_id"] == query["context"]["span_id"] for s in stages)
        calls = [s for s in in_trace if s["name"].startswith("provider ")]
        # 3 answers (gamma fails), 2 reviews, 1 synthesis.
        assert len(calls) == 6
        for call in calls:
            attrs = call["attributes"]
            assert attrs["conclave.provider"] == "sim" and attrs["conclave.model"].startswith("sim:")
            assert "conclave.input_tokens" in attrs and "conclave.cost_usd" in attrs
        failed = [c for c in calls if c["attributes"]["conclave.model"] == "sim:gamma"]
        assert failed and all(c["attributes"]["conclave.error_category"] == "invalid_request" for c in failed)
        ok = [c for c in calls if c["attributes"]["conclave.status"] == "succeeded"]
        assert all(c["attributes"]["conclave.input_tokens"] > 0 for c in ok)


def test_a_query_handed_back_by_reconciliation_runs_again_in_the_same_trace(
    traced: Traced, sim: SimServer
) -> None:
    stack, sessions, trace_file = traced.stack, traced.sessions, traced.trace_file
    # Slow enough that the first run is still going when its lease is made to run out.
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 1500}).raise_for_status()
    url = stack.start_api()
    stack.start_workers(processes=1, threads=8)
    key, _ = new_key(sessions)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        batch_id = client.post("/v1/batches", json={"queries": tagged_queries(1, prefix="rc")}).json()["id"]

        def running() -> str | None:
            with sessions() as s:
                row = s.execute(
                    select(col(Query.id), col(Query.status)).where(col(Query.batch_id) == batch_id)
                ).one()
                return row.id if row.status == QueryStatus.RUNNING else None

        query_id = poll(running, timeout=30, interval=0.05, what="the query running")
        # Its holder's lease ran out: reconciliation hands the query back with a new message,
        # which carries no trace (the scheduler never saw the request).
        with sessions.begin() as s:
            s.execute(
                update(Query).where(col(Query.id) == query_id).values(lease_expires_at=int(time.time()) - 1)
            )
        broker = make_broker(traced.settings.redis_url, traced.settings.queue_namespace)
        try:
            assert reconcile(sessions, broker) == 1
        finally:
            broker.close()
        assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"

    found = wait_for_query_spans(trace_file, 2, query_id)
    runs = query_spans(found, query_id)
    assert len(runs) == 2
    [request] = [
        s
        for s in found
        if s["name"] == "POST /v1/batches" and s["attributes"].get("conclave.batch_id") == batch_id
    ]
    assert runs[0]["context"]["trace_id"] == runs[1]["context"]["trace_id"]
    assert runs[0]["parent_id"] == runs[1]["parent_id"]
    post = (request["context"]["trace_id"], request["context"]["span_id"])
    assert all(links(r) == [post] for r in runs)
