"""A batch's data lifecycle (SPEC §17) over the in-process app, real Redis and a real database of
the module's own (the retention job and the analytics fold scan the whole database): a rerun of
a batch's failed queries is a batch of exactly those; a deleted batch's content is gone from
every table and from Redis while ``/v1/usage`` stays as it was; retention deletes the same way.

Queries are finished by playing the worker by hand (``tests/leases.py``), in a queue namespace of
the module's own, so no worker process takes them and every outcome is the one the test chose.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Boolean, Float, Integer, MetaData, Numeric, String, func, inspect, or_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from api.main import create_app
from scheduler.jobs.retention import purge_old_batches
from shared import progress
from shared.analytics.rollups import fold_finished
from shared.batches.deletion import KEPT
from shared.db import make_engine, make_sessionmaker
from shared.ledger import CallRecord
from shared.lifecycle.transitions import begin_cancel, expire_batch, finalize_if_done
from shared.models import BATCHES, Batch, Query, Tenant
from shared.queue.fair import backlog
from shared.settings import Settings
from tests.conftest import migrated_database, new_key
from tests.leases import claim_query, record_outcome

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/hook"
COUNCIL = {"mode": "council", "members": ["sim:alpha", "sim:beta"], "chairman": "sim:chairman"}
ERROR = {"type": "server", "message": "the provider failed"}
# One OpenAI batch input line per (custom_id, body.model).
# What a deletion keeps: the cost ledger (amounts, no content).
LEDGER = {"provider_calls", "batch_usage"}
FILE_LINES = [("f-0", "council"), ("f-1", "sim:beta"), ("f-2", "council"), ("f-3", "sim:alpha")]


class World:
    def __init__(self, app: Any, sessions: sessionmaker[Session], client: redis.Redis, namespace: str):
        self.app, self.sessions, self.redis, self.namespace = app, sessions, client, namespace
        self.broker = app.state.conclave.broker

    def tenant(self, role: str = "admin", name: str | None = None) -> tuple[TestClient, str, str]:
        key, tenant_id = new_key(self.sessions, name, role)
        return TestClient(self.app, headers={"Authorization": f"Bearer {key}"}), key, tenant_id

    def queries(self, batch_id: str) -> list[Query]:
        with self.sessions() as s:
            return list(
                s.scalars(select(Query).where(col(Query.batch_id) == batch_id).order_by(col(Query.seq)))
            )

    def finish(self, batch_id: str, outcomes: dict[str, str], finalize: bool = True) -> None:
        """Run the named queries to these statuses, each with two ledger rows, as a worker would."""
        now = int(time.time())
        for q in self.queries(batch_id):
            status = outcomes.get(q.custom_id)
            if status is None:
                continue
            with self.sessions.begin() as s:
                claimed = claim_query(s, q.id, "worker-data", 300, now)
                assert claimed is not None
                ok = status == "succeeded"
                assert record_outcome(
                    s,
                    claimed,
                    "worker-data",
                    status=status,
                    result=_result(q.custom_id) if ok else None,
                    error=None if ok else ERROR,
                    routing=None,
                    calls=[
                        _call("sim:alpha", "answer", ok, now),
                        _call("sim:chairman", "synthesis", ok, now),
                    ],
                    latency_ms=3,
                    now=now,
                )
        if finalize:
            with self.sessions.begin() as s:
                finalize_if_done(s, batch_id, now)


def _result(custom_id: str) -> dict[str, Any]:
    return {
        "answer": f"the answer to {custom_id}",
        "synthesis": "chairman",
        "answered_by": "sim:chairman",
        "members": [
            {"model": "sim:alpha", "status": "succeeded"},
            {"model": "sim:beta", "status": "succeeded"},
        ],
        "reviews": [
            {
                "status": "valid",
                "ranking": ["sim:alpha", "sim:beta"],
                "labels": {"Response A": "sim:alpha", "Response B": "sim:beta"},
            }
        ],
    }


def _call(model: str, stage: str, ok: bool, now: int) -> CallRecord:
    return CallRecord(
        model=model,
        stage=stage,
        attempt=1,
        status="succeeded" if ok else "failed",
        error_category=None if ok else "server",
        latency_ms=7,
        input_tokens=11,
        output_tokens=5 if ok else 0,
        cost_usd=0.0125,
        created_at=now,
    )


@pytest.fixture(scope="module")
def world(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    namespace = f"{settings.queue_namespace}-data-{uuid.uuid4().hex[:6]}"
    with migrated_database("batchdata", tmp_path_factory.mktemp("batchdata")) as url:
        own = settings.model_copy(
            update={"database_url": url, "queue_namespace": namespace, "webhook_allow_private": True}
        )
        engine = make_engine(url, pool_size=4)
        client = redis.Redis.from_url(settings.redis_url)
        app = create_app(own)
        try:
            with TestClient(app):  # runs the app's startup once for the module
                yield World(app, make_sessionmaker(engine), client, namespace)
        finally:
            stale = list(client.scan_iter(f"{namespace}:*", count=1000))
            if stale:
                client.delete(*stale)
            client.close()
            app.state.conclave.broker.client.close()
            app.state.conclave.sessions.kw["bind"].dispose()
            engine.dispose()


def create(api: TestClient, n: int, prefix: str = "q", **extra: Any) -> dict[str, Any]:
    body = {
        "queries": [{"custom_id": f"{prefix}-{i}", "prompt": f"question {prefix} {i}?"} for i in range(n)]
    }
    response = api.post("/v1/batches", json={**body, **extra})
    assert response.status_code == 202, response.text
    return dict(response.json())


def file_batch(api: TestClient) -> dict[str, Any]:
    lines = b"".join(
        b'{"custom_id": "%s", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "%s",'
        b' "messages": [{"role": "user", "content": "line %s"}], "max_tokens": 64}}\n'
        % (cid.encode(), model.encode(), cid.encode())
        for cid, model in FILE_LINES
    )
    upload = api.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", lines, "application/jsonl")}
    )
    assert upload.status_code == 200, upload.text
    response = api.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def rerun(api: TestClient, batch_id: str, statuses: list[str] | None = None, **kw: Any) -> Any:
    return api.post(
        f"/v1/batches/{batch_id}/rerun", json=None if statuses is None else {"statuses": statuses}, **kw
    )


# ---------------------------------------------------------------- rerun


def test_a_rerun_of_the_failed_queries_is_a_batch_of_exactly_those(world: World) -> None:
    api, _, _ = world.tenant()
    original = create(
        api,
        7,
        council=COUNCIL,
        priority="high",
        knowledge={"domain": "health", "top_k": 2},
        webhook_url=HOOK,
        metadata={"project": "q3"},
        completion_window="2h",
    )
    statuses = ["succeeded", "failed", "failed", "succeeded", "failed", "succeeded"]
    world.finish(original["id"], {f"q-{i}": s for i, s in enumerate(statuses)}, finalize=False)
    with world.sessions.begin() as s:  # q-6 never ran: the window passed
        assert expire_batch(s, original["id"], int(time.time()))
    assert api.get(f"/v1/batches/{original['id']}").json()["status"] == "expired"
    before = {q.custom_id: q for q in world.queries(original["id"])}

    waiting = backlog(world.broker)["high"]
    response = rerun(api, original["id"], ["failed"])
    assert response.status_code == 202, response.text
    new = response.json()
    assert new["id"] != original["id"] and new["status"] == "in_progress"
    assert new["request_counts"]["total"] == 3 and new["request_counts"]["queued"] == 3
    for field in ("council", "priority", "webhook_url", "metadata", "endpoint", "completion_window"):
        assert new[field] == original[field], field
    assert new["input_file_id"] is None
    with world.sessions() as s:
        stored = s.get(Batch, new["id"])
        assert stored is not None and stored.knowledge == {"domain": "health", "top_k": 2}
    rows = world.queries(new["id"])
    assert [q.custom_id for q in rows] == ["q-1", "q-2", "q-4"]
    for q in rows:
        assert q.status == "queued" and q.priority == "high" and q.result is None and q.error is None
        assert q.request == before[q.custom_id].request
    # Each of them is a message waiting its turn at its priority, as for any created batch.
    assert backlog(world.broker)["high"] == waiting + 3

    # By default: failed and expired.
    default = rerun(api, original["id"])
    assert default.status_code == 202, default.text
    assert [q.custom_id for q in world.queries(default.json()["id"])] == ["q-1", "q-2", "q-4", "q-6"]
    # The original is unchanged.
    assert {q.custom_id: q.status for q in world.queries(original["id"])} == {
        c: q.status for c, q in before.items()
    }


def test_a_rerun_refuses_what_matches_nothing_and_keeps_tenants_roles_and_limits_apart(world: World) -> None:
    api, _, tenant_id = world.tenant()
    original = create(api, 3, priority="high")
    world.finish(original["id"], {"q-0": "succeeded", "q-1": "failed", "q-2": "succeeded"})
    bid = original["id"]

    none = rerun(api, bid, ["cancelled", "expired"])
    assert none.status_code == 422 and none.json()["error"]["param"] == "statuses", none.text
    assert rerun(api, bid, ["queued"]).status_code == 422  # only finished statuses can be asked for
    assert rerun(api, bid, []).status_code == 422

    other, _, _ = world.tenant()
    foreign = rerun(other, bid, ["failed"])
    unknown = rerun(other, bid[:-4] + "zzzz", ["failed"])
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json()["error"]["param"] == "batch_id"
    name = _tenant_name(world, tenant_id)
    viewer, _, _ = world.tenant("viewer", name)
    assert rerun(viewer, bid, ["failed"]).status_code == 403

    # The same Idempotency-Key returns the first rerun, not a second batch.
    first = rerun(api, bid, ["failed"], headers={"Idempotency-Key": "again"})
    second = rerun(api, bid, ["failed"], headers={"Idempotency-Key": "again"})
    assert first.status_code == second.status_code == 202 and first.json()["id"] == second.json()["id"]
    assert rerun(api, bid, ["succeeded"], headers={"Idempotency-Key": "again"}).status_code == 409

    # The tier and the budget are checked as for a new batch: nothing is stored when refused.
    batches_before = _batch_count(world, tenant_id)
    with world.sessions.begin() as s:
        s.execute(update(Tenant).where(col(Tenant.id) == tenant_id).values(tier="free"))
    capped = rerun(api, bid, ["failed"])
    assert capped.status_code == 403 and capped.json()["error"]["param"] == "priority", capped.text
    with world.sessions.begin() as s:
        s.execute(
            update(Tenant)
            .where(col(Tenant.id) == tenant_id)
            .values(tier="enterprise", monthly_budget_usd=0.01)
        )
    broke = rerun(api, bid, ["failed"])
    assert broke.status_code == 402, broke.text
    assert _batch_count(world, tenant_id) == batches_before


def _tenant_name(world: World, tenant_id: str) -> str:
    with world.sessions() as s:
        tenant = s.get(Tenant, tenant_id)
        assert tenant is not None
        return tenant.name


def _batch_count(world: World, tenant_id: str) -> int:
    with world.sessions() as s:
        return int(
            s.scalar(select(func.count()).select_from(BATCHES).where(BATCHES.c.tenant_id == tenant_id)) or 0
        )


def test_a_rerun_of_a_file_batch_keeps_each_lines_own_council(world: World) -> None:
    api, _, _ = world.tenant()
    original = file_batch(api)
    world.finish(original["id"], {"f-0": "succeeded", "f-1": "failed", "f-2": "failed", "f-3": "succeeded"})
    before = {q.custom_id: q.request for q in world.queries(original["id"])}
    assert before["f-1"]["council"]["mode"] == "single" and before["f-2"]["council"]["mode"] == "council"

    response = rerun(api, original["id"], ["failed"])
    assert response.status_code == 202, response.text
    new = response.json()
    assert new["endpoint"] == "/v1/chat/completions" and new["input_file_id"] is None
    rows = world.queries(new["id"])
    assert [(q.custom_id, q.request) for q in rows] == [("f-1", before["f-1"]), ("f-2", before["f-2"])]


def test_a_running_batch_reruns_what_has_failed_so_far(world: World) -> None:
    api, _, _ = world.tenant()
    original = create(api, 4)
    world.finish(original["id"], {"q-1": "failed", "q-2": "succeeded"})
    assert api.get(f"/v1/batches/{original['id']}").json()["status"] == "in_progress"
    response = rerun(api, original["id"], ["failed"])
    assert response.status_code == 202, response.text
    assert [q.custom_id for q in world.queries(response.json()["id"])] == ["q-1"]
    assert api.get(f"/v1/batches/{original['id']}").json()["status"] == "in_progress"


# ---------------------------------------------------------------- delete


def rows_of(world: World, batch_id: str, query_ids: list[str], file_ids: list[str]) -> dict[str, int]:
    """Rows of these ids in every table of the migrated schema (reflected, so a table added later
    is counted too) that has a batch, query or file column, or is the batches, queries or files."""
    keys = {"batch_id": [batch_id], "query_id": query_ids, "file_id": file_ids}
    own = {"batches": [batch_id], "queries": query_ids, "files": file_ids}
    counts: dict[str, int] = {}
    with world.sessions() as s:
        schema = MetaData()
        schema.reflect(bind=s.get_bind())
        for table in schema.sorted_tables:
            where = [table.c[c].in_(ids) for c, ids in keys.items() if c in table.c and ids]
            if own.get(table.name):
                where.append(table.c.id.in_(own[table.name]))
            if where:
                counts[table.name] = int(
                    s.scalar(select(func.count()).select_from(table).where(or_(*where))) or 0
                )
    return counts


def usage_of(api: TestClient, group_by: str | None = None) -> dict[str, Any]:
    """``/v1/usage`` this month so far, without its ``to`` (the time of the request)."""
    report = dict(api.get("/v1/usage", params={"group_by": group_by} if group_by else {}).json())
    report.pop("to")
    return report


def test_a_deleted_batch_is_gone_from_every_table_and_redis_while_usage_stays(world: World) -> None:
    api, _, _ = world.tenant()
    original = file_batch(api)
    bid = original["id"]
    # Its webhook_url gets a batch.completed delivery; its queries run with ledger rows.
    with world.sessions.begin() as s:
        s.execute(update(BATCHES).where(BATCHES.c.id == bid).values(webhook_url=HOOK))
    world.finish(bid, {"f-0": "succeeded", "f-1": "failed", "f-2": "succeeded", "f-3": "succeeded"})
    kept = create(api, 2, prefix="k")  # the tenant's other batch: untouched
    world.finish(kept["id"], {"k-0": "succeeded", "k-1": "failed"})
    queries = world.queries(bid)
    query_ids = [q.id for q in queries]
    assert (
        api.post(f"/v1/queries/{query_ids[0]}/feedback", json={"rating": 5, "comment": "great"}).status_code
        == 200
    )
    fold_finished(world.sessions, settle_s=0)
    buffer = progress.ProgressBuffer(world.redis, world.namespace)
    for q in queries:
        buffer.passed(bid, q.id, "synthesis")
    buffer.flush()
    assert progress.read_stage_sets(world.redis, world.namespace, bid) == {s: 4 for s in progress.STAGES}
    ended = api.get(f"/v1/batches/{bid}").json()
    assert ended["status"] == "completed"
    files = [original["input_file_id"], ended["output_file_id"], ended["error_file_id"]]
    assert all(api.get(f"/v1/files/{f}").status_code == 200 for f in files)
    usage = {g: usage_of(api, g) for g in (None, "model", "day")}
    assert usage[None]["calls"] == 12 and usage[None]["cost_usd"] == pytest.approx(12 * 0.0125)
    before = rows_of(world, bid, query_ids, files)
    # What there was to delete, so that the zeros below mean something.
    for table in (
        "queries",
        "files",
        "file_chunks",
        "webhook_deliveries",
        "query_feedback",
        "analytics_batch",
        "analytics_batch_stage",
        "analytics_batch_latency",
        "analytics_batch_position",
        "provider_calls",
        "batch_usage",
        "batches",
    ):
        assert before[table] > 0, (table, before)
    kept_rows = rows_of(world, kept["id"], [q.id for q in world.queries(kept["id"])], [])

    other, _, _ = world.tenant()
    assert other.delete(f"/v1/batches/{bid}").status_code == 404
    assert rows_of(world, bid, query_ids, files) == before

    response = api.delete(f"/v1/batches/{bid}")
    assert response.status_code == 204 and response.content == b"", response.text

    after = rows_of(world, bid, query_ids, files)
    assert KEPT == LEDGER
    assert {t: n for t, n in after.items() if n} == {t: before[t] for t in LEDGER}, after
    assert progress.read_stage_sets(world.redis, world.namespace, bid) == {s: 0 for s in progress.STAGES}
    assert not list(world.redis.scan_iter(f"{world.namespace}:*{bid}*", count=1000))
    # The ledger is spend, not content: usage is what it was, to the cent and the call.
    assert {g: usage_of(api, g) for g in usage} == usage
    for path in (
        f"/v1/batches/{bid}",
        f"/v1/batches/{bid}/results",
        f"/v1/queries/{query_ids[0]}",
        *(f"/v1/files/{f}" for f in files),
    ):
        assert api.get(path).status_code == 404, path
    assert bid not in {b["id"] for b in api.get("/v1/batches", params={"limit": 100}).json()["data"]}
    assert api.delete(f"/v1/batches/{bid}").status_code == 404
    assert rows_of(world, kept["id"], [q.id for q in world.queries(kept["id"])], []) == kept_rows


def test_kept_tables_hold_amounts_and_ids_only(world: World) -> None:
    """What a deletion leaves (the ledger) has no column that could hold a prompt or an answer:
    numbers, and short strings (ids, model names, statuses)."""
    with world.sessions() as s:
        inspector = inspect(s.get_bind())
        for table in LEDGER:
            for column in inspector.get_columns(table):
                kind = column["type"]
                where = (table, column["name"], repr(kind))
                if isinstance(kind, String):
                    assert kind.length is not None and kind.length <= 128, where
                else:
                    assert isinstance(kind, (Integer, Float, Numeric, Boolean)), where


def test_only_an_ended_batch_is_deleted_and_a_shared_input_file_stays_until_the_last(world: World) -> None:
    api, _, tenant_id = world.tenant()
    running = create(api, 2)
    conflict = api.delete(f"/v1/batches/{running['id']}")
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "batch_id", conflict.text
    assert api.get(f"/v1/batches/{running['id']}").status_code == 200
    viewer, _, _ = world.tenant("viewer", _tenant_name(world, tenant_id))
    assert api.post(f"/v1/batches/{running['id']}/cancel").json()["status"] == "cancelled"
    assert viewer.delete(f"/v1/batches/{running['id']}").status_code == 403
    assert api.delete(f"/v1/batches/{running['id']}").status_code == 204

    first = file_batch(api)
    file_id = first["input_file_id"]
    second = api.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    ).json()
    for b in (first, second):
        with world.sessions.begin() as s:
            begin_cancel(s, b["id"], int(time.time()))
            finalize_if_done(s, b["id"])
    assert api.delete(f"/v1/batches/{first['id']}").status_code == 204
    assert api.get(f"/v1/files/{file_id}").status_code == 200  # the second batch was made from it too
    assert api.delete(f"/v1/batches/{second['id']}").status_code == 204
    assert api.get(f"/v1/files/{file_id}").status_code == 404


# ---------------------------------------------------------------- retention


def test_retention_deletes_batches_that_ended_before_the_period_and_nothing_else(world: World) -> None:
    api, _, _ = world.tenant()
    old = [create(api, 2, prefix=f"old{i}") for i in range(3)]
    young, running = create(api, 2, prefix="young"), create(api, 2, prefix="running")
    for b in (*old, young):
        world.finish(b["id"], {q.custom_id: "succeeded" for q in world.queries(b["id"])})
    ended = api.get(f"/v1/batches/{old[0]['id']}").json()["completed_at"]
    # 30 days and an hour later; the young batch ended 2 days after the others (28 days before then).
    later = ended + 30 * 86400 + 3600
    with world.sessions.begin() as s:
        s.execute(update(BATCHES).where(BATCHES.c.id == young["id"]).values(completed_at=ended + 2 * 86400))
    usage = usage_of(api)

    purged: list[str] = []
    for _ in range(10):  # a page of 2 per run: the backlog drains over runs
        run = purge_old_batches(world.sessions, world.broker, retention_days=30, now=later, limit=2)
        if not run:
            break
        assert len(run) <= 2
        purged.extend(run)
    assert {b["id"] for b in old} <= set(purged)
    assert young["id"] not in purged and running["id"] not in purged
    for b in old:
        assert api.get(f"/v1/batches/{b['id']}").status_code == 404
        assert world.queries(b["id"]) == []
    for b in (young, running):
        assert api.get(f"/v1/batches/{b['id']}").status_code == 200
        assert len(world.queries(b["id"])) == 2
    assert usage_of(api) == usage
    # A longer period keeps them all.
    assert purge_old_batches(world.sessions, world.broker, retention_days=90, now=later) == []
