"""Access control over the in-process app on real Redis and the real database (SPEC §3, §6):
tenant isolation on every route that takes an id, roles, authentication on every /v1 route,
the operator-only admin endpoints, and API key management.

Routes are enumerated from the app itself: a new route that these tables do not know fails here.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
import redis.asyncio as aioredis
from dramatiq.brokers.redis import RedisBroker
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, update
from sqlmodel import col

from api.main import create_app
from shared import keys
from shared.knowledge.parse import ParsedArticle
from shared.knowledge.store import store_articles
from shared.models import DELIVERIES, PROVIDER_CALLS, ApiKey, Article, Feed, Query
from shared.providers.breaker import BreakerConfig, CircuitBreaker
from shared.settings import Settings
from shared.tenants import hash_key, issue_key
from tests.conftest import new_key
from tests.helpers import error_body, poll
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

HOOK = "http://127.0.0.1:9/hook"
ARTICLE_WORD = "zebracorn"
Route = tuple[str, str]  # (method, path template)

# Every /v1 route and what an admin, a user and a viewer of an ordinary (non-operator) tenant
# get for a valid request on their own tenant's resources.
ROLE_TABLE: dict[Route, tuple[int, int, int]] = {
    ("POST", "/v1/batches"): (202, 202, 403),
    ("GET", "/v1/batches"): (200, 200, 200),
    ("GET", "/v1/batches/{batch_id}"): (200, 200, 200),
    # SPEC §17, before the cancel: none of the walk's queries has failed or expired (a rerun with
    # no body asks for those), and a batch still running cannot be deleted.
    ("POST", "/v1/batches/{batch_id}/rerun"): (422, 422, 403),
    ("DELETE", "/v1/batches/{batch_id}"): (409, 409, 403),
    ("POST", "/v1/batches/{batch_id}/cancel"): (200, 200, 403),
    ("GET", "/v1/batches/{batch_id}/results"): (200, 200, 200),
    ("GET", "/v1/queries/{query_id}"): (200, 200, 200),
    ("POST", "/v1/webhooks"): (201, 403, 403),
    ("GET", "/v1/webhooks"): (200, 200, 200),
    ("DELETE", "/v1/webhooks/{webhook_id}"): (200, 403, 403),
    ("GET", "/v1/webhook-secret"): (200, 403, 403),
    ("POST", "/v1/webhook-secret/rotate"): (200, 403, 403),
    ("GET", "/v1/webhooks/deliveries"): (200, 200, 200),
    ("POST", "/v1/webhooks/deliveries/{delivery_id}/redeliver"): (200, 403, 403),
    ("GET", "/v1/usage"): (200, 200, 200),
    ("POST", "/v1/keys"): (201, 403, 403),
    ("GET", "/v1/keys"): (200, 403, 403),
    ("PATCH", "/v1/keys/{key_id}"): (200, 403, 403),
    ("DELETE", "/v1/keys/{key_id}"): (200, 403, 403),
    ("POST", "/v1/knowledge/feeds"): (201, 403, 403),
    ("GET", "/v1/knowledge/feeds"): (200, 200, 200),
    ("POST", "/v1/knowledge/feeds/{feed_id}/import"): (202, 403, 403),
    ("GET", "/v1/knowledge/articles"): (200, 200, 200),
    ("GET", "/v1/knowledge/articles/{article_id}"): (200, 200, 200),
    ("DELETE", "/v1/knowledge/feeds/{feed_id}"): (
        200,
        403,
        403,
    ),  # after the article reads: it takes them along
    ("GET", "/v1/admin/queues"): (403, 403, 403),
    ("GET", "/v1/admin/providers"): (403, 403, 403),
    ("GET", "/v1/admin/anomalies"): (403, 403, 403),
    # SPEC §11: files and the Anthropic view of the same batches.
    ("POST", "/v1/files"): (200, 200, 403),
    ("GET", "/v1/files"): (200, 200, 200),
    ("GET", "/v1/files/{file_id}"): (200, 200, 200),
    ("GET", "/v1/files/{file_id}/content"): (200, 200, 200),
    ("DELETE", "/v1/files/{file_id}"): (200, 200, 403),  # after the file reads
    ("POST", "/v1/messages/batches"): (200, 200, 403),
    ("GET", "/v1/messages/batches"): (200, 200, 200),
    ("GET", "/v1/messages/batches/{batch_id}"): (200, 200, 200),
    ("GET", "/v1/messages/batches/{batch_id}/results"): (200, 200, 200),
    ("POST", "/v1/messages/batches/{batch_id}/cancel"): (200, 200, 403),
    # SPEC §12: a stream, read on an ended batch (it ends with the batch; see call()).
    ("GET", "/v1/batches/{batch_id}/events"): (200, 200, 200),
    # SPEC §13: analytics read what the tenant owns; feedback is a user's.
    ("GET", "/v1/analytics/models"): (200, 200, 200),
    ("GET", "/v1/batches/{batch_id}/report"): (200, 200, 200),
    # The walk's queries never ran (no worker here): a writer passes the role gate and meets 409.
    ("POST", "/v1/queries/{query_id}/feedback"): (409, 409, 403),
    # SPEC §14, §17: a tenant admin empties its cache; only operator admins change tenants.
    ("DELETE", "/v1/cache"): (200, 403, 403),
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): (403, 403, 403),
    # SPEC §17: the audit log is read by the tenant's admins.
    ("GET", "/v1/audit"): (200, 403, 403),
    # SPEC §13: experiments are made and rolled out by writers, read by all.
    ("POST", "/v1/experiments"): (201, 201, 403),
    ("GET", "/v1/experiments"): (200, 200, 200),
    ("GET", "/v1/experiments/{experiment_id}"): (200, 200, 200),
    ("PATCH", "/v1/experiments/{experiment_id}"): (200, 200, 403),
}
# Operator routes name a tenant on purpose: no tenant's key reaches them (403 before any lookup).
OPERATOR_ID_ROUTES: set[Route] = {("PATCH", "/v1/admin/tenants/{tenant_id}")}
# The dashboard's pages take a session cookie, not a key: their tenant isolation is
# tests/browser/test_dashboard.py::test_another_tenants_batch_is_404_on_every_page_and_stream.
# A new one must be added there and here.
DASHBOARD_ID_ROUTES: set[Route] = {
    ("GET", "/dashboard/batches/{batch_id}"),
    ("GET", "/dashboard/batches/{batch_id}/events"),
    ("GET", "/dashboard/batches/{batch_id}/results"),
    ("POST", "/dashboard/batches/{batch_id}/cancel"),
    ("GET", "/dashboard/data/batches/{batch_id}"),
    ("GET", "/dashboard/static/{name}"),  # no tenant data
}
ID_NAMES = (
    "batch_id",
    "query_id",
    "webhook_id",
    "delivery_id",
    "key_id",
    "feed_id",
    "article_id",
    "file_id",
    "experiment_id",
)
ROLE_COLUMN = {"admin": 0, "user": 1, "viewer": 2}

BODIES: dict[Route, dict[str, Any]] = {
    ("POST", "/v1/batches"): {"queries": [{"custom_id": "x-0", "prompt": "hello?"}]},
    ("POST", "/v1/webhooks"): {"url": HOOK, "events": ["batch.completed"]},
    ("POST", "/v1/keys"): {"role": "viewer"},
    ("POST", "/v1/queries/{query_id}/feedback"): {"rating": 4},
    ("POST", "/v1/experiments"): {
        "name": "acl-new",
        "metric": "cost",
        "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
    },
    ("PATCH", "/v1/experiments/{experiment_id}"): {"variants": [{"name": "a", "weight": 2}]},
    ("PATCH", "/v1/admin/tenants/{tenant_id}"): {"budget_usd_monthly": 5.0},
    ("POST", "/v1/knowledge/feeds"): {"url": "http://127.0.0.1:9/feed.xml", "domain": "acl-test"},
    ("POST", "/v1/messages/batches"): {
        "requests": [
            {
                "custom_id": "m-0",
                "params": {
                    "model": "council",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
        ]
    },
}
# One OpenAI batch input line (SPEC §11), uploaded as a multipart file.
FILE_LINE = (
    b'{"custom_id": "f-0", "method": "POST", "url": "/v1/chat/completions",'
    b' "body": {"model": "council", "messages": [{"role": "user", "content": "hello?"}]}}\n'
)
# Streams that only end with their batch: read on a batch that has ended.
ENDED_BATCH_ROUTES = {("GET", "/v1/batches/{batch_id}/events")}

# Lists that must never show another tenant's items, and the id kind each lists.
LISTS = {
    "/v1/batches": "batch_id",
    "/v1/webhooks": "webhook_id",
    "/v1/webhooks/deliveries": "delivery_id",
    "/v1/keys": "key_id",
    "/v1/knowledge/feeds": "feed_id",
    "/v1/knowledge/articles": "article_id",
    "/v1/files": "file_id",
    "/v1/messages/batches": "batch_id",
    "/v1/experiments": "experiment_id",
}


def app_routes(app: FastAPI) -> set[Route]:
    routes: set[Route] = set()
    for route in iter_route_contexts(app.routes):
        path = route.path
        if not path:
            continue
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((method, path))
    return routes


def v1_routes(app: FastAPI) -> set[Route]:
    return {r for r in app_routes(app) if r[1].startswith("/v1/")}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: Any, status: int, type_: str, param: str | bool | None = False) -> dict[str, Any]:
    """SPEC §3's shape, exactly: ``{"error": {"type", "message", "param"}}``."""
    where = f"{response.request.method} {response.request.url.path}"
    assert response.status_code == status, (where, response.status_code, response.text)
    body = error_body(response)
    assert set(body) == {"error"}, (where, body)
    error = body["error"]
    assert set(error) == {"type", "message", "param"}, (where, error)
    assert error["type"] == type_, (where, error)
    assert isinstance(error["message"], str) and error["message"], (where, error)
    assert error["param"] is None or isinstance(error["param"], str), (where, error)
    if param is not False:
        assert error["param"] == param, (where, error)
    return dict(error)


def call(client: TestClient, route: Route, ids: dict[str, str], headers: dict[str, str]) -> Any:
    method, template = route
    if route in ENDED_BATCH_ROUTES and "ended_batch_id" in ids:
        ids = {**ids, "batch_id": ids["ended_batch_id"]}
    url = template.format(**{"tenant_id": "tenant_unknown", **ids})
    if route == ("POST", "/v1/files"):
        upload = {"file": ("batch.jsonl", FILE_LINE, "application/jsonl")}
        response = client.post(url, data={"purpose": "batch"}, files=upload, headers=headers)
    else:
        response = client.request(method, url, json=BODIES.get(route), headers=headers)
    if response.status_code in (200, 201) and route in (
        ("POST", "/v1/keys"),
        ("POST", "/v1/webhook-secret/rotate"),
    ):
        created = response.json()
        remember_secret(created.get("api_key") or created["secret"])
    return response


@dataclass
class Resources:
    """One of each id-bearing resource of a tenant, created through the API."""

    batch_id: str
    query_id: str
    webhook_id: str
    delivery_id: str
    key_id: str
    api_key: str
    feed_id: str
    article_id: str
    file_id: str
    ended_batch_id: str  # a cancelled batch
    experiment_id: str

    def ids(self) -> dict[str, str]:
        return {
            "batch_id": self.batch_id,
            "query_id": self.query_id,
            "webhook_id": self.webhook_id,
            "delivery_id": self.delivery_id,
            "key_id": self.key_id,
            "feed_id": self.feed_id,
            "article_id": self.article_id,
            "file_id": self.file_id,
            "experiment_id": self.experiment_id,
        }


def make_resources(client: TestClient, admin_key: str, sessions: Any) -> Resources:
    h = bearer(admin_key)
    batch = client.post(
        "/v1/batches",
        json={"queries": [{"custom_id": "a", "prompt": "one"}, {"custom_id": "b", "prompt": "two"}]},
        headers=h,
    )
    assert batch.status_code == 202, batch.text
    batch_id = batch.json()["id"]
    with sessions() as s:
        query_id = s.scalars(select(col(Query.id)).where(col(Query.batch_id) == batch_id)).first()
    assert query_id
    webhook = client.post("/v1/webhooks", json={"url": HOOK, "events": ["batch.cancelled"]}, headers=h)
    assert webhook.status_code == 201, webhook.text
    # A cancelled batch with its own webhook_url queues a delivery (and one to the endpoint).
    other = client.post(
        "/v1/batches",
        json={"queries": [{"custom_id": "c", "prompt": "three"}], "webhook_url": HOOK},
        headers=h,
    )
    assert other.status_code == 202, other.text
    assert client.post(f"/v1/batches/{other.json()['id']}/cancel", headers=h).json()["status"] == "cancelled"
    deliveries = client.get("/v1/webhooks/deliveries", headers=h).json()["data"]
    delivery_id = next(d["id"] for d in deliveries if d["batch_id"] == other.json()["id"])
    # A distinguishable state, so that a redelivery by anyone would show.
    with sessions.begin() as s:
        s.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id == delivery_id)
            .values(status="failed", attempts=10, last_error="gave up")
        )
    key = client.post("/v1/keys", json={"role": "user"}, headers=h)
    assert key.status_code == 201, key.text
    remember_secret(key.json()["api_key"])
    feed = client.post(
        "/v1/knowledge/feeds", json={"url": "http://127.0.0.1:9/rss.xml", "domain": "acl"}, headers=h
    )
    assert feed.status_code == 201, feed.text
    # An imported article, stored as the feed job stores one (no network needed).
    content = f"The {ARTICLE_WORD} article of this tenant."
    parsed = ParsedArticle(
        guid=f"guid-{uuid.uuid4().hex}",
        title=f"About {ARTICLE_WORD}",
        link="https://example.com/a",
        published_at=int(time.time()),
        content=content,
        content_hash=hashlib.sha256(content.encode()).hexdigest(),
    )
    with sessions.begin() as s:
        feed_row = s.get(Feed, feed.json()["id"])
        assert feed_row is not None
        assert store_articles(s, feed_row, [parsed]).created == 1
        article_id = s.scalars(select(col(Article.id)).where(col(Article.feed_id) == feed_row.id)).one()
    upload = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("batch.jsonl", FILE_LINE, "application/jsonl")},
        headers=h,
    )
    assert upload.status_code == 200, upload.text
    experiment = client.post(
        "/v1/experiments",
        json={
            "name": "acl",
            "metric": "cost",
            "variants": [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
        },
        headers=h,
    )
    assert experiment.status_code == 201, experiment.text
    return Resources(
        batch_id,
        query_id,
        webhook.json()["id"],
        delivery_id,
        key.json()["id"],
        key.json()["api_key"],
        feed.json()["id"],
        article_id,
        upload.json()["id"],
        other.json()["id"],
        experiment.json()["id"],
    )


def tenant_state(client: TestClient, admin_key: str, sessions: Any) -> dict[str, Any]:
    """Everything a tenant owns that another tenant's calls could change."""
    h = bearer(admin_key)
    feeds = client.get("/v1/knowledge/feeds", headers=h).json()["data"]
    with sessions() as s:
        # "Import now" shows only in the schedule: the feed becomes due at once.
        due = {f["id"]: getattr(s.get(Feed, f["id"]), "next_fetch_at", None) for f in feeds}
    batches = client.get("/v1/batches", params={"limit": 100}, headers=h).json()["data"]
    deliveries = client.get("/v1/webhooks/deliveries", params={"limit": 100}, headers=h).json()["data"]
    return {
        "batches": sorted(
            (b["id"], b["status"], tuple(sorted(b["request_counts"].items()))) for b in batches
        ),
        "webhooks": sorted(
            (w["id"], w["url"], tuple(w["events"]), w["enabled"])
            for w in client.get("/v1/webhooks", headers=h).json()["data"]
        ),
        "deliveries": sorted((d["id"], d["status"], d["attempts"]) for d in deliveries),
        "keys": sorted(
            (k["id"], k["role"], k["revoked_at"]) for k in client.get("/v1/keys", headers=h).json()["data"]
        ),
        "secret": client.get("/v1/webhook-secret", headers=h).json()["secret"],
        "feeds": sorted((f["id"], f["url"], f["domain"], due[f["id"]]) for f in feeds),
        "articles": sorted(
            (a["id"], a["title"])
            for a in client.get("/v1/knowledge/articles", params={"limit": 100}, headers=h).json()["data"]
        ),
        "files": sorted(
            (f["id"], f["bytes"], f["status"])
            for f in client.get("/v1/files", params={"limit": 100}, headers=h).json()["data"]
        ),
    }


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[FastAPI]:
    # Its own queue namespace: no worker of another test's stack runs (and changes) these batches.
    namespace = f"{settings.queue_namespace}-access-{uuid.uuid4().hex[:6]}"
    app = create_app(
        settings.model_copy(update={"webhook_allow_private": True, "queue_namespace": namespace})
    )
    yield app
    close_app(app, settings.redis_url, namespace)


def close_app(app: FastAPI, redis_url: str, namespace: str) -> None:
    """Drop the app's Redis namespace and close its connections."""
    state = app.state.conclave
    client = redis.Redis.from_url(redis_url)
    stored = list(client.scan_iter(f"{namespace}:*", count=1000))
    if stored:
        client.delete(*stored)
    client.close()
    state.broker.client.close()
    state.sessions.kw["bind"].dispose()


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def tenant_name() -> str:
    return f"acc-{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------- tests


def test_role_table_covers_every_v1_route(app: FastAPI) -> None:
    assert v1_routes(app) == set(ROLE_TABLE), (
        "a /v1 route was added or removed: extend ROLE_TABLE and the tests"
    )
    assert {r for r in app_routes(app) if "{" in r[1]} <= set(ROLE_TABLE) | DASHBOARD_ID_ROUTES


def test_another_tenants_ids_are_404_everywhere_and_change_nothing(
    app: FastAPI, api: TestClient, sessions: Any
) -> None:
    key_a, _ = new_key(sessions, tenant_name())
    key_b, _ = new_key(sessions, tenant_name())
    res_a = make_resources(api, key_a, sessions)
    res_b = make_resources(api, key_b, sessions)  # B has items of its own: lists are not just empty
    before = tenant_state(api, key_a, sessions)

    id_routes = sorted(r for r in v1_routes(app) if "{" in r[1] and r not in OPERATOR_ID_ROUTES)
    assert id_routes, "the app has routes with ids"
    walked: set[Route] = set()
    for route in id_routes:
        foreign = call(api, route, res_a.ids(), bearer(key_b))
        error = assert_error(foreign, 404, "not_found_error")
        # Indistinguishable from an id that does not exist at all.
        unknown_ids = {k: v[:-4] + "zzzz" for k, v in res_a.ids().items()}
        unknown = call(api, route, unknown_ids, bearer(key_b))
        unknown_error = assert_error(unknown, 404, "not_found_error")
        assert error["param"] == unknown_error["param"], route
        used = [v for k, v in res_a.ids().items() if "{" + k + "}" in route[1]]
        scrubbed = error["message"]
        for value in used:
            scrubbed = scrubbed.replace(value, "<id>")
        scrubbed_unknown = unknown_error["message"]
        for value in used:
            scrubbed_unknown = scrubbed_unknown.replace(value[:-4] + "zzzz", "<id>")
        assert scrubbed == scrubbed_unknown, route
        walked.add(route)
    assert walked == {r for r in v1_routes(app) if "{" in r[1]} - OPERATOR_ID_ROUTES

    assert tenant_state(api, key_a, sessions) == before
    # A's key still works (B's revoke did nothing) and A's batch was not cancelled.
    assert api.get("/v1/batches", headers=bearer(res_a.api_key)).status_code == 200
    assert api.get(f"/v1/batches/{res_a.batch_id}", headers=bearer(key_a)).json()["status"] == "in_progress"

    # Lists never show the other tenant's items (and do show one's own).
    a_ids, b_ids = res_a.ids(), res_b.ids()
    for path, kind in LISTS.items():
        for viewer_key, own, other in ((key_b, b_ids, a_ids), (key_a, a_ids, b_ids)):
            rows = api.get(path, params={"limit": 100}, headers=bearer(viewer_key)).json()["data"]
            listed = {row["id"] for row in rows}
            assert own[kind] in listed, (path, kind)
            assert other[kind] not in listed, (path, kind)
            assert not (listed & set(other.values())), path
    # Nor does a search find the other tenant's articles.
    found = api.get("/v1/knowledge/articles", params={"q": ARTICLE_WORD}, headers=bearer(key_b)).json()
    assert {a["id"] for a in found["data"]} == {res_b.article_id}
    # Nor are the other tenant's items reachable as a cursor.
    page = api.get(
        "/v1/batches", params={"after": res_a.batch_id, "limit": 100}, headers=bearer(key_b)
    ).json()
    assert res_a.batch_id not in {b["id"] for b in page["data"]}


def test_usage_is_per_tenant(api: TestClient, sessions: Any) -> None:
    key_a, tenant_a = new_key(sessions, tenant_name())
    key_b, _ = new_key(sessions, tenant_name())
    with sessions.begin() as s:
        s.execute(
            insert(PROVIDER_CALLS),
            [
                {
                    "query_id": "query_x",
                    "batch_id": "batch_x",
                    "tenant_id": tenant_a,
                    "model": "sim:alpha",
                    "stage": "answer",
                    "attempt": 1,
                    "status": "succeeded",
                    "latency_ms": 5,
                    "input_tokens": 10,
                    "output_tokens": 20,
                    "cost_usd": 0.25,
                    "created_at": int(time.time()),
                }
            ],
        )
    usage_a = api.get("/v1/usage", headers=bearer(key_a)).json()
    usage_b = api.get("/v1/usage", params={"group_by": "model"}, headers=bearer(key_b)).json()
    assert usage_a["cost_usd"] == pytest.approx(0.25) and usage_a["total_tokens"] == 30
    assert usage_b["cost_usd"] == 0 and usage_b["calls"] == 0 and usage_b["data"] == []


@pytest.mark.parametrize("role", ["admin", "user", "viewer"])
def test_roles_on_every_v1_route(app: FastAPI, api: TestClient, sessions: Any, role: str) -> None:
    name = tenant_name()
    admin_key, _ = new_key(sessions, name, "admin")
    key, _ = new_key(sessions, name, role) if role != "admin" else (admin_key, "")
    resources = make_resources(api, admin_key, sessions)
    before = tenant_state(api, admin_key, sessions)
    column = ROLE_COLUMN[role]

    assert set(ROLE_TABLE) == v1_routes(app)
    for route, expected in ROLE_TABLE.items():
        ids = {**resources.ids(), "ended_batch_id": resources.ended_batch_id}
        response = call(api, route, ids, bearer(key))
        status = expected[column]
        if status == 403:
            assert_error(response, 403, "permission_error")
        else:
            assert response.status_code == status, (role, route, response.text)

    # Writes (POST/DELETE) are refused to a viewer, every one of them.
    writes = {r for r in v1_routes(app) if r[0] in ("POST", "DELETE", "PUT", "PATCH")}
    if role == "viewer":
        assert all(ROLE_TABLE[r][column] == 403 for r in writes)
        assert tenant_state(api, admin_key, sessions) == before  # and nothing changed
    if role == "user":
        after = tenant_state(api, admin_key, sessions)
        # Submit and cancel went through; keys, endpoints, secret and deliveries did not move.
        for part in ("webhooks", "keys", "secret"):
            assert after[part] == before[part], part
        # (the cancel queued a new batch.cancelled delivery; the existing ones were not redelivered)
        old_ids = {d[0] for d in before["deliveries"]}
        assert [d for d in after["deliveries"] if d[0] in old_ids] == before["deliveries"]
        batch = api.get(f"/v1/batches/{resources.batch_id}", headers=bearer(key)).json()
        assert batch["status"] == "cancelled"
        # (one through /v1/batches, one through /v1/messages/batches)
        assert len(after["batches"]) == len(before["batches"]) + 2


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic-scheme"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-without-key"),
        pytest.param({"Authorization": "Bearer    "}, id="bearer-blank"),
        pytest.param({"Authorization": "cnk_abcdefghijklmnop"}, id="no-scheme"),
        pytest.param({"Authorization": "Bearer cnk_not-a-real-key"}, id="unknown-key"),
    ],
)
def test_no_or_malformed_key_is_401_on_every_v1_route(
    app: FastAPI, api: TestClient, sessions: Any, headers: dict[str, str]
) -> None:
    key, _ = new_key(sessions, tenant_name())
    before = tenant_state(api, key, sessions)
    ids = {name: f"{name.split('_')[0]}_unknown" for name in ID_NAMES}
    routes = sorted(v1_routes(app))
    assert len(routes) == len(ROLE_TABLE)
    for route in routes:
        assert_error(call(api, route, ids, headers), 401, "authentication_error")
    assert tenant_state(api, key, sessions) == before


def test_revoked_key_is_401_on_every_v1_route(app: FastAPI, api: TestClient, sessions: Any) -> None:
    admin_key, _ = new_key(sessions, tenant_name())
    resources = make_resources(api, admin_key, sessions)
    created = api.post("/v1/keys", json={"role": "admin"}, headers=bearer(admin_key)).json()
    doomed = remember_secret(created["api_key"])
    assert api.get("/v1/batches", headers=bearer(doomed)).status_code == 200
    revoked = api.delete(f"/v1/keys/{created['id']}", headers=bearer(admin_key))
    assert revoked.status_code == 200 and isinstance(revoked.json()["revoked_at"], int)
    before = tenant_state(api, admin_key, sessions)
    for route in sorted(v1_routes(app)):
        assert_error(call(api, route, resources.ids(), bearer(doomed)), 401, "authentication_error")
    assert tenant_state(api, admin_key, sessions) == before


def test_admin_endpoints_need_an_admin_of_the_operator_tenant(api: TestClient, sessions: Any) -> None:
    tenant_admin, _ = new_key(sessions, tenant_name(), "admin")
    op_name = f"op-{uuid.uuid4().hex[:10]}"
    with sessions.begin() as s:
        op_admin = issue_key(s, tenant_name=op_name, role="admin", tier="enterprise", operator=True)
        op_user = issue_key(s, tenant_name=op_name, role="user", tier="enterprise")
    remember_secret(op_admin.api_key, op_user.api_key, op_admin.webhook_secret)
    for path in ("/v1/admin/queues", "/v1/admin/providers", "/v1/admin/anomalies"):
        assert_error(api.get(path, headers=bearer(tenant_admin)), 403, "permission_error")
        assert_error(api.get(path, headers=bearer(op_user.api_key)), 403, "permission_error")
        assert api.get(path, headers=bearer(op_admin.api_key)).status_code == 200


def operator_admin(sessions: Any) -> str:
    with sessions.begin() as s:
        issued = issue_key(
            s, tenant_name=f"op-{uuid.uuid4().hex[:10]}", role="admin", tier="enterprise", operator=True
        )
    return remember_secret(issued.api_key, issued.webhook_secret)


# ---------------------------------------------------------------- admin views after a known state
#
# Black-box: the state is made through Redis in the layouts the views read (dramatiq's queues,
# the heartbeat's sorted set, the breaker's own API) in a namespace no worker consumes, and read
# back over HTTP only.

QUEUES = ("high", "normal", "low")


@dataclass
class AdminView:
    api: TestClient
    key: str
    namespace: str
    providers: tuple[str, str, str]  # three configured providers, none ever called

    def get(self, path: str) -> dict[str, Any]:
        response = self.api.get(path, headers=bearer(self.key))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def admin_view(settings: Settings, sessions: Any, tmp_path: Path) -> Iterator[AdminView]:
    namespace = f"{settings.queue_namespace}-admin-{uuid.uuid4().hex[:6]}"
    names = tuple(f"{p}{uuid.uuid4().hex[:6]}" for p in ("pa", "pb", "pc"))
    providers_file = tmp_path / "providers.toml"
    providers_file.write_text(
        "".join(f'[providers.{n}]\napi = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n\n' for n in names)
        + f'[council]\nmembers = ["{names[0]}:m", "{names[1]}:m", "{names[2]}:m"]\n'
    )
    app = create_app(
        settings.model_copy(update={"queue_namespace": namespace, "providers_file": providers_file})
    )
    try:
        with TestClient(app) as client:
            yield AdminView(client, operator_admin(sessions), namespace, (names[0], names[1], names[2]))
    finally:
        close_app(app, settings.redis_url, namespace)


def queue_message(queue: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=queue, actor_name="run_query", args=("query_x",), kwargs={}, options={}
    )


def by_queue(body: dict[str, Any]) -> dict[str, dict[str, int]]:
    fields = ("depth", "delayed", "dead_lettered", "in_flight")
    return {q["queue"]: {f: q[f] for f in fields} for q in body["data"]}


def test_admin_queues_read_the_known_state_of_each_queue(admin_view: AdminView, redis_url: str) -> None:
    """SPEC §3.3: per priority queue depth, delayed, dead-lettered, in flight."""
    assert by_queue(admin_view.get("/v1/admin/queues")) == {
        q: {"depth": 0, "delayed": 0, "dead_lettered": 0, "in_flight": 0} for q in QUEUES
    }
    broker = RedisBroker(url=redis_url, namespace=admin_view.namespace, middleware=[])
    for queue in QUEUES:
        broker.declare_queue(queue)
    try:
        for _ in range(7):
            broker.enqueue(queue_message("normal"))
        for _ in range(3):
            broker.enqueue(queue_message("high"))
        assert by_queue(admin_view.get("/v1/admin/queues")) == {
            "high": {"depth": 3, "delayed": 0, "dead_lettered": 0, "in_flight": 0},
            "normal": {"depth": 7, "delayed": 0, "dead_lettered": 0, "in_flight": 0},
            "low": {"depth": 0, "delayed": 0, "dead_lettered": 0, "in_flight": 0},
        }

        # A consumer holding two messages of "normal" (one handed out, one prefetched) ...
        normal = broker.consume("normal", prefetch=2, timeout=100)
        assert next(normal) is not None
        # ... and one "high" message given up on: it is dead-lettered.
        high = broker.consume("high", prefetch=1, timeout=100)
        doomed = next(high)
        assert doomed is not None
        high.nack(doomed)

        assert by_queue(admin_view.get("/v1/admin/queues")) == {
            "high": {"depth": 2, "delayed": 0, "dead_lettered": 1, "in_flight": 0},
            "normal": {"depth": 5, "delayed": 0, "dead_lettered": 0, "in_flight": 2},
            "low": {"depth": 0, "delayed": 0, "dead_lettered": 0, "in_flight": 0},
        }
        normal.close()
        high.close()
    finally:
        broker.close()


def test_admin_queues_count_delayed_messages(admin_view: AdminView, redis_url: str) -> None:
    broker = RedisBroker(url=redis_url, namespace=admin_view.namespace, middleware=[])
    for queue in QUEUES:
        broker.declare_queue(queue)
    try:
        for _ in range(4):
            broker.enqueue(queue_message("low"), delay=3_600_000)
        broker.enqueue(queue_message("low"))

        assert by_queue(admin_view.get("/v1/admin/queues"))["low"] == {
            "depth": 1,
            "delayed": 4,
            "dead_lettered": 0,
            "in_flight": 0,
        }
    finally:
        broker.close()


def test_admin_queues_count_workers_that_beat_recently_and_no_throughput_yet(
    admin_view: AdminView, rclient: redis.Redis
) -> None:
    """SPEC §3.3: workers alive; throughput over the last minutes (none in a new namespace)."""
    assert admin_view.get("/v1/admin/queues")["workers_alive"] == 0
    now = time.time()
    # The heartbeat's layout (shared/liveness.py): sorted set of worker id -> last beat.
    rclient.zadd(
        keys.workers(admin_view.namespace),
        {"host-a:101:abc": now - 1, "host-b:202:def": now, "host-c:303:0ff": now - 3600},
    )

    body = admin_view.get("/v1/admin/queues")

    assert body["workers_alive"] == 2
    throughput = {k: v for k, v in body.items() if "throughput" in k}
    throughput.update({k: v for q in body["data"] for k, v in q.items() if "throughput" in k})
    assert throughput, f"no throughput over the last minutes in /v1/admin/queues: {sorted(body)}"
    numbers = [v for t in throughput.values() for v in (t.values() if isinstance(t, dict) else [t])]
    assert numbers and all(n == 0 for n in numbers), throughput


def one_field(row: dict[str, Any], part: str) -> Any:
    """The value of the one field whose name contains ``part`` (``error_rate``, ``p50``…)."""
    names = [name for name in row if part in name]
    assert len(names) == 1, (part, sorted(row))
    return row[names[0]]


def force_open(redis_url: str, key: str, cooldown_s: float) -> str:
    """Open a provider's circuit as the workers would, through the breaker's own API: one call
    started and failed, with a threshold of one failure."""

    async def fail_once() -> str:
        client = aioredis.Redis.from_url(redis_url)
        try:
            breaker = CircuitBreaker(client, key, BreakerConfig(min_failures=1, cooldown_s=cooldown_s))
            allowed, _, _ = await breaker.acquire()
            assert allowed
            await breaker.record(False, "server")
            state, _ = await breaker.state()
            return state
        finally:
            await client.aclose()

    return asyncio.run(fail_once())


def test_admin_providers_read_the_circuit_each_provider_is_in(admin_view: AdminView, redis_url: str) -> None:
    """SPEC §3.3: per provider circuit state and error rate."""
    opened, probing, healthy = admin_view.providers
    ns = admin_view.namespace

    def circuits() -> dict[str, str]:
        rows = admin_view.get("/v1/admin/providers")["data"]
        return {row["provider"]: row["circuit"] for row in rows}

    assert circuits() == {opened: "closed", probing: "closed", healthy: "closed"}
    assert force_open(redis_url, keys.breaker(ns, opened), cooldown_s=600) == "open"
    assert force_open(redis_url, keys.breaker(ns, probing), cooldown_s=0.05) in ("open", "half_open")

    # Once its 50 ms cooldown has passed, the second reads half-open: a probe may go.
    poll(lambda: circuits()[probing] == "half_open", timeout=10, interval=0.05, what="half-open")
    assert circuits() == {opened: "open", probing: "half_open", healthy: "closed"}
    rows = {row["provider"]: row for row in admin_view.get("/v1/admin/providers")["data"]}
    assert one_field(rows[opened], "error_rate") == 1.0  # one call started, one failed
    assert one_field(rows[healthy], "error_rate") == 0.0


def test_admin_providers_report_latency_percentiles_of_recent_calls(
    admin_view: AdminView, sessions: Any
) -> None:
    """SPEC §3.3: p50/p95 latency per provider, from the recorded calls; rate-limit headroom."""
    _, _, measured = admin_view.providers
    now = int(time.time())
    # 60 calls of 10 ms and 40 of 1000 ms: every usual quantile definition gives p50 = 10, p95 = 1000.
    calls = [10] * 60 + [1000] * 40
    with sessions.begin() as s:
        s.execute(
            insert(PROVIDER_CALLS),
            [
                {
                    "query_id": f"query_lat{i}",
                    "batch_id": "batch_lat",
                    "tenant_id": "tenant_lat",
                    "model": f"{measured}:m",
                    "stage": "answer",
                    "attempt": 1,
                    "status": "succeeded",
                    "latency_ms": latency,
                    "created_at": now,
                }
                for i, latency in enumerate(calls)
            ],
        )

    rows = {row["provider"]: row for row in admin_view.get("/v1/admin/providers")["data"]}

    assert set(rows) == set(admin_view.providers)
    assert (one_field(rows[measured], "p50"), one_field(rows[measured], "p95")) == (10, 1000)
    for row in rows.values():
        assert "headroom" in " ".join(row), f"no rate-limit headroom in /v1/admin/providers: {sorted(row)}"


def test_key_management_shows_a_key_once_and_never_its_hash(api: TestClient, sessions: Any) -> None:
    admin_key, tenant_id = new_key(sessions, tenant_name())
    created = api.post("/v1/keys", json={"role": "viewer"}, headers=bearer(admin_key))
    assert created.status_code == 201, created.text
    body = created.json()
    api_key = remember_secret(body["api_key"])
    assert api_key.startswith("cnk_") and len(api_key) > 30
    assert body["role"] == "viewer" and body["revoked_at"] is None
    assert api_key.startswith(body["prefix"]) and len(body["prefix"]) < len(api_key)
    assert hash_key(api_key) not in created.text
    with sessions() as s:
        row = s.get(ApiKey, body["id"])
        assert row is not None and row.tenant_id == tenant_id
        assert row.key_hash == hash_key(api_key) and api_key not in (row.key_hash, row.prefix)

    listed = api.get("/v1/keys", headers=bearer(admin_key))
    assert listed.status_code == 200
    page = listed.json()
    assert page["object"] == "list" and page["has_more"] is False
    mine = next(k for k in page["data"] if k["id"] == body["id"])
    assert mine["prefix"] == body["prefix"] and "api_key" not in mine
    for secret in (api_key, hash_key(api_key), admin_key, hash_key(admin_key)):
        assert secret not in listed.text

    # The new key works, with its own role.
    assert api.get("/v1/batches", headers=bearer(api_key)).status_code == 200
    assert_error(
        api.post("/v1/batches", json=BODIES[("POST", "/v1/batches")], headers=bearer(api_key)),
        403,
        "permission_error",
    )

    revoked = api.delete(f"/v1/keys/{body['id']}", headers=bearer(admin_key))
    assert revoked.status_code == 200
    assert api_key not in revoked.text and hash_key(api_key) not in revoked.text
    assert isinstance(revoked.json()["revoked_at"], int)
    assert_error(api.get("/v1/batches", headers=bearer(api_key)), 401, "authentication_error")
    again = api.delete(f"/v1/keys/{body['id']}", headers=bearer(admin_key))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    relisted = api.get("/v1/keys", headers=bearer(admin_key)).json()["data"]
    assert next(k for k in relisted if k["id"] == body["id"])["revoked_at"] == revoked.json()["revoked_at"]
    # The admin's own key is untouched.
    assert api.get("/v1/keys", headers=bearer(admin_key)).status_code == 200


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/usage", {"from": "588333051766"}),
        ("/v1/usage", {"from": "0", "to": "9999-12-31T23:59:59Z"}),
        ("/v1/analytics/models", {"to": "2502-09-12"}),
    ],
)
def test_a_time_range_far_outside_the_ledger_is_an_answer_not_a_server_error(
    api: TestClient, sessions: Any, path: str, params: dict[str, str]
) -> None:
    """PostgreSQL's 32-bit timestamp columns refused bounds past 2038 with a 500 (found by the
    OpenAPI fuzz test): any instant the syntax allows is a range, possibly empty."""
    key, _ = new_key(sessions, tenant_name())
    response = api.get(path, params=params, headers=bearer(key))
    assert response.status_code == 200, response.text
