"""Intake over the in-process app on real Redis and the real database: validation, atomicity,
idempotency, tenant scoping, pagination. A rejected request stores nothing and enqueues nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlmodel import col

from api.main import create_app
from shared import keys
from shared.batches.service import IDEMPOTENCY_TTL_S
from shared.models import Batch, Query
from shared.queue.enqueue import ENQUEUE_CHUNK
from shared.queue.inspect import queue_depths
from shared.settings import PRIORITIES, Settings
from tests.conftest import new_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app_settings(settings: Settings) -> Iterator[Settings]:
    # Queues of its own: the session's worker pools, once started by other tests, would consume
    # this module's messages and change the queue depths its tests compare.
    namespace = f"{settings.queue_namespace}-intake-{uuid.uuid4().hex[:6]}"
    yield settings.model_copy(update={"max_batch_queries": 100, "queue_namespace": namespace})
    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    client.close()


@pytest.fixture(scope="module")
def app(app_settings: Settings) -> Any:
    return create_app(app_settings)


@pytest.fixture
def api(app: Any, sessions: Any) -> Iterator[TestClient]:
    key, _ = new_key(sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def snapshot(sessions: Any, app: Any) -> tuple[int, int, dict[str, int]]:
    with sessions() as s:
        batches = s.scalar(select(func.count()).select_from(Batch))
        queries = s.scalar(select(func.count()).select_from(Query))
    return batches, queries, queue_depths(app.state.conclave.broker)


def q(i: int, **extra: Any) -> dict[str, Any]:
    return {"custom_id": f"q-{i}", "prompt": f"question {i}", **extra}


BAD_BODIES = [
    pytest.param(
        {"queries": [q(0), q(1), {"custom_id": "q-0", "prompt": "again"}]},
        422,
        "queries[2].custom_id",
        id="duplicate-custom-id",
    ),
    pytest.param(
        {
            "queries": [
                q(0),
                {"custom_id": "x", "prompt": "p", "messages": [{"role": "user", "content": "m"}]},
            ]
        },
        422,
        "queries[1].prompt",
        id="both-prompt-and-messages",
    ),
    pytest.param(
        {"queries": [q(0), q(1), {"custom_id": "x"}]},
        422,
        "queries[2].prompt",
        id="neither-prompt-nor-messages",
    ),
    pytest.param({"queries": []}, 422, "queries", id="empty-queries"),
    pytest.param({"queries": [q(0)], "priority": "urgent"}, 422, "priority", id="unknown-priority"),
    pytest.param({"queries": [q(i) for i in range(101)]}, 413, "queries", id="too-many-queries"),
    pytest.param(
        {"queries": [{"custom_id": "x" * 65, "prompt": "p"}]},
        422,
        "queries[0].custom_id",
        id="custom-id-too-long",
    ),
    pytest.param(
        {"queries": [q(0)], "council": {"members": ["nope:model"]}},
        422,
        "council.members[0]",
        id="unknown-provider",
    ),
    pytest.param(
        {"queries": [q(0)], "council": {"mode": "council", "chairman": "gpt-4o"}},
        422,
        "council.chairman",
        id="bad-chairman-id",
    ),
    pytest.param(
        {"queries": [q(0)], "metadata": {f"k{i}": "v" for i in range(17)}},
        422,
        "metadata",
        id="metadata-too-many-keys",
    ),
    pytest.param({"queries": [q(0)], "completion_window": "30d"}, 422, "completion_window", id="bad-window"),
    pytest.param(
        {"queries": [{"custom_id": "a", "messages": [{"role": "robot", "content": "x"}]}]},
        422,
        "queries[0].messages[0].role",
        id="bad-role",
    ),
    pytest.param({"queries": [q(0, max_tokens=0)]}, 422, "queries[0].max_tokens", id="bad-max-tokens"),
    pytest.param(
        {"queries": [q(0)], "webhook_url": "ftp://example.com/x"}, 422, "webhook_url", id="bad-webhook-scheme"
    ),
    pytest.param({"queries": [q(0)], "surprise": 1}, 422, "surprise", id="unknown-field"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_batches_are_refused_with_param_and_change_nothing(
    api: TestClient, app: Any, sessions: Any, body: dict, status: int, param: str
) -> None:
    before = snapshot(sessions, app)
    response = api.post("/v1/batches", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] and error["message"]
    assert snapshot(sessions, app) == before


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"'])
def test_malformed_body_is_400(api: TestClient, raw: bytes) -> None:
    response = api.post("/v1/batches", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_accepted_batch_is_stored_and_enqueued_in_full(api: TestClient, app: Any, sessions: Any) -> None:
    before_batches, before_queries, before_depth = snapshot(sessions, app)
    response = api.post(
        "/v1/batches",
        json={"queries": [q(i) for i in range(50)], "priority": "low", "metadata": {"project": "x"}},
    )
    assert response.status_code == 202
    batch = response.json()
    assert batch["status"] == "in_progress" and batch["priority"] == "low"
    assert batch["metadata"] == {"project": "x"}
    assert batch["request_counts"] == {
        "total": 50,
        "completed": 0,
        "failed": 0,
        "queued": 50,
        "running": 0,
        "cancelled": 0,
        "expired": 0,
    }
    assert batch["expires_at"] == batch["created_at"] + 24 * 3600
    batches, queries, depth = snapshot(sessions, app)
    assert (batches, queries) == (before_batches + 1, before_queries + 50)
    assert depth["low"] == before_depth["low"] + 50  # no worker consumes this namespace's queues here


def test_idempotency_key_replays_or_conflicts(api: TestClient, app: Any, sessions: Any) -> None:
    body = {"queries": [q(0), q(1)]}
    first = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "abc-1"})
    before = snapshot(sessions, app)
    again = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "abc-1"})
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    other = api.post("/v1/batches", json={"queries": [q(5)]}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 409
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert snapshot(sessions, app) == before


def test_idempotency_key_expires_after_24_hours(api: TestClient, app: Any, sessions: Any) -> None:
    body = {"queries": [q(0), q(1)]}
    first = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "day-1"}).json()["id"]

    def age(batch_id: str, seconds: int) -> None:
        with sessions.begin() as s:
            s.execute(
                update(Batch)
                .where(col(Batch.id) == batch_id)
                .values(created_at=col(Batch.created_at) - seconds)
            )

    age(first, IDEMPOTENCY_TTL_S - 60)  # a minute short of a day: still replayed
    assert api.post("/v1/batches", json=body, headers={"Idempotency-Key": "day-1"}).json()["id"] == first
    age(first, 120)  # now a minute past
    before_batches, before_queries, _ = snapshot(sessions, app)
    second = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "day-1"})
    assert second.status_code == 202 and second.json()["id"] != first
    assert snapshot(sessions, app)[:2] == (before_batches + 1, before_queries + 2)
    # The new batch is what the key replays from now on; the old one keeps its queries.
    again = api.post("/v1/batches", json=body, headers={"Idempotency-Key": "day-1"})
    assert again.json()["id"] == second.json()["id"]
    assert api.get(f"/v1/batches/{first}").json()["request_counts"]["total"] == 2
    # An expired key does not conflict either: another body makes another batch.
    age(second.json()["id"], IDEMPOTENCY_TTL_S + 60)
    other = api.post("/v1/batches", json={"queries": [q(5)]}, headers={"Idempotency-Key": "day-1"})
    assert other.status_code == 202 and other.json()["id"] not in (first, second.json()["id"])


class DropsSecondFlush(redis.Redis):
    """A client whose second pipeline loses the connection after its first command ran: Redis
    going away in the middle of a bulk enqueue."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipelines = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.pipelines += 1
        if self.pipelines != 2:
            return super().pipeline(transaction, shard_hint)
        return _DroppedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _DroppedPipeline(redis.client.Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.command_stack = self.command_stack[:1]
        super().execute(raise_on_error)
        raise redis.ConnectionError("Connection closed by server.")


def test_a_queue_failure_part_way_through_the_enqueue_leaves_no_message(
    app_settings: Settings, sessions: Any
) -> None:
    # More than one flush (ENQUEUE_CHUNK messages each), on a namespace of its own.
    count = ENQUEUE_CHUNK + 1500
    namespace = f"{app_settings.queue_namespace}-drop"
    app = create_app(
        app_settings.model_copy(update={"max_batch_queries": count, "queue_namespace": namespace})
    )
    broker = app.state.conclave.broker
    before = snapshot(sessions, app)[:2]
    key, _ = new_key(sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as api:
        broker.client = flaky = DropsSecondFlush(connection_pool=broker.client.connection_pool)
        response = api.post("/v1/batches", json={"queries": [q(i) for i in range(count)]})
    assert flaky.pipelines >= 2  # the failure did happen where it was meant to
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert snapshot(sessions, app)[:2] == before
    left = {
        name: broker.client.llen(keys.queue(namespace, name))
        + broker.client.hlen(keys.queue_messages(namespace, name))
        for priority in PRIORITIES
        for name in (priority, keys.delayed_queue_name(priority))
    }
    assert left == dict.fromkeys(left, 0)


def test_auth_and_tenant_scoping(api: TestClient, app: Any, sessions: Any) -> None:
    batch_id = api.post("/v1/batches", json={"queries": [q(0)]}).json()["id"]
    query_id = None
    with TestClient(app) as anon:
        assert anon.get(f"/v1/batches/{batch_id}").status_code == 401
        assert anon.get("/v1/batches", headers={"Authorization": "Bearer cnk_wrong"}).status_code == 401
        assert anon.get("/v1/batches", headers={"Authorization": "Basic abc"}).status_code == 401
        other_key, _ = new_key(sessions)
        other = {"Authorization": f"Bearer {other_key}"}
        for method, path in [
            ("GET", f"/v1/batches/{batch_id}"),
            ("POST", f"/v1/batches/{batch_id}/cancel"),
            ("GET", f"/v1/batches/{batch_id}/results"),
            ("GET", "/v1/queries/query_unknown"),
        ]:
            response = anon.request(method, path, headers=other)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["type"] == "not_found_error"
        assert batch_id not in [b["id"] for b in anon.get("/v1/batches", headers=other).json()["data"]]
        viewer_key, _ = new_key(sessions, role="viewer")
        viewer = {"Authorization": f"Bearer {viewer_key}"}
        assert anon.post("/v1/batches", json={"queries": [q(0)]}, headers=viewer).status_code == 403
    assert query_id is None


def test_list_pages_newest_first_with_cursor(api: TestClient) -> None:
    ids = [api.post("/v1/batches", json={"queries": [q(0)]}).json()["id"] for _ in range(5)]
    page1 = api.get("/v1/batches", params={"limit": 3}).json()
    assert page1["object"] == "list" and page1["has_more"] is True
    assert [b["id"] for b in page1["data"]] == ids[::-1][:3]
    assert page1["first_id"] == ids[4] and page1["last_id"] == ids[2]
    page2 = api.get("/v1/batches", params={"limit": 3, "after": page1["last_id"]}).json()
    assert [b["id"] for b in page2["data"]] == ids[::-1][3:5]
    assert page2["has_more"] is False
    filtered = api.get("/v1/batches", params={"status": "completed"}).json()
    assert filtered["data"] == []
    assert api.get("/v1/batches", params={"status": "bogus"}).json()["error"]["param"] == "status"


def test_cancel_without_workers_cancels_everything_at_once(api: TestClient) -> None:
    batch_id = api.post("/v1/batches", json={"queries": [q(i) for i in range(10)]}).json()["id"]
    batch = api.post(f"/v1/batches/{batch_id}/cancel").json()
    assert batch["status"] == "cancelled"
    assert batch["request_counts"]["cancelled"] == 10
    results = api.get(f"/v1/batches/{batch_id}/results").text.splitlines()
    assert len(results) == 10 and all('"status":"cancelled"' in line for line in results)


def test_health_endpoints(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_openapi_lists_every_batch_endpoint(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in [
        "/v1/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
        "/v1/batches/{batch_id}/results",
        "/v1/queries/{query_id}",
        "/healthz",
        "/readyz",
    ]:
        assert path in paths
