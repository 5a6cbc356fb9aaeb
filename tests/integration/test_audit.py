"""The audit log (SPEC §17) over the in-process app on real Redis and the real database: every
state-changing route of the OpenAPI document writes exactly one row, with the right action,
tenant, key, target and request id; a change's row commits in the change's transaction; nothing
updates or deletes a row (and the database refuses to); ``GET /v1/audit`` pages a tenant's own.

Routes are read from ``app.openapi()``: a route added later is walked the day it is added.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import delete, event, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable
from sqlmodel import col

from api.audit import AUDITED_METHODS
from api.main import create_app
from shared import audit
from shared.audit import AUDIT, AuditEvent
from shared.models import ApiKey
from shared.settings import Settings
from shared.tenants import hash_key
from tests.conftest import new_key
from tests.integration.test_access import bearer, call, close_app, make_resources

pytestmark = pytest.mark.integration

Route = tuple[str, str]


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[FastAPI]:
    # Its own queue namespace: no worker of another test's stack runs (and changes) these batches.
    namespace = f"{settings.queue_namespace}-audit-{uuid.uuid4().hex[:6]}"
    app = create_app(
        settings.model_copy(update={"webhook_allow_private": True, "queue_namespace": namespace})
    )
    yield app
    close_app(app, settings.redis_url, namespace)


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def state_changing_routes(app: FastAPI) -> list[Route]:
    return sorted(
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in AUDITED_METHODS
    )


def rows_of(sessions: Any, tenant_id: str) -> list[AuditEvent]:
    with sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AUDIT.c.tenant_id == tenant_id).order_by(AUDIT.c.id)))


def key_id_of(sessions: Any, api_key: str) -> str:
    with sessions() as s:
        key_id = s.scalar(select(col(ApiKey.id)).where(col(ApiKey.key_hash) == hash_key(api_key)))
    assert key_id
    return key_id


def path_params(template: str, path: str) -> dict[str, str] | None:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    match = re.fullmatch(pattern, path)
    assert match, (template, path)
    return match.groupdict() or None


@pytest.fixture
def audit_rewrites(app: FastAPI) -> Iterator[list[str]]:
    """Every UPDATE, DELETE or TRUNCATE of the audit table the app's engine sends meanwhile."""
    engine = app.state.conclave.sessions.kw["bind"]
    seen: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if re.match(r"\s*(UPDATE|DELETE|TRUNCATE)\b", statement, re.I) and "audit_events" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", watch)
    yield seen
    event.remove(engine, "before_cursor_execute", watch)


def test_every_state_changing_route_writes_exactly_one_audit_row(
    app: FastAPI, api: TestClient, sessions: Any, audit_rewrites: list[str]
) -> None:
    admin_key, tenant_id = new_key(sessions, f"aud-{uuid.uuid4().hex[:10]}")
    admin_key_id = key_id_of(sessions, admin_key)
    resources = make_resources(api, admin_key, sessions)
    ids = {**resources.ids(), "ended_batch_id": resources.ended_batch_id}
    routes = state_changing_routes(app)
    assert ("POST", "/v1/batches") in routes and ("DELETE", "/v1/keys/{key_id}") in routes

    walked: dict[Route, int] = {}
    for route in routes:
        before = {r.id for r in rows_of(sessions, tenant_id)}
        response = call(api, route, ids, bearer(admin_key))
        # Reached the route: authenticated, and a method it takes (404s and 409s count).
        assert response.status_code not in (401, 405, 500), (route, response.status_code, response.text)
        new = [r for r in rows_of(sessions, tenant_id) if r.id not in before]
        assert len(new) == 1, (route, response.status_code, [(r.action, r.outcome) for r in new])
        row = new[0]
        method, template = route
        assert row.action == f"{method} {template}", route
        assert (row.tenant_id, row.key_id, row.role) == (tenant_id, admin_key_id, "admin"), route
        assert row.target == path_params(template, response.request.url.path), route
        assert row.request_id == response.headers["x-request-id"], route
        assert row.client_ip == "testclient", route
        if row.status is None:  # written in the change's transaction
            assert row.outcome == "ok" and response.status_code < 400, (route, response.status_code)
        else:
            assert row.status == response.status_code, route
            assert row.outcome == audit.outcome_of(response.status_code), route
        walked[route] = response.status_code
    assert set(walked) == set(routes)
    # Both kinds of rows were met: changes committed with their row, and refusals after the fact.
    assert any(status >= 400 for status in walked.values()), walked
    assert audit_rewrites == []


def test_a_changes_row_is_inserted_in_the_changes_own_transaction(
    app: FastAPI, api: TestClient, sessions: Any
) -> None:
    admin_key, tenant_id = new_key(sessions, f"aud-{uuid.uuid4().hex[:10]}")
    engine = app.state.conclave.sessions.kw["bind"]
    trail: list[tuple[int, str]] = []  # (DBAPI connection, what happened on it)

    def on_statement(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        trail.append((id(conn.connection.dbapi_connection), " ".join(statement.split()[:3]).upper()))

    def on_commit(conn: Any) -> None:
        trail.append((id(conn.connection.dbapi_connection), "COMMIT"))

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    try:
        response = api.post(
            "/v1/batches", json={"queries": [{"custom_id": "a", "prompt": "hi"}]}, headers=bearer(admin_key)
        )
    finally:
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    assert response.status_code == 202, response.text
    batch_at = next(i for i, (_, what) in enumerate(trail) if what == "INSERT INTO BATCHES")
    audit_at = next(i for i, (_, what) in enumerate(trail) if what == "INSERT INTO AUDIT_EVENTS")
    conn = trail[batch_at][0]
    assert trail[audit_at][0] == conn and audit_at > batch_at
    # No commit of that connection between the change and its row; one right after.
    between = [what for c, what in trail[batch_at:audit_at] if c == conn]
    assert "COMMIT" not in between
    assert next(what for c, what in trail[audit_at + 1 :] if c == conn) == "COMMIT"
    [row] = rows_of(sessions, tenant_id)
    assert (row.action, row.outcome, row.status) == ("POST /v1/batches", "ok", None)


def test_a_rolled_back_change_takes_its_row_along_and_the_request_gets_one_after(sessions: Any) -> None:
    audit.install()
    tenant_id = f"tenant_{uuid.uuid4().hex[:12]}"
    fields = {
        "tenant_id": tenant_id,
        "key_id": "key_x",
        "role": "admin",
        "action": "POST /v1/x",
        "target": None,
        "client_ip": "127.0.0.1",
        "request_id": "req_x",
    }
    ctx = audit.AuditContext(lambda: fields)
    token = audit.CURRENT.set(ctx)
    try:
        with pytest.raises(RuntimeError), sessions.begin() as s:
            # A write (any statement will do; this one changes no row) and then a failure.
            s.execute(update(ApiKey).where(col(ApiKey.id) == "key_none").values(role="user"))
            raise RuntimeError("the route failed after writing")
        assert rows_of(sessions, tenant_id) == []
        with sessions.begin() as s:  # a transaction that reads only: no row
            s.execute(select(col(ApiKey.id)).limit(1))
        assert rows_of(sessions, tenant_id) == []
        with sessions.begin() as s:
            s.execute(update(ApiKey).where(col(ApiKey.id) == "key_none").values(role="user"))
        with sessions.begin() as s:  # a second writing transaction: still one row
            s.execute(update(ApiKey).where(col(ApiKey.id) == "key_none").values(role="user"))
    finally:
        audit.CURRENT.reset(token)
    assert ctx.close() is False  # the row exists: the middleware writes none
    [row] = rows_of(sessions, tenant_id)
    assert (row.outcome, row.status) == ("ok", None)


def test_the_database_refuses_to_update_or_delete_audit_rows(sessions: Any) -> None:
    row_id = f"audit_{uuid.uuid4().hex[:20]}"
    with sessions.begin() as s:
        s.execute(
            insert(AUDIT).values(
                id=row_id,
                created_at=1,
                tenant_id="tenant_x",
                key_id="key_x",
                role="admin",
                action="POST /v1/x",
                request_id="req_x",
                outcome="ok",
            )
        )
    kind = sessions.kw["bind"].dialect.name
    refusals: list[Executable] = [
        update(AUDIT).where(AUDIT.c.id == row_id).values(outcome="error"),
        delete(AUDIT),
    ]
    if kind == "postgresql":
        refusals.append(text("TRUNCATE audit_events"))
    for statement in refusals:
        with pytest.raises(DBAPIError, match="append-only"), sessions.begin() as s:
            s.execute(statement)
    with sessions() as s:
        assert s.scalar(select(AUDIT.c.outcome).where(AUDIT.c.id == row_id)) == "ok"


def test_audit_list_pages_a_tenants_own_rows_newest_first_and_filters_by_action(
    api: TestClient, sessions: Any
) -> None:
    key_a, tenant_a = new_key(sessions, f"aud-{uuid.uuid4().hex[:10]}")
    key_b, _ = new_key(sessions, f"aud-{uuid.uuid4().hex[:10]}")
    for _ in range(3):
        assert api.post("/v1/keys", json={"role": "viewer"}, headers=bearer(key_a)).status_code == 201
    assert api.delete("/v1/keys/key_unknown", headers=bearer(key_a)).status_code == 404
    assert api.delete("/v1/cache", headers=bearer(key_b)).status_code == 200

    first = api.get("/v1/audit", params={"limit": 3}, headers=bearer(key_a)).json()
    assert [e["action"] for e in first["data"]] == [
        "DELETE /v1/keys/{key_id}",
        "POST /v1/keys",
        "POST /v1/keys",
    ]
    assert first["has_more"] is True
    refused = first["data"][0]
    assert (refused["outcome"], refused["status"], refused["target"]) == (
        "refused",
        404,
        {"key_id": "key_unknown"},
    )
    assert "api_key" not in str(first)  # the created keys' secrets are nowhere in the log
    rest = api.get("/v1/audit", params={"after": first["last_id"]}, headers=bearer(key_a)).json()
    assert [e["action"] for e in rest["data"]] == ["POST /v1/keys"] and rest["has_more"] is False
    every = first["data"] + rest["data"]
    assert {e["tenant_id"] for e in every} == {tenant_a} and len({e["id"] for e in every}) == 4
    assert [e["id"] for e in every] == [r.id for r in reversed(rows_of(sessions, tenant_a))]

    created = api.get("/v1/audit", params={"action": "POST /v1/keys"}, headers=bearer(key_a)).json()
    assert len(created["data"]) == 3
    # B sees its own row, none of A's.
    [own] = api.get("/v1/audit", headers=bearer(key_b)).json()["data"]
    assert own["action"] == "DELETE /v1/cache"
    for params in ({"after": "x\x00y"}, {"action": "GET /v1/batches"}, {"action": "POST x"}, {"limit": 0}):
        assert api.get("/v1/audit", params=params, headers=bearer(key_a)).status_code == 422, params


def test_dashboard_forms_are_audited_with_the_signed_in_key(api: TestClient, sessions: Any) -> None:
    admin_key, tenant_id = new_key(sessions, f"aud-{uuid.uuid4().hex[:10]}")
    batch = api.post(
        "/v1/batches", json={"queries": [{"custom_id": "a", "prompt": "hi"}]}, headers=bearer(admin_key)
    )
    origin = {"Origin": "http://testserver"}
    wrong = api.post(
        "/dashboard/signin", data={"api_key": "cnk_wrong"}, headers=origin, follow_redirects=False
    )
    assert wrong.status_code == 401
    signin = api.post(
        "/dashboard/signin", data={"api_key": admin_key}, headers=origin, follow_redirects=False
    )
    assert signin.status_code == 303
    cancel = api.post(f"/dashboard/batches/{batch.json()['id']}/cancel", headers=origin)
    assert cancel.status_code == 200, cancel.text
    api.cookies.clear()
    actions = [(r.action, r.outcome, r.status) for r in rows_of(sessions, tenant_id)]
    # The failed sign-in has no caller: not audited (shared.audit's docstring).
    assert actions == [
        ("POST /v1/batches", "ok", None),
        ("POST /dashboard/signin", "ok", 303),
        ("POST /dashboard/batches/{batch_id}/cancel", "ok", None),
    ]
