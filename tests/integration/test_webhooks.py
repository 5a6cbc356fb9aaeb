"""Webhooks end to end: events from real batches, Standard Webhooks signatures checked by the
``standardwebhooks`` library, retries, 410, exhaustion and redelivery, secret rotation, SSRF."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import standardwebhooks
from fastapi.testclient import TestClient

from api.main import create_app
from scheduler.jobs.webhooks import Dispatcher
from shared.settings import Settings
from shared.sim import SimServer
from tests.conftest import new_key
from tests.helpers import poll, tagged_queries, wait_for_batch
from tests.leaks import remember_secret
from tests.receivers import WebhookReceiver, verify

pytestmark = pytest.mark.integration

SHORT_SCHEDULE = [0, 1, 1, 1]


@pytest.fixture
def dispatcher(sessions: Any) -> Dispatcher:
    return Dispatcher(sessions, schedule=SHORT_SCHEDULE, allow_private=True)


def dispatch_until(dispatcher: Dispatcher, check: Any, timeout: float = 30) -> Any:
    def step() -> Any:
        dispatcher.run()
        return check()

    return poll(step, timeout=timeout, interval=0.2)


def test_batch_completed_reaches_both_targets_signed(
    client: httpx.Client, sim: SimServer, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    endpoint = client.post(
        "/v1/webhooks", json={"url": f"{receiver.url}/tenant", "events": ["batch.completed"]}
    )
    assert endpoint.status_code == 201 and endpoint.json()["enabled"] is True
    secret = client.get("/v1/webhook-secret").json()["secret"]
    assert secret.startswith("whsec_")
    body = {"queries": tagged_queries(3, prefix="wh"), "webhook_url": f"{receiver.url}/batch"}
    batch_id = client.post("/v1/batches", json=body).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"

    dispatch_until(dispatcher, lambda: receiver.on("/batch") and receiver.on("/tenant"))
    for request in receiver.on("/batch") + receiver.on("/tenant"):
        event = verify(secret, request)
        assert event["type"] == "batch.completed"
        assert event["data"]["id"] == batch_id and event["data"]["status"] == "completed"
        assert event["data"]["request_counts"]["completed"] == 3
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verify("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=", receiver.on("/batch")[0])
    delivered = client.get("/v1/webhooks/deliveries", params={"status": "delivered"}).json()["data"]
    assert {d["url"] for d in delivered} >= {f"{receiver.url}/batch", f"{receiver.url}/tenant"}


def test_rotation_signs_with_old_and_new_secret(
    client: httpx.Client, sim: SimServer, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    old = client.get("/v1/webhook-secret").json()["secret"]
    rotated = client.post("/v1/webhook-secret/rotate").json()
    new = remember_secret(rotated["secret"])
    assert new != old and new.startswith("whsec_")
    batch_id = client.post(
        "/v1/batches", json={"queries": tagged_queries(1, prefix="rot"), "webhook_url": f"{receiver.url}/rot"}
    ).json()["id"]
    wait_for_batch(client, batch_id, timeout=60)
    dispatch_until(dispatcher, lambda: receiver.on("/rot"))
    request = receiver.on("/rot")[0]
    assert verify(old, request)["data"]["id"] == batch_id
    assert verify(new, request)["data"]["id"] == batch_id
    assert len(request.headers["webhook-signature"].split(" ")) == 2


def test_retries_keep_the_webhook_id_and_deliver_on_the_fourth_attempt(
    client: httpx.Client, sim: SimServer, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    receiver.script = [500, 500, 500]
    batch_id = client.post(
        "/v1/batches",
        json={"queries": tagged_queries(1, prefix="retry"), "webhook_url": f"{receiver.url}/retry"},
    ).json()["id"]
    wait_for_batch(client, batch_id, timeout=60)
    dispatch_until(dispatcher, lambda: len(receiver.on("/retry")) >= 4)
    attempts = receiver.on("/retry")
    assert len(attempts) == 4
    assert len({a.headers["webhook-id"] for a in attempts}) == 1
    secret = client.get("/v1/webhook-secret").json()["secret"]
    assert verify(secret, attempts[-1])["type"] == "batch.completed"
    deliveries = client.get("/v1/webhooks/deliveries").json()["data"]
    mine = next(d for d in deliveries if d["batch_id"] == batch_id)
    assert (
        mine["status"] == "delivered"
        and mine["attempts"] == 4
        and mine["id"] == attempts[0].headers["webhook-id"]
    )


def test_410_disables_the_endpoint(
    client: httpx.Client, sim: SimServer, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    endpoint = client.post("/v1/webhooks", json={"url": f"{receiver.url}/gone", "events": ["*"]}).json()
    receiver.script = [410]
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(1, prefix="gone")}).json()["id"]
    wait_for_batch(client, batch_id, timeout=60)
    dispatch_until(dispatcher, lambda: receiver.on("/gone"))

    def disabled() -> bool:
        listed = client.get("/v1/webhooks").json()["data"]
        return any(e["id"] == endpoint["id"] and e["enabled"] is False for e in listed)

    poll(disabled, timeout=10)
    assert len(receiver.on("/gone")) == 1


def test_exhausted_delivery_is_failed_then_redelivered(
    client: httpx.Client, sim: SimServer, receiver: WebhookReceiver, dispatcher: Dispatcher
) -> None:
    receiver.script = [500, 503, 302, 500]
    batch_id = client.post(
        "/v1/batches", json={"queries": tagged_queries(1, prefix="ex"), "webhook_url": f"{receiver.url}/ex"}
    ).json()["id"]
    wait_for_batch(client, batch_id, timeout=60)

    def failed() -> dict | None:
        rows = client.get("/v1/webhooks/deliveries", params={"status": "failed"}).json()["data"]
        return next((d for d in rows if d["batch_id"] == batch_id), None)

    delivery = dispatch_until(dispatcher, failed)
    assert delivery["attempts"] == len(SHORT_SCHEDULE) and delivery["last_status_code"] == 500
    assert receiver.on("/elsewhere") == []  # the 302 was not followed
    again = client.post(f"/v1/webhooks/deliveries/{delivery['id']}/redeliver")
    assert again.status_code == 200 and again.json()["status"] == "pending"
    dispatch_until(dispatcher, lambda: len(receiver.on("/ex")) == 5)

    def delivered() -> bool:
        rows = client.get("/v1/webhooks/deliveries", params={"status": "delivered"}).json()["data"]
        return any(d["id"] == delivery["id"] for d in rows)

    poll(delivered, timeout=10)
    assert receiver.on("/ex")[-1].headers["webhook-id"] == delivery["id"]


@pytest.fixture(scope="module")
def strict_api(settings: Settings, sessions: Any) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"webhook_allow_private": False}))
    key, _ = new_key(sessions)
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://localhost:8080/hook",
        "ftp://example.com/hook",
    ],
)
def test_private_and_odd_urls_are_refused_at_registration(strict_api: TestClient, url: str) -> None:
    response = strict_api.post("/v1/webhooks", json={"url": url, "events": ["batch.completed"]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "url"
    batch = strict_api.post(
        "/v1/batches", json={"queries": [{"custom_id": "a", "prompt": "p"}], "webhook_url": url}
    )
    assert batch.status_code == 422 and batch.json()["error"]["param"] == "webhook_url"
    assert strict_api.get("/v1/webhooks").json()["data"] == []


def test_private_address_is_refused_again_at_delivery(sessions: Any, receiver: WebhookReceiver) -> None:
    from shared.webhooks.events import emit

    _, tenant_id = new_key(sessions)
    with sessions.begin() as session:
        [delivery_id] = emit(
            session,
            tenant_id,
            "batch.completed",
            {"id": "batch_x"},
            batch_id=None,
            batch_webhook_url=f"{receiver.url}/private",
        )
    strict = Dispatcher(sessions, schedule=SHORT_SCHEDULE, allow_private=False)

    def refused() -> bool:
        strict.run()
        with sessions() as session:
            from shared.models import WebhookDelivery

            row = session.get(WebhookDelivery, delivery_id)
            return row is not None and row.status == "failed"

    poll(refused, timeout=10)
    assert receiver.requests == []


def test_usage_totals_equal_the_ledger(
    client: httpx.Client, sim: SimServer, sessions: Any, tenant_key: Any
) -> None:
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(5, prefix="use")}).json()["id"]
    wait_for_batch(client, batch_id, timeout=60)
    from sqlalchemy import func, select

    from shared.models import ProviderCall

    with sessions() as session:
        calls, tokens_in = session.execute(
            select(func.count(), func.sum(ProviderCall.input_tokens)).where(
                ProviderCall.tenant_id == tenant_key[1]
            )
        ).one()
    usage = client.get("/v1/usage").json()
    assert usage["calls"] == calls == 35 and usage["input_tokens"] == tokens_in
    by_model = client.get("/v1/usage", params={"group_by": "model"}).json()["data"]
    assert sum(g["calls"] for g in by_model) == calls
    assert {g["model"] for g in by_model} == {"sim:alpha", "sim:beta", "sim:gamma", "sim:chairman"}
    by_provider = client.get("/v1/usage", params={"group_by": "provider"}).json()["data"]
    assert by_provider[0]["provider"] == "sim" and by_provider[0]["calls"] == calls
    by_day = client.get("/v1/usage", params={"group_by": "day", "from": "2020-01-01"}).json()["data"]
    assert sum(g["calls"] for g in by_day) == calls
    assert client.get("/v1/usage", params={"from": "yesterday"}).json()["error"]["param"] == "from"
    assert json.loads(json.dumps(usage))["object"] == "usage"
