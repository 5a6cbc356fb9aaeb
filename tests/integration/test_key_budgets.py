"""Per-key budgets and projects (SPEC §17): keys carry a project and a monthly budget, a batch
records the key that created it, ``/v1/usage`` groups the ledger by key and project, and
admission holds a query to its key's budget as to its tenant's (real Redis, the app in-process)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import insert, update
from sqlmodel import col

from api.main import create_app
from scheduler.jobs.costs import budget_checks
from shared.budget import Budgets, budget_changed
from shared.models import PROVIDER_CALLS, Batch, Notice, Tenant
from shared.settings import Settings
from tests.conftest import new_key
from tests.integration.test_access import close_app
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def app(settings: Settings) -> Iterator[FastAPI]:
    namespace = f"{settings.queue_namespace}-keybudget-{uuid.uuid4().hex[:6]}"
    app = create_app(settings.model_copy(update={"queue_namespace": namespace}))
    yield app
    close_app(app, settings.redis_url, namespace)


@pytest.fixture
def api(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(api: TestClient, admin: str, **fields: Any) -> dict[str, Any]:
    response = api.post("/v1/keys", json={"role": "user", **fields}, headers=bearer(admin))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    remember_secret(created["api_key"])
    return created


def test_keys_carry_a_project_and_a_budget_and_only_admins_change_them(
    api: TestClient, sessions: Any
) -> None:
    admin, _ = new_key(sessions)
    key = make_key(api, admin, project="q3-review", budget_usd_monthly=12.5)
    assert (key["project"], key["budget_usd_monthly"]) == ("q3-review", 12.5)
    listed = {k["id"]: k for k in api.get("/v1/keys", headers=bearer(admin)).json()["data"]}
    assert listed[key["id"]]["project"] == "q3-review"

    raised = api.patch(f"/v1/keys/{key['id']}", json={"budget_usd_monthly": 20}, headers=bearer(admin))
    assert raised.status_code == 200, raised.text
    assert (raised.json()["budget_usd_monthly"], raised.json()["project"]) == (20, "q3-review")
    cleared = api.patch(f"/v1/keys/{key['id']}", json={"project": None}, headers=bearer(admin)).json()
    assert (cleared["project"], cleared["budget_usd_monthly"]) == (None, 20)

    for bad in ({"budget_usd_monthly": -1}, {"project": "x" * 65}, {"project": ""}):
        refused = api.patch(f"/v1/keys/{key['id']}", json=bad, headers=bearer(admin))
        assert refused.status_code == 422, (bad, refused.text)
        assert api.post("/v1/keys", json={"role": "user", **bad}, headers=bearer(admin)).status_code == 422
    user = key["api_key"]
    assert (
        api.patch(f"/v1/keys/{key['id']}", json={"budget_usd_monthly": 1e6}, headers=bearer(user)).status_code
        == 403
    )
    other, _ = new_key(sessions)
    assert api.patch(f"/v1/keys/{key['id']}", json={}, headers=bearer(other)).status_code == 404
    # The user's refused change changed nothing.
    listed = {k["id"]: k for k in api.get("/v1/keys", headers=bearer(admin)).json()["data"]}
    assert listed[key["id"]]["budget_usd_monthly"] == 20


def test_usage_groups_the_ledger_by_the_key_that_created_each_batch_and_its_project(
    api: TestClient, sessions: Any
) -> None:
    admin, tenant_id = new_key(sessions)
    a = make_key(api, admin, project="alpha")
    b = make_key(api, admin)  # no project
    batches = {}
    for key in (a, b):
        body = {"queries": [{"custom_id": "q", "prompt": "hello?"}]}
        created = api.post("/v1/batches", json=body, headers=bearer(key["api_key"]))
        assert created.status_code == 202, created.text
        batches[key["id"]] = created.json()["id"]
    with sessions() as session:
        recorded = {session.get(Batch, bid).key_id: bid for bid in batches.values()}
    assert recorded == {k: v for k, v in batches.items()}, "each batch names the key that created it"

    now = int(time.time())
    rows = [
        (batches[a["id"]], 0.25),
        (batches[a["id"]], 0.5),
        (batches[b["id"]], 2.0),
        ("batch_without_key", 4.0),
    ]
    with sessions.begin() as session:
        session.execute(
            insert(PROVIDER_CALLS),
            [
                {
                    "query_id": f"query_{i}",
                    "batch_id": batch_id,
                    "tenant_id": tenant_id,
                    "model": "sim:alpha",
                    "stage": "stage1",
                    "attempt": 1,
                    "status": "succeeded",
                    "latency_ms": 1,
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cost_usd": cost,
                    "created_at": now,
                }
                for i, (batch_id, cost) in enumerate(rows)
            ],
        )
    by_key = api.get("/v1/usage?group_by=key", headers=bearer(admin)).json()
    assert [(r["key"], r["cost_usd"], r["calls"]) for r in by_key["data"]] == [
        *sorted([(a["id"], 0.75, 2), (b["id"], 2.0, 1)]),
        (None, 4.0, 1),
    ]
    by_project = api.get("/v1/usage?group_by=project", headers=bearer(admin)).json()
    assert [(r["project"], r["cost_usd"]) for r in by_project["data"]] == [("alpha", 0.75), (None, 6.0)]
    assert by_key["cost_usd"] == by_project["cost_usd"] == 6.75
    assert api.get("/v1/usage?group_by=tenant", headers=bearer(admin)).status_code == 422

    # The scheduler's budget check sees the key's spend (0.75) reach its budget (0.5), once.
    api.patch(f"/v1/keys/{a['id']}", json={"budget_usd_monthly": 0.5}, headers=bearer(admin))
    settings = api.app.state.conclave.settings  # type: ignore[attr-defined]
    assert budget_checks(sessions, settings, now) >= 1
    budget_checks(sessions, settings, now)
    with sessions() as session:
        kinds = [n.kind for n in session.query(Notice).filter(col(Notice.tenant_id) == a["id"])]
    assert kinds == ["cost.budget_exceeded"]


def test_a_key_over_its_budget_waits_while_the_tenant_and_other_keys_run(
    api: TestClient, app: FastAPI, sessions: Any, settings: Settings
) -> None:
    """Admission against a key's budget, on the real counters: the key's queries stop when the
    next estimate would pass its budget (the refusal names the key), its tenant's other keys go
    on, a raise through PATCH resumes it, and each event is recorded once for the key."""
    admin, tenant_id = new_key(sessions)
    capped = make_key(api, admin, project="capped", budget_usd_monthly=0.05)
    free = make_key(api, admin)
    state = app.state.conclave
    client, namespace = state.broker.client, state.broker.namespace
    now = time.time()
    with sessions.begin() as session:
        for key, batch_id in ((capped, "batch_kb_capped"), (free, "batch_kb_free")):
            session.add(
                Batch(
                    id=f"{batch_id}_{uuid.uuid4().hex[:6]}",
                    tenant_id=tenant_id,
                    status="in_progress",
                    priority="normal",
                    completion_window="24h",
                    total=10,
                    created_at=int(now),
                    expires_at=int(now) + 86400,
                    key_id=key["id"],
                )
            )
        session.flush()
        ids = {b.key_id: b.id for b in session.query(Batch).filter(col(Batch.tenant_id) == tenant_id)}
    capped_batch, free_batch = ids[capped["id"]], ids[free["id"]]
    budgets = Budgets(redis.Redis.from_url(settings.redis_url), namespace, sessions, settings)
    try:
        lease = int(now) + 900
        admitted = []
        for i in range(8):
            admission = budgets.admit(tenant_id, capped_batch, f"q{i}", 0.01, lease, now)
            if not admission.admitted:
                break
            admitted.append(admission)
        assert len(admitted) == 5, "0.05 of budget takes five 0.01 reservations, not a sixth"
        assert not admission.admitted and admission.key_id == capped["id"] and admission.newly_waiting
        again = budgets.admit(tenant_id, capped_batch, "q-again", 0.01, lease, now)
        assert not again.admitted and not again.newly_waiting  # waiting once, not per query
        assert budgets.admit(tenant_id, free_batch, "other", 0.01, lease, now).admitted

        # Settling at the actual cost: 4 × 0.01 = 80% of the budget → a warning, once.
        for i, a in enumerate(admitted[:4]):
            budgets.settle(tenant_id, f"q{i}", a, 0.01)
        budgets.notify(tenant_id, 0.05, 0.06, int(now), reached=True, key_id=capped["id"])
        budgets.notify(tenant_id, 0.05, 0.06, int(now), reached=True, key_id=capped["id"])
        with sessions() as session:
            kinds = sorted(
                n.kind for n in session.query(Notice).filter(col(Notice.tenant_id) == capped["id"])
            )
        assert kinds == ["cost.budget_exceeded", "cost.budget_warning"]

        # The tenant's own budget holds beside the key's: 0.011 leaves room for one more query.
        with sessions.begin() as session:
            session.execute(
                update(Tenant).where(col(Tenant.id) == tenant_id).values(monthly_budget_usd=0.011)
            )
        budget_changed(client, namespace, sessions, tenant_id, rebuild=True)
        budgets._budgets.pop(tenant_id, None)  # the listener may not have heard it yet
        assert budgets.admit(tenant_id, free_batch, "t1", 0.01, lease, now).admitted
        by_tenant = budgets.admit(tenant_id, free_batch, "t2", 0.01, lease, now)
        assert not by_tenant.admitted and by_tenant.key_id is None
        with sessions.begin() as session:
            session.execute(update(Tenant).where(col(Tenant.id) == tenant_id).values(monthly_budget_usd=None))
        budget_changed(client, namespace, sessions, tenant_id, rebuild=True)
        budgets._budgets.pop(tenant_id, None)

        # Raising the key's budget through the API: its batch stops waiting and its queries start.
        with sessions.begin() as session:
            session.execute(
                update(Batch).where(col(Batch.id) == capped_batch).values(waiting={"reason": "budget"})
            )
        raised = api.patch(
            f"/v1/keys/{capped['id']}", json={"budget_usd_monthly": 1.0}, headers=bearer(admin)
        )
        assert raised.status_code == 200
        with sessions() as session:
            assert session.get(Batch, capped_batch).waiting is None
        deadline = time.monotonic() + 10
        while budgets.key_budget(capped_batch, time.time())[1] != 1.0:
            assert time.monotonic() < deadline, "the raise was never heard"
            time.sleep(0.05)
        assert budgets.admit(tenant_id, capped_batch, "q-after", 0.01, lease, time.time()).admitted
    finally:
        budgets.close()
