"""Tier limits, budgets, the body cap and idempotency under a race (SPEC §3, §6), over the
in-process app on a private database (its day's and month's totals are this test's alone) and a
private Redis namespace (no worker takes its messages)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from api.main import create_app
from shared.db import make_engine, make_sessionmaker
from shared.models import PROVIDER_CALLS, Batch, Query, Tenant
from shared.queue.inspect import queue_depths
from shared.settings import DEFAULT_TIERS, Settings
from shared.tenants import issue_key
from shared.usage import month_start
from tests.conftest import new_key
from tests.helpers import error_body

pytestmark = pytest.mark.integration

FREE = DEFAULT_TIERS["free"]
FREE_PER_DAY = FREE.queries_per_day or 0


@dataclass
class Private:
    settings: Settings
    sessions: sessionmaker[Session]
    apps: list[FastAPI] = field(default_factory=list)

    def app(self, **update: Any) -> FastAPI:
        app = create_app(self.settings.model_copy(update=update))
        self.apps.append(app)
        return app


@pytest.fixture
def private(settings: Settings, private_database_url: str) -> Iterator[Private]:
    namespace = f"{settings.queue_namespace}-tiers-{uuid.uuid4().hex[:6]}"
    engine = make_engine(private_database_url, pool_size=4)
    env = Private(
        settings.model_copy(update={"database_url": private_database_url, "queue_namespace": namespace}),
        make_sessionmaker(engine),
    )
    yield env
    for app in env.apps:
        app.state.conclave.broker.client.close()
        app.state.conclave.sessions.kw["bind"].dispose()
    engine.dispose()
    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def free_tenant(sessions: sessionmaker[Session]) -> tuple[str, str]:
    with sessions.begin() as s:
        issued = issue_key(s, tenant_name=f"free-{uuid.uuid4().hex[:10]}", role="admin", tier="free")
    return issued.api_key, issued.tenant_id


def queries(n: int, prefix: str = "q") -> list[dict[str, str]]:
    return [{"custom_id": f"{prefix}-{i}", "prompt": f"question {i}"} for i in range(n)]


def stored(sessions: sessionmaker[Session], tenant_id: str) -> tuple[int, int]:
    with sessions() as s:
        batches = s.scalar(select(func.count()).select_from(Batch).where(col(Batch.tenant_id) == tenant_id))
        rows = s.scalar(select(func.count()).select_from(Query).where(col(Query.tenant_id) == tenant_id))
    return int(batches or 0), int(rows or 0)


def snapshot(app: FastAPI, sessions: sessionmaker[Session], tenant_id: str) -> tuple[Any, ...]:
    return (*stored(sessions, tenant_id), queue_depths(app.state.conclave.broker))


def assert_error(response: Any, status: int, type_: str, param: str | bool | None = False) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = error_body(response)
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param"}, body
    error = body["error"]
    assert error["type"] == type_ and isinstance(error["message"], str) and error["message"], error
    if param is not False:
        assert error["param"] == param, error
    return dict(error)


def set_limits(sessions: sessionmaker[Session], tenant_id: str, **values: Any) -> None:
    with sessions.begin() as s:
        s.execute(update(Tenant).where(col(Tenant.id) == tenant_id).values(**values))


def add_cost(sessions: sessionmaker[Session], tenant_id: str, usd: float, at: int | None = None) -> None:
    with sessions.begin() as s:
        s.execute(
            insert(PROVIDER_CALLS),
            [
                {
                    "query_id": f"query_{uuid.uuid4().hex[:12]}",
                    "batch_id": "batch_elsewhere",
                    "tenant_id": tenant_id,
                    "model": "sim:alpha",
                    "stage": "answer",
                    "attempt": 1,
                    "status": "succeeded",
                    "latency_ms": 10,
                    "input_tokens": 100,
                    "output_tokens": 100,
                    "cost_usd": usd,
                    "created_at": at if at is not None else int(time.time()),
                }
            ],
        )


# ---------------------------------------------------------------- tiers


def test_free_tier_caps_batch_size_and_priority(private: Private) -> None:
    app = private.app()
    key, tenant_id = free_tenant(private.sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        before = snapshot(app, private.sessions, tenant_id)
        big = api.post("/v1/batches", json={"queries": queries(FREE.max_batch_queries + 1)})
        error = assert_error(big, 413, "request_too_large", "queries")
        assert "tier" in error["message"] and str(FREE.max_batch_queries) in error["message"]
        high = api.post("/v1/batches", json={"queries": queries(1), "priority": "high"})
        error = assert_error(high, 403, "permission_error", "priority")
        assert "tier" in error["message"]
        assert snapshot(app, private.sessions, tenant_id) == before
        # At the cap, and at the highest priority the tier allows: accepted.
        ok = api.post("/v1/batches", json={"queries": queries(FREE.max_batch_queries), "priority": "normal"})
        assert ok.status_code == 202, ok.text


def test_free_tier_daily_quota_and_a_tenant_override(private: Private) -> None:
    assert FREE_PER_DAY == 1_000
    app = private.app()
    key, tenant_id = free_tenant(private.sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        assert api.post("/v1/batches", json={"queries": queries(600)}).status_code == 202
        assert api.post("/v1/batches", json={"queries": queries(400)}).status_code == 202
        before = snapshot(app, private.sessions, tenant_id)
        assert before[:2] == (2, 1000)

        refused = api.post("/v1/batches", json={"queries": queries(1)})
        now = int(time.time())
        error = assert_error(refused, 429, "quota_exceeded", "queries")
        assert "1000" in error["message"]
        until_midnight = 86400 - now % 86400
        assert abs(int(refused.headers["Retry-After"]) - until_midnight) <= 2, refused.headers
        assert snapshot(app, private.sessions, tenant_id) == before  # nothing stored, nothing queued
        assert_error(
            api.post("/v1/batches", json={"queries": queries(1), "priority": "high"}), 403, "permission_error"
        )

        # A per-tenant override lifts both the quota and the priority cap, at once.
        set_limits(private.sessions, tenant_id, limits={"queries_per_day": 2000, "max_priority": "high"})
        lifted = api.post("/v1/batches", json={"queries": queries(1000), "priority": "high"})
        assert lifted.status_code == 202, lifted.text
        assert lifted.json()["priority"] == "high"
        assert_error(api.post("/v1/batches", json={"queries": queries(1)}), 429, "quota_exceeded", "queries")
        # What the override does not name stays the tier's.
        assert_error(api.post("/v1/batches", json={"queries": queries(1001)}), 413, "request_too_large")
    assert stored(private.sessions, tenant_id) == (3, 2000)


def test_daily_quota_holds_under_concurrent_submissions(private: Private) -> None:
    app = private.app()
    key, tenant_id = free_tenant(private.sessions)
    n, size = 8, 300  # 8 x 300 = 2,400 asked for; the quota admits 3 batches (900 queries)
    barrier = threading.Barrier(n)
    statuses: list[int] = []
    lock = threading.Lock()
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:

        def submit(i: int) -> None:
            barrier.wait(timeout=30)
            status = api.post("/v1/batches", json={"queries": queries(size, f"r{i}")}).status_code
            with lock:
                statuses.append(status)

        run_threads(n, submit)
    batches, rows = stored(private.sessions, tenant_id)
    print(f"\nconcurrent quota: statuses {sorted(statuses)}; stored {batches} batches, {rows} queries")
    assert sorted(set(statuses)) <= [202, 429]
    assert rows <= FREE_PER_DAY, f"{rows} queries stored in a day against a quota of 1000"
    assert statuses.count(202) == batches == FREE_PER_DAY // size


# ---------------------------------------------------------------- budget


def test_spent_budget_refuses_new_batches_with_402(private: Private) -> None:
    app = private.app()
    key, tenant_id = free_tenant(private.sessions)
    budget = private.settings.tier_monthly_budget_usd["free"]
    assert budget == 10.0
    # Last month's spending does not count against this month.
    add_cost(private.sessions, tenant_id, 500.0, at=month_start(int(time.time())) - 10)
    add_cost(private.sessions, tenant_id, 9.5)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        assert api.post("/v1/batches", json={"queries": queries(2)}).status_code == 202
        add_cost(private.sessions, tenant_id, 0.5)  # month to date: exactly the budget
        before = snapshot(app, private.sessions, tenant_id)
        refused = api.post("/v1/batches", json={"queries": queries(2)})
        error = assert_error(refused, 402, "budget_exceeded")
        assert "10.00" in error["message"]
        assert snapshot(app, private.sessions, tenant_id) == before
        # The tenant's own budget overrides the tier's.
        set_limits(private.sessions, tenant_id, monthly_budget_usd=25.0)
        assert api.post("/v1/batches", json={"queries": queries(2)}).status_code == 202


# ---------------------------------------------------------------- body cap


def test_declared_body_over_the_cap_is_refused_before_it_is_read(private: Private) -> None:
    app = private.app(max_request_bytes=2048)
    key, tenant_id = new_key(private.sessions)
    body = {"queries": [{"custom_id": "big", "prompt": "x" * 4000}]}
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        before = snapshot(app, private.sessions, tenant_id)
        response = api.post("/v1/batches", json=body)
        assert int(response.request.headers["content-length"]) > 2048
        assert_error(response, 413, "request_too_large", None)
        assert snapshot(app, private.sessions, tenant_id) == before
        assert api.post("/v1/batches", json={"queries": queries(2)}).status_code == 202


def test_declared_body_over_the_cap_is_answered_without_reading_it(private: Private) -> None:
    """Straight through ASGI: the 413 goes out without one call to receive()."""
    app = private.app(max_request_bytes=2048)
    key, _ = new_key(private.sessions)
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        message = {"type": "http.request", "body": b"x" * 4096, "more_body": False}
        received.append(message)
        return message

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/batches",
        "raw_path": b"/v1/batches",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", b"100000000"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert received == []
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        pytest.fail(f"413 is not in SPEC's JSON error shape: {sent[0].get('headers')} {raw[:200]!r}")
    assert set(payload) == {"error"} and payload["error"]["type"] == "request_too_large"
    assert set(payload["error"]) == {"type", "message", "param"}


def test_chunked_body_over_the_cap_is_refused(private: Private) -> None:
    app = private.app(max_request_bytes=2048)
    key, tenant_id = new_key(private.sessions)

    def chunks() -> Iterator[bytes]:
        yield b'{"queries": [{"custom_id": "big", "prompt": "'
        for _ in range(16):
            yield b"y" * 512
        yield b'"}]}'

    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        before = snapshot(app, private.sessions, tenant_id)
        response = api.post("/v1/batches", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert_error(response, 413, "request_too_large")
        assert snapshot(app, private.sessions, tenant_id) == before

        def small() -> Iterator[bytes]:
            yield b'{"queries": [{"custom_id": "s", '
            yield b'"prompt": "fits"}]}'

        ok = api.post("/v1/batches", content=small(), headers={"content-type": "application/json"})
        assert ok.status_code == 202, ok.text


# ---------------------------------------------------------------- idempotency race


def run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    if errors:
        raise errors[0]


def test_idempotency_key_race_stores_exactly_one_batch(private: Private) -> None:
    app = private.app()
    key, tenant_id = new_key(private.sessions)
    n = 8
    body = {"queries": queries(25), "metadata": {"run": "race"}}
    barrier = threading.Barrier(n)
    responses: list[Any] = []
    lock = threading.Lock()
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        depth_before = queue_depths(app.state.conclave.broker)

        def submit(_: int) -> None:
            barrier.wait(timeout=30)
            response = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "race-1"})
            with lock:
                responses.append(response)

        run_threads(n, submit)
        depth_after = queue_depths(app.state.conclave.broker)
    assert [r.status_code for r in responses] == [202] * n, [(r.status_code, r.text) for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert stored(private.sessions, tenant_id) == (1, 25)
    # Only the winner enqueued: no orphan messages for the losers' rows.
    assert depth_after["normal"] - depth_before["normal"] == 25
