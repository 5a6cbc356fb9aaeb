"""Expiry and the cost jobs, called directly (no scheduler process) against a real database, with
the events they emit delivered by the real ``Dispatcher`` to a local receiver and verified with
``standardwebhooks``; and the two API faces of cost: intake's 402 once the month's budget is spent,
and ``/v1/usage``.

The jobs scan the whole database, so every test runs on a database of its own (a fresh one per
test, of the kind CONCLAVE_TEST_DB selects) and a Redis namespace of its own.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from api.main import create_app
from scheduler.jobs.costs import budget_checks, daily_summaries
from scheduler.jobs.expiry import expire_batches
from scheduler.jobs.webhooks import Dispatcher
from shared.batches.results import iter_results
from shared.keys import fair_depth
from shared.models import PROVIDER_CALLS, Batch, Notice, Query, Tenant, WebhookDelivery
from shared.settings import Settings
from shared.tenants import IssuedKey, issue_key
from shared.webhooks.endpoints import register_endpoint
from tests.helpers import counts_add_up, jsonl, poll
from tests.leaks import remember_secret
from tests.leases import claim_query
from tests.receivers import WebhookReceiver, verify

pytestmark = pytest.mark.integration

SHORT_SCHEDULE = [0, 1, 1, 1]


def ts(iso: str) -> int:
    """Unix seconds of an ISO 8601 time in UTC."""
    return int(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())


# ---------------------------------------------------------------- a private database and namespace


@pytest.fixture
def own_settings(
    settings: Settings, namespace: str, own_database_url: str, rclient: redis.Redis
) -> Iterator[Settings]:
    own = settings.model_copy(
        update={
            "queue_namespace": f"{namespace}-costs-{uuid.uuid4().hex[:8]}",
            "database_url": own_database_url,
            # The receiver listens on 127.0.0.1.
            "webhook_allow_private": True,
        }
    )
    yield own
    keys = list(rclient.scan_iter(f"{own.queue_namespace}:*", count=1000))
    for i in range(0, len(keys), 1000):
        rclient.delete(*keys[i : i + 1000])


@pytest.fixture
def api(own_settings: Settings) -> Iterator[TestClient]:
    """The real app, in process, on the private database and namespace."""
    app = create_app(own_settings)
    try:
        with TestClient(app) as client:
            yield client
    finally:
        state = app.state.conclave
        state.broker.close()
        state.broker.client.close()
        bind = state.sessions.kw["bind"]
        bind.dispose()


@pytest.fixture
def dispatcher(own_sessions: sessionmaker[Session]) -> Dispatcher:
    return Dispatcher(own_sessions, schedule=SHORT_SCHEDULE, allow_private=True)


# ---------------------------------------------------------------- helpers


def issue(
    sessions: sessionmaker[Session], tier: str = "enterprise", budget: float | None = None
) -> IssuedKey:
    with sessions.begin() as session:
        issued = issue_key(session, tenant_name=f"t-{uuid.uuid4().hex[:8]}", role="admin", tier=tier)
        if budget is not None:
            session.execute(
                update(Tenant).where(col(Tenant.id) == issued.tenant_id).values(monthly_budget_usd=budget)
            )
    remember_secret(issued.api_key, issued.webhook_secret)
    return issued


def bearer(issued: IssuedKey) -> dict[str, str]:
    return {"Authorization": f"Bearer {issued.api_key}"}


def subscribe(sessions: sessionmaker[Session], tenant_id: str, url: str, events: list[str]) -> str:
    with sessions.begin() as session:
        return register_endpoint(session, tenant_id, url, events, allow_private=True).id


def add_calls(
    sessions: sessionmaker[Session],
    tenant_id: str,
    calls: list[tuple[Any, ...]],
) -> None:
    """Ledger rows: (created_at, cost_usd[, model, input_tokens, output_tokens])."""
    rows = []
    for call in calls:
        created_at, cost, model, tokens_in, tokens_out = (*call, "sim:alpha", 10, 5)[:5]
        rows.append(
            {
                "query_id": f"query_{uuid.uuid4().hex[:12]}",
                "batch_id": "batch_ledger",
                "tenant_id": tenant_id,
                "model": model,
                "stage": "answer",
                "attempt": 1,
                "status": "succeeded",
                "latency_ms": 5,
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "cost_usd": cost,
                "created_at": created_at,
            }
        )
    with sessions.begin() as session:
        session.execute(insert(PROVIDER_CALLS), rows)


def deliveries(sessions: sessionmaker[Session], event_type: str) -> list[WebhookDelivery]:
    with sessions() as session:
        return list(
            session.scalars(
                select(WebhookDelivery)
                .where(col(WebhookDelivery.event_type) == event_type)
                .order_by(col(WebhookDelivery.created_at), col(WebhookDelivery.id))
            )
        )


def notices(sessions: sessionmaker[Session], kind: str) -> list[tuple[str, str]]:
    with sessions() as session:
        rows = session.execute(
            select(col(Notice.tenant_id), col(Notice.period)).where(col(Notice.kind) == kind)
        ).all()
    return sorted((r[0], r[1]) for r in rows)


def body(delivery: WebhookDelivery) -> dict[str, Any]:
    parsed: dict[str, Any] = orjson.loads(delivery.body)
    return parsed


def deliver(
    dispatcher: Dispatcher, receiver: WebhookReceiver, expected: dict[str, int], now: int | None = None
) -> None:
    """Runs the dispatcher until each path got its expected number of requests."""

    def step() -> bool:
        dispatcher.run(now=now)
        return all(len(receiver.on(path)) >= n for path, n in expected.items())

    poll(step, timeout=30, interval=0.1, what=f"deliveries to {sorted(expected)}")


def concurrently(n: int, job: Callable[[], int]) -> list[int]:
    """Runs ``job`` in ``n`` threads released at the same instant; returns their results."""
    barrier = threading.Barrier(n)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(job())
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a job thread hung"
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------- expiry


def test_an_expired_batch_ends_expired_and_each_target_hears_once(
    api: TestClient,
    own_sessions: sessionmaker[Session],
    receiver: WebhookReceiver,
    dispatcher: Dispatcher,
) -> None:
    issued = issue(own_sessions)
    headers = bearer(issued)
    endpoint = api.post(
        "/v1/webhooks", json={"url": f"{receiver.url}/tenant", "events": ["batch.expired"]}, headers=headers
    )
    assert endpoint.status_code == 201, endpoint.text
    subscribe(own_sessions, issued.tenant_id, f"{receiver.url}/unsubscribed", ["batch.completed"])
    stranger = issue(own_sessions)
    subscribe(own_sessions, stranger.tenant_id, f"{receiver.url}/stranger", ["*"])

    created = api.post(
        "/v1/batches",
        json={
            "queries": [{"custom_id": f"q-{i}", "prompt": f"question {i}"} for i in range(3)],
            "webhook_url": f"{receiver.url}/batch",
            "completion_window": "1m",
        },
        headers=headers,
    )
    assert created.status_code == 202, created.text
    batch = created.json()
    batch_id = batch["id"]
    assert batch["expires_at"] == batch["created_at"] + 60
    # One query is running on a worker when the window passes; the others are still queued.
    with own_sessions() as session:
        first = session.scalars(
            select(col(Query.id)).where(col(Query.batch_id) == batch_id).order_by(col(Query.seq))
        ).first()
    assert first is not None
    with own_sessions.begin() as session:
        assert claim_query(session, first, "worker-x", 600, batch["created_at"] + 1) is not None

    # Not past the window yet.
    assert expire_batches(own_sessions, now=batch["expires_at"]) == []
    assert api.get(f"/v1/batches/{batch_id}", headers=headers).json()["status"] == "in_progress"

    now = batch["created_at"] + 61
    assert expire_batches(own_sessions, now=now) == [batch_id]
    expired = api.get(f"/v1/batches/{batch_id}", headers=headers).json()
    assert expired["status"] == "expired"
    assert expired["expired_at"] == now
    assert expired["completed_at"] is None
    assert expired["request_counts"]["expired"] == 3 and counts_add_up(expired)

    records = list(iter_results(own_sessions, batch_id))
    assert [r["custom_id"] for r in records] == ["q-0", "q-1", "q-2"]
    for record in records:
        assert record["status"] == "expired"
        assert record["error"]["type"] == "expired"
    assert [r["custom_id"] for r in iter_results(own_sessions, batch_id, status="expired")] == [
        "q-0",
        "q-1",
        "q-2",
    ]
    served = jsonl(api.get(f"/v1/batches/{batch_id}/results", headers=headers))
    assert {(r["status"], r["error"]["type"]) for r in served} == {("expired", "expired")}

    # One batch.expired delivery per target: the batch's own URL and the subscribed endpoint.
    rows = deliveries(own_sessions, "batch.expired")
    assert sorted(d.url for d in rows) == [f"{receiver.url}/batch", f"{receiver.url}/tenant"]
    assert {d.tenant_id for d in rows} == {issued.tenant_id}
    assert {d.batch_id for d in rows} == {batch_id}
    by_url = {d.url: d for d in rows}
    assert by_url[f"{receiver.url}/batch"].endpoint_id is None
    assert by_url[f"{receiver.url}/tenant"].endpoint_id == endpoint.json()["id"]
    assert deliveries(own_sessions, "batch.completed") == []

    deliver(dispatcher, receiver, {"/batch": 1, "/tenant": 1}, now=now)
    for path in ("/batch", "/tenant"):
        [request] = receiver.on(path)
        assert request.headers["webhook-id"] == by_url[f"{receiver.url}{path}"].id
        event = verify(issued.webhook_secret, request)
        assert event["type"] == "batch.expired"
        data = event["data"]
        assert (data["id"], data["status"], data["expired_at"]) == (batch_id, "expired", now)
        assert data["request_counts"]["expired"] == 3
    with own_sessions() as session:
        secret = session.scalar(select(col(Tenant.webhook_secret)).where(col(Tenant.id) == issued.tenant_id))
    assert secret == issued.webhook_secret

    # A second run, even much later, finds nothing and emits nothing more.
    assert expire_batches(own_sessions, now=now + 3600) == []
    assert len(deliveries(own_sessions, "batch.expired")) == 2
    assert dispatcher.run(now=now + 3600) == 0
    assert len(receiver.requests) == 2
    assert receiver.on("/unsubscribed") == [] and receiver.on("/stranger") == []
    again = api.get(f"/v1/batches/{batch_id}", headers=headers).json()
    assert (again["status"], again["expired_at"]) == ("expired", now)


# ---------------------------------------------------------------- daily summary


def test_daily_summary_once_per_tenant_with_yesterdays_totals(
    own_sessions: sessionmaker[Session], receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    now = ts("2025-06-15T12:00:00")
    day = ts("2025-06-14T00:00:00")
    a, b, quiet = issue(own_sessions), issue(own_sessions), issue(own_sessions)
    subscribe(own_sessions, a.tenant_id, f"{receiver.url}/a", ["cost.daily_summary"])
    subscribe(own_sessions, a.tenant_id, f"{receiver.url}/a-budget", ["cost.budget_exceeded"])
    subscribe(own_sessions, b.tenant_id, f"{receiver.url}/b", ["*"])
    subscribe(own_sessions, quiet.tenant_id, f"{receiver.url}/quiet", ["cost.daily_summary"])
    # Costs are binary fractions, so sums are exact.
    add_calls(
        own_sessions,
        a.tenant_id,
        [
            (day, 0.25, "sim:alpha", 100, 20),  # the first second of yesterday
            (day + 3600, 0.5, "sim:beta", 200, 40),
            (day + 86399, 0.125, "sim:alpha", 10, 5),  # the last second of yesterday
            (day - 1, 7.0, "sim:alpha", 1000, 1000),  # the day before
            (day + 86400, 9.0, "sim:alpha", 1000, 1000),  # today's first second
            (now, 3.0, "sim:beta", 1000, 1000),
        ],
    )
    add_calls(own_sessions, b.tenant_id, [(day + 50, 0.0625, "sim:gamma", 1, 2), (now - 10, 5.0)])
    add_calls(own_sessions, quiet.tenant_id, [(now - 60, 1.0)])  # only today: no summary

    assert daily_summaries(own_sessions, now=now) == 2
    assert notices(own_sessions, "cost.daily_summary") == sorted(
        [(a.tenant_id, "2025-06-14"), (b.tenant_id, "2025-06-14")]
    )
    rows = deliveries(own_sessions, "cost.daily_summary")
    assert sorted(d.url for d in rows) == [f"{receiver.url}/a", f"{receiver.url}/b"]
    by_tenant = {d.tenant_id: body(d) for d in rows}
    summary = by_tenant[a.tenant_id]["data"]
    assert summary["date"] == "2025-06-14"
    assert (summary["from"], summary["to"]) == (day, day + 86400)
    assert (summary["calls"], summary["input_tokens"], summary["output_tokens"]) == (3, 310, 65)
    assert summary["total_tokens"] == 375
    assert summary["cost_usd"] == pytest.approx(0.875)
    assert {m["model"]: (m["calls"], m["cost_usd"]) for m in summary["data"]} == {
        "sim:alpha": (2, pytest.approx(0.375)),
        "sim:beta": (1, pytest.approx(0.5)),
    }
    other = by_tenant[b.tenant_id]["data"]
    assert (other["calls"], other["input_tokens"], other["output_tokens"]) == (1, 1, 2)
    assert other["cost_usd"] == pytest.approx(0.0625)

    # Later runs the same day send nothing more.
    assert daily_summaries(own_sessions, now=now) == 0
    assert daily_summaries(own_sessions, now=now + 3600) == 0
    assert len(deliveries(own_sessions, "cost.daily_summary")) == 2

    deliver(dispatcher, receiver, {"/a": 1, "/b": 1})
    for path, issued, expected in (("/a", a, summary), ("/b", b, other)):
        [request] = receiver.on(path)
        event = verify(issued.webhook_secret, request)
        assert event["type"] == "cost.daily_summary"
        assert event["data"] == expected
    assert receiver.on("/a-budget") == [] and receiver.on("/quiet") == []


def test_daily_summaries_catch_up_on_days_missed_while_the_scheduler_was_down(
    own_sessions: sessionmaker[Session], receiver: WebhookReceiver
) -> None:
    a, b = issue(own_sessions), issue(own_sessions)
    for issued in (a, b):
        subscribe(
            own_sessions, issued.tenant_id, f"{receiver.url}/{issued.tenant_id}", ["cost.daily_summary"]
        )
    add_calls(own_sessions, a.tenant_id, [(ts("2025-06-10T08:00:00"), 0.5)])
    assert daily_summaries(own_sessions, now=ts("2025-06-11T00:05:00")) == 1
    # Down from the 11th to the 15th: calls kept coming (the workers ran), no summary went out.
    add_calls(
        own_sessions,
        a.tenant_id,
        [
            (ts("2025-06-11T09:00:00"), 0.25),
            (ts("2025-06-13T23:59:59"), 0.125),
            (ts("2025-06-14T01:00:00"), 1.0),
        ],
    )
    add_calls(own_sessions, b.tenant_id, [(ts("2025-06-12T12:00:00"), 2.0), (ts("2025-06-15T10:00:00"), 4.0)])

    assert daily_summaries(own_sessions, now=ts("2025-06-15T11:00:00")) == 4
    assert notices(own_sessions, "cost.daily_summary") == sorted(
        [
            (a.tenant_id, "2025-06-10"),
            (a.tenant_id, "2025-06-11"),
            (a.tenant_id, "2025-06-13"),
            (a.tenant_id, "2025-06-14"),
            (b.tenant_id, "2025-06-12"),
        ]
    )
    sent = {
        (d.tenant_id, body(d)["data"]["date"]): body(d)["data"]
        for d in deliveries(own_sessions, "cost.daily_summary")
    }
    assert {day: s["cost_usd"] for (t, day), s in sent.items() if t == a.tenant_id} == {
        "2025-06-10": 0.5,
        "2025-06-11": 0.25,
        "2025-06-13": 0.125,
        "2025-06-14": 1.0,
    }
    assert sent[(b.tenant_id, "2025-06-12")]["cost_usd"] == 2.0
    # Each day once: later runs, today's or tomorrow's, send only what is new.
    assert daily_summaries(own_sessions, now=ts("2025-06-15T12:00:00")) == 0
    assert daily_summaries(own_sessions, now=ts("2025-06-16T00:05:00")) == 1
    assert len(notices(own_sessions, "cost.daily_summary")) == 6
    assert (b.tenant_id, "2025-06-15") in notices(own_sessions, "cost.daily_summary")


# ---------------------------------------------------------------- budget checks


def test_budget_exceeded_once_per_month_per_tenant(
    own_sessions: sessionmaker[Session],
    own_settings: Settings,
    receiver: WebhookReceiver,
    dispatcher: Dispatcher,
) -> None:
    free_budget = own_settings.tier_monthly_budget_usd["free"]
    assert free_budget == 10.0
    march = ts("2025-03-20T00:00:00")
    over = issue(own_sessions, tier="free")
    under = issue(own_sessions, tier="free")
    low = issue(own_sessions, tier="free", budget=3.0)  # a tenant's own budget, below its tier's
    high = issue(own_sessions, tier="free", budget=50.0)  # … and above it
    unlimited = issue(own_sessions, tier="enterprise")
    tenants = {"over": over, "under": under, "low": low, "high": high, "unlimited": unlimited}
    for name, issued in tenants.items():
        subscribe(own_sessions, issued.tenant_id, f"{receiver.url}/{name}", ["cost.budget_exceeded"])
    add_calls(
        own_sessions,
        over.tenant_id,
        [(ts("2025-03-01T00:00:00"), 4.0), (ts("2025-03-10T00:00:00"), 4.0), (march - 5, 4.0)],
    )
    add_calls(own_sessions, over.tenant_id, [(ts("2025-02-27T00:00:00"), 100.0)])  # last month
    add_calls(own_sessions, under.tenant_id, [(march - 5, 9.5), (ts("2025-02-28T23:59:59"), 50.0)])
    add_calls(own_sessions, low.tenant_id, [(march - 5, 4.0)])
    add_calls(own_sessions, high.tenant_id, [(march - 5, 12.0)])
    add_calls(own_sessions, unlimited.tenant_id, [(march - 5, 1000.0)])

    assert budget_checks(own_sessions, own_settings, now=march) == 2
    assert notices(own_sessions, "cost.budget_exceeded") == sorted(
        [(over.tenant_id, "2025-03"), (low.tenant_id, "2025-03")]
    )
    rows = deliveries(own_sessions, "cost.budget_exceeded")
    assert sorted(d.url for d in rows) == sorted([f"{receiver.url}/over", f"{receiver.url}/low"])
    data = {d.tenant_id: body(d)["data"] for d in rows}
    assert data[over.tenant_id] == {"period": "2025-03", "budget_usd": 10.0, "spent_usd": 12.0}
    assert data[low.tenant_id] == {"period": "2025-03", "budget_usd": 3.0, "spent_usd": 4.0}

    # Once per month, however often the check runs and however much more is spent.
    assert budget_checks(own_sessions, own_settings, now=march) == 0
    add_calls(own_sessions, over.tenant_id, [(march + 60, 20.0)])
    assert budget_checks(own_sessions, own_settings, now=ts("2025-03-31T23:59:59")) == 0

    # A new month starts from nothing: no notice until that month's spend reaches the budget.
    april = ts("2025-04-05T00:00:00")
    assert budget_checks(own_sessions, own_settings, now=april) == 0
    add_calls(own_sessions, over.tenant_id, [(april - 60, 9.0)])
    assert budget_checks(own_sessions, own_settings, now=april) == 0
    add_calls(own_sessions, over.tenant_id, [(april - 30, 2.0)])
    assert budget_checks(own_sessions, own_settings, now=april) == 1
    assert budget_checks(own_sessions, own_settings, now=april + 86400) == 0
    assert notices(own_sessions, "cost.budget_exceeded") == sorted(
        [(over.tenant_id, "2025-03"), (over.tenant_id, "2025-04"), (low.tenant_id, "2025-03")]
    )
    newest = deliveries(own_sessions, "cost.budget_exceeded")[-1]
    assert (newest.tenant_id, body(newest)["data"]) == (
        over.tenant_id,
        {"period": "2025-04", "budget_usd": 10.0, "spent_usd": 11.0},
    )

    deliver(dispatcher, receiver, {"/over": 2, "/low": 1})
    periods = [verify(over.webhook_secret, r)["data"]["period"] for r in receiver.on("/over")]
    assert sorted(periods) == ["2025-03", "2025-04"]
    assert verify(low.webhook_secret, receiver.on("/low")[0])["type"] == "cost.budget_exceeded"
    for name in ("under", "high", "unlimited"):
        assert receiver.on(f"/{name}") == [], name


def test_concurrent_budget_checks_send_once(
    own_sessions: sessionmaker[Session], own_settings: Settings
) -> None:
    racer = issue(own_sessions, tier="free")
    subscribe(own_sessions, racer.tenant_id, "http://127.0.0.1:9/racer", ["cost.budget_exceeded"])
    months = ["2025-05", "2025-06", "2025-07", "2025-08", "2025-09"]
    for month in months:
        now = ts(f"{month}-15T00:00:00")
        add_calls(own_sessions, racer.tenant_id, [(now - 60, 25.0)])

        def check(now: int = now) -> int:
            return budget_checks(own_sessions, own_settings, now=now)

        sent = concurrently(4, check)
        assert sorted(sent) == [0, 0, 0, 1], month
    assert notices(own_sessions, "cost.budget_exceeded") == [(racer.tenant_id, m) for m in months]
    sent_periods = [body(d)["data"]["period"] for d in deliveries(own_sessions, "cost.budget_exceeded")]
    assert sorted(sent_periods) == months


# ---------------------------------------------------------------- intake and usage


def _stored(sessions: sessionmaker[Session], tenant_id: str) -> tuple[int, int]:
    with sessions() as session:
        batches = session.scalar(select(func.count()).where(col(Batch.tenant_id) == tenant_id))
        queries = session.scalar(select(func.count()).where(col(Query.tenant_id) == tenant_id))
    return int(batches or 0), int(queries or 0)


def test_intake_refuses_new_batches_once_the_months_budget_is_spent(
    api: TestClient, own_sessions: sessionmaker[Session], own_settings: Settings, rclient: redis.Redis
) -> None:
    issued = issue(own_sessions, tier="free")
    headers = bearer(issued)
    batch = {"queries": [{"custom_id": "a", "prompt": "p"}, {"custom_id": "b", "prompt": "q"}]}
    ns = own_settings.queue_namespace

    def waiting() -> int:  # on the normal queue's list or in its fair lanes
        return int(rclient.llen(f"{ns}:normal")) + int(rclient.llen(fair_depth(ns, "normal")))

    assert api.post("/v1/batches", json=batch, headers=headers).status_code == 202
    add_calls(own_sessions, issued.tenant_id, [(int(time.time()), 6.0)])
    assert api.post("/v1/batches", json=batch, headers=headers).status_code == 202  # 6 of 10 spent
    assert _stored(own_sessions, issued.tenant_id) == (2, 4)
    depth = waiting()
    assert depth == 4

    add_calls(own_sessions, issued.tenant_id, [(int(time.time()), 4.0)])  # 10 of 10: spent
    refused = api.post("/v1/batches", json=batch, headers=headers)
    assert refused.status_code == 402, refused.text
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded"
    assert "budget" in error["message"]
    # Nothing new is stored or enqueued, with or without an idempotency key.
    replay = api.post("/v1/batches", json=batch, headers={**headers, "Idempotency-Key": "k-1"})
    assert replay.status_code == 402
    assert _stored(own_sessions, issued.tenant_id) == (2, 4)
    assert waiting() == depth
    listed = api.get("/v1/batches", headers=headers).json()["data"]
    assert len(listed) == 2

    # The budget is the tenant's: another free tenant is unaffected, and raising this tenant's
    # own budget lets it submit again.
    other = issue(own_sessions, tier="free")
    assert api.post("/v1/batches", json=batch, headers=bearer(other)).status_code == 202
    with own_sessions.begin() as session:
        session.execute(
            update(Tenant).where(col(Tenant.id) == issued.tenant_id).values(monthly_budget_usd=100.0)
        )
    assert api.post("/v1/batches", json=batch, headers=headers).status_code == 202
    assert _stored(own_sessions, issued.tenant_id) == (3, 6)


def test_usage_totals_are_the_sums_of_the_rows_within_the_bounds(
    api: TestClient, own_sessions: sessionmaker[Session]
) -> None:
    issued = issue(own_sessions)
    headers = bearer(issued)
    start = ts("2024-01-10T00:00:00")
    end = start + 2 * 86400
    add_calls(
        own_sessions,
        issued.tenant_id,
        [
            (start - 1, 1.0, "sim:alpha", 1000, 1000),  # before 'from'
            (start, 0.5, "sim:alpha", 100, 10),  # at 'from': included
            (start + 3600, 0.25, "sim:beta", 200, 20),
            (start + 86400 + 5, 0.125, "other:x", 300, 30),
            (end - 1, 0.0625, "sim:alpha", 1, 1),
            (end, 2.0, "sim:alpha", 1000, 1000),  # at 'to': excluded
            (end + 100, 4.0, "sim:beta", 1000, 1000),
        ],
    )
    stranger = issue(own_sessions)
    add_calls(own_sessions, stranger.tenant_id, [(start + 10, 64.0, "sim:alpha", 5000, 5000)])

    def usage(**params: Any) -> dict[str, Any]:
        response = api.get("/v1/usage", params=params, headers=headers)
        assert response.status_code == 200, response.text
        report: dict[str, Any] = response.json()
        return report

    report = usage(**{"from": start, "to": end})
    assert report["object"] == "usage"
    assert (report["from"], report["to"]) == (start, end)
    assert (report["calls"], report["input_tokens"], report["output_tokens"]) == (4, 601, 61)
    assert report["total_tokens"] == 662
    assert report["cost_usd"] == pytest.approx(0.9375)

    by_day = usage(**{"from": start, "to": end, "group_by": "day"})["data"]
    assert [(g["day"], g["calls"], g["cost_usd"]) for g in by_day] == [
        ("2024-01-10", 2, pytest.approx(0.75)),
        ("2024-01-11", 2, pytest.approx(0.1875)),
    ]
    by_model = usage(**{"from": start, "to": end, "group_by": "model"})["data"]
    assert {g["model"]: (g["calls"], g["input_tokens"]) for g in by_model} == {
        "sim:alpha": (2, 101),
        "sim:beta": (1, 200),
        "other:x": (1, 300),
    }
    by_provider = usage(**{"from": start, "to": end, "group_by": "provider"})["data"]
    assert {g["provider"]: (g["calls"], g["cost_usd"]) for g in by_provider} == {
        "other": (1, pytest.approx(0.125)),
        "sim": (3, pytest.approx(0.8125)),
    }
    for grouped in (by_day, by_model, by_provider):
        assert sum(g["calls"] for g in grouped) == report["calls"]
        assert sum(g["cost_usd"] for g in grouped) == pytest.approx(report["cost_usd"])

    # ISO 8601 bounds mean the same instants; a narrower window drops the rows outside it.
    assert usage(**{"from": "2024-01-10", "to": "2024-01-12"})["calls"] == 4
    narrow = usage(**{"from": "2024-01-10T01:00:00Z", "to": "2024-01-11T00:00:00+00:00"})
    assert (narrow["calls"], narrow["cost_usd"]) == (1, pytest.approx(0.25))
    # The default window is this month: none of these rows.
    assert usage()["calls"] == 0
