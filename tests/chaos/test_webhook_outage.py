"""Chaos: the webhook receiver is down when the batches end, then answers 503, then comes back.

Two targets get the events: the batch's own ``webhook_url`` and a tenant endpoint registered for
every event type. A second, small batch is cancelled at once, so a ``batch.cancelled`` (or, if its
queries won the race, a ``batch.completed``) event is due as well. The receiver first refuses
connections (its port is bound but not listening), then answers 503 with ``Retry-After``, then
200. Every event must end accepted exactly once per ``webhook-id``, every attempt of it carrying
the same signed body, verified by ``standardwebhooks`` with the tenant's secret.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
import standardwebhooks
from sqlalchemy import select
from sqlmodel import col

from shared.models import WebhookDelivery
from shared.sim import SimServer
from tests.chaos.conftest import QUERIES, TEST_TIMEOUT, Chaos, Launch, set_sim
from tests.chaos.invariants import check_batch
from tests.helpers import counts_add_up, poll, tagged_queries, wait_for_batch
from tests.receivers import Answer, Received, WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(TEST_TIMEOUT)]

# Attempts about a second apart (the dispatcher runs every second): the defaults (5 s, then 5 min,
# 30 min, ...) would keep the test waiting for hours. Enough of them that the cancelled batch's
# events, due from the start, are not exhausted while a 2,000-query batch runs on a busy machine.
RETRY_SCHEDULE = ",".join(["0"] + ["1"] * 179)
# Attempts each delivery must have failed in each phase before the receiver moves on.
REFUSED_ATTEMPTS = 3
UNAVAILABLE_ATTEMPTS = 2
CANCELLED_QUERIES = 50


class FlakyReceiver(WebhookReceiver):
    """A webhook receiver on 127.0.0.1: ``down`` (connections refused), ``unavailable`` (503 with
    ``Retry-After: 1``), then ``up`` (200). Every request it answers is kept, with its answer."""

    def __init__(self) -> None:
        self.state = "down"
        # Bound but not listening: the port is ours, and every connection to it is refused.
        super().__init__(self._answer_for_state, listening=False)

    def _answer_for_state(self, request: Received) -> Answer:
        if self.state == "up":
            return Answer(200)
        return Answer(503, {"Retry-After": "1"})

    def answer_unavailable(self) -> None:
        self.state = "unavailable"
        self.start()

    def come_back(self) -> None:
        self.state = "up"

    def by_id(self) -> dict[str, list[Received]]:
        grouped: dict[str, list[Received]] = defaultdict(list)
        for r in list(self.requests):
            grouped[r.headers["webhook-id"]].append(r)
        return grouped


@pytest.fixture
def receiver() -> Iterator[FlakyReceiver]:
    with FlakyReceiver() as r:
        yield r


def deliveries(chaos: Chaos) -> list[WebhookDelivery]:
    with chaos.sessions() as session:
        return list(
            session.scalars(
                select(WebhookDelivery)
                .where(col(WebhookDelivery.tenant_id) == chaos.tenant_id)
                .order_by(col(WebhookDelivery.id))
            ).all()
        )


def test_webhooks_reach_a_receiver_that_was_down(
    launch: Launch, sim: SimServer, receiver: FlakyReceiver
) -> None:
    chaos = launch(env={"CONCLAVE_WEBHOOK_RETRY_SCHEDULE": RETRY_SCHEDULE})
    set_sim(sim, latency_ms=50)
    endpoint = chaos.client.post("/v1/webhooks", json={"url": f"{receiver.url}/tenant", "events": ["*"]})
    assert endpoint.status_code == 201, endpoint.text
    secret = chaos.client.get("/v1/webhook-secret").json()["secret"]

    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches",
        json={"queries": tagged_queries(QUERIES, prefix="hook"), "webhook_url": f"{receiver.url}/batch"},
    ).json()["id"]
    cancelled_id = chaos.client.post(
        "/v1/batches",
        json={
            "queries": tagged_queries(CANCELLED_QUERIES, prefix="gone"),
            "webhook_url": f"{receiver.url}/batch",
        },
    ).json()["id"]
    assert chaos.client.post(f"/v1/batches/{cancelled_id}/cancel").status_code == 200
    figures = check_batch(chaos, sim, batch_id, "hook", started=started, webhook_targets=2)
    other = wait_for_batch(chaos.client, cancelled_id, timeout=120)
    assert other["status"] in ("cancelled", "completed") and counts_add_up(other), other
    expected_events = {
        (batch_id, "batch.completed"): 2,
        (cancelled_id, f"batch.{other['status']}"): 2,
    }

    # Down: every delivery is attempted and refused a few times.
    def attempted(n: int) -> list[WebhookDelivery] | None:
        rows = deliveries(chaos)
        due = Counter((d.batch_id, d.event_type) for d in rows)
        return rows if due == Counter(expected_events) and all(d.attempts >= n for d in rows) else None

    down_since = time.monotonic()
    rows = poll(lambda: attempted(REFUSED_ATTEMPTS), timeout=120, what="deliveries to be refused")
    assert all(d.status == "pending" and d.last_status_code is None for d in rows), rows
    assert receiver.requests == []

    # Unavailable: each event is answered 503 a few times, under the same webhook-id.
    receiver.answer_unavailable()
    poll(
        lambda: (
            len(receiver.by_id()) == len(rows)
            and all(len(r) >= UNAVAILABLE_ATTEMPTS for r in receiver.by_id().values())
        ),
        timeout=120,
        what="each delivery to meet a 503",
    )
    receiver.come_back()
    back_at = time.monotonic()
    down_for = back_at - down_since

    def all_delivered() -> list[WebhookDelivery] | None:
        rows = deliveries(chaos)
        return rows if all(d.status == "delivered" for d in rows) else None

    rows = poll(all_delivered, timeout=120, what="every delivery to be delivered")
    recovered_in = time.monotonic() - back_at

    # Each event accepted once; every try of it the same signed bytes, verified with the tenant secret.
    received = receiver.by_id()
    assert set(received) == {d.id for d in rows}
    verifier = standardwebhooks.Webhook(secret)
    for delivery in rows:
        tries = received[delivery.id]
        assert [t.status for t in tries].count(200) == 1 and tries[-1].status == 200, [
            t.status for t in tries
        ]
        assert len({t.body for t in tries}) == 1 and tries[-1].body.decode() == delivery.body
        for t in tries:
            event = verifier.verify(t.body, t.headers)
            assert event["type"] == delivery.event_type and event["data"]["id"] == delivery.batch_id
        assert tries[-1].path == ("/tenant" if delivery.endpoint_id else "/batch")
        # Refused attempts never reached the receiver, but they are counted.
        assert delivery.attempts >= len(tries) + REFUSED_ATTEMPTS

    completed = [
        verifier.verify(received[d.id][-1].body, received[d.id][-1].headers)
        for d in rows
        if d.batch_id == batch_id
    ]
    for event in completed:
        assert event["data"]["status"] == "completed"
        assert event["data"]["request_counts"] == figures.batch["request_counts"]
    listed = chaos.client.get("/v1/webhooks/deliveries", params={"status": "delivered"}).json()["data"]
    assert {d["id"] for d in listed} == {d.id for d in rows}
    assert chaos.broken() is None

    attempts = Counter(d.attempts for d in rows)
    print(
        f"\nchaos webhook-outage: {figures.line()} "
        f"deliveries={len(rows)} events={dict(Counter(d.event_type for d in rows))} "
        f"receiver_down_after_events={down_for:.1f}s attempts_per_delivery={dict(sorted(attempts.items()))} "
        f"refused={sum(d.attempts - len(received[d.id]) for d in rows)} "
        f"answered_503={sum(len(received[d.id]) - 1 for d in rows)} "
        f"delivered_within={recovered_in:.1f}s_of_coming_back"
    )
