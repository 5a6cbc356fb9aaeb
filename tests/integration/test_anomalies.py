"""Anomalies (SPEC §13): a provider whose model turns three times slower is reported
``provider.degraded`` and, once it is back, ``provider.recovered``, as signed deliveries that the
``standardwebhooks`` library verifies; a batch that would miss its window is reported
``batch.at_risk`` once; ``/v1/admin/anomalies`` lists them.

The provider test runs a real API and workers on the simulated provider with a provider of its
own (so other tests' calls are not in its windows), and runs the anomaly job directly with an
explicit window: the recent window is exactly the last batch's calls, the baseline everything
before. The real windows (30 s, 10 min) are measured by ``benchmarks/anomalies.py``.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from scheduler.jobs.anomalies import AnomalyDetector
from scheduler.jobs.deadlines import promote_at_risk
from scheduler.jobs.webhooks import Dispatcher
from shared.analytics.anomalies import AnomalyConfig, read_anomalies
from shared.models import Batch, WebhookDelivery
from shared.providers.config import load_catalog
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from shared.webhooks.endpoints import current_secret, register_endpoint
from tests.conftest import new_key, settings_env
from tests.helpers import poll, tagged_queries, wait_for_batch
from tests.integration.test_access import operator_admin
from tests.integration.test_fairness import Tenants
from tests.integration.test_resilience import set_sim, sim_provider
from tests.leaks import remember_secret
from tests.receivers import WebhookReceiver, verify
from workers.broker import make_worker_broker

pytestmark = pytest.mark.integration

QUERIES = 12  # per batch: 12 calls per (member, stage), over the test's min_samples of 10
# Well above the API's and worker's own share of a call's latency (tens of ms on a loaded
# machine), so that three times the simulated latency is more than twice the measured one.
BASE_MS = 150


class AnomalyStack:
    def __init__(self, settings: Settings, sessions: Any, tmp_path: Path, sim: SimServer) -> None:
        self.namespace = f"ctest-anom-{uuid.uuid4().hex[:8]}"
        self.provider = f"an{uuid.uuid4().hex[:6]}"
        providers = tmp_path / "providers.toml"
        p = self.provider
        providers.write_text(
            sim_provider(p, sim.url, max_concurrency=256)
            + f'[council]\nmembers = ["{p}:alpha", "{p}:beta", "{p}:gamma"]\nchairman = "{p}:chairman"\n'
        )
        self.catalog = load_catalog(providers, sim.url)
        env = {
            **os.environ,
            **settings_env(settings),
            "CONCLAVE_PROVIDERS_FILE": str(providers),
            "CONCLAVE_QUEUE_NAMESPACE": self.namespace,
            "SIM_API_KEY": remember_secret("sk-sim-test"),
        }
        self.stack = Stack(env=env, logs=tmp_path / "logs")
        self.stack.logs.mkdir()
        url = self.stack.start_api()
        self.stack.start_workers(processes=1, threads=32)
        key, self.tenant_id = new_key(sessions)
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def batch(self, prefix: str) -> float:
        """Run a batch to its end; returns the second its first call could have started in."""
        # The windows are whole seconds (the ledger's created_at): start on a fresh one.
        started = math.floor(time.time()) + 1
        poll(lambda: time.time() >= started, timeout=2, interval=0.02)
        batch_id = self.client.post("/v1/batches", json={"queries": tagged_queries(QUERIES, prefix)}).json()[
            "id"
        ]
        assert wait_for_batch(self.client, batch_id, timeout=60)["status"] == "completed"
        return started

    def close(self, rdb: redis.Redis) -> None:
        self.client.close()
        self.stack.stop()
        keys = list(rdb.scan_iter(f"{self.namespace}:*"))
        if keys:
            rdb.delete(*keys)


@pytest.fixture
def anomaly_stack(
    settings: Settings, sessions: Any, tmp_path: Path, sim: SimServer, rclient: redis.Redis
) -> Iterator[AnomalyStack]:
    stack = AnomalyStack(settings, sessions, tmp_path, sim)
    yield stack
    stack.close(rclient)


def detector_for(stack: AnomalyStack, sessions: Any, rclient: redis.Redis, recent_from: float) -> Any:
    """A run of the job whose recent window starts at ``recent_from`` (min_samples 10)."""

    def run() -> dict[str, Any]:
        now = time.time()
        config = AnomalyConfig(recent_s=now - recent_from, min_samples=10, min_calls=10)
        return AnomalyDetector(sessions, rclient, stack.namespace, stack.catalog, config).run(now)

    return run


def test_a_model_three_times_slower_degrades_its_provider_and_recovers(
    anomaly_stack: AnomalyStack,
    sim: SimServer,
    sessions: Any,
    rclient: redis.Redis,
    receiver: WebhookReceiver,
) -> None:
    s = anomaly_stack
    with sessions.begin() as session:
        register_endpoint(
            session,
            s.tenant_id,
            f"{receiver.url}/ops",
            ["provider.degraded", "provider.recovered"],
            allow_private=True,
        )
        secret = current_secret(session, s.tenant_id)
    dispatcher = Dispatcher(sessions, schedule=[0, 1, 1], allow_private=True)
    set_sim(sim, latency_ms=BASE_MS)
    first = s.batch("base")
    # Normal latency after normal latency: nothing to report.
    assert detector_for(s, sessions, rclient, s.batch("base2"))() == {}
    assert first  # the baseline holds both batches

    set_sim(sim, models={"beta": {"latency_ms": 3 * BASE_MS}})
    slow_from = s.batch("slow")
    degraded = detector_for(s, sessions, rclient, slow_from)()
    assert list(degraded) == [s.provider], read_anomalies(rclient, s.namespace)
    reasons = degraded[s.provider]["reasons"]
    assert {(r["kind"], r["model"]) for r in reasons} == {("latency", f"{s.provider}:beta")}
    assert all(r["ratio"] > 2 for r in reasons)
    # A second run over the same window sends nothing new.
    assert list(detector_for(s, sessions, rclient, slow_from)()) == [s.provider]

    def events() -> list[dict[str, Any]]:
        dispatcher.run()
        return [verify(secret, r) for r in receiver.on("/ops")]

    [event] = poll(events, timeout=20, what="provider.degraded delivered")
    assert event["type"] == "provider.degraded"
    assert event["data"]["provider"] == s.provider and event["data"]["status"] == "degraded"
    assert s.client.get("/v1/admin/anomalies").status_code == 403  # operators only
    operator = {"Authorization": f"Bearer {operator_admin(sessions)}"}
    listed = s.client.get("/v1/admin/anomalies", headers=operator).json()
    assert [d["provider"] for d in listed["degraded_providers"]] == [s.provider]
    assert {q["model"] for q in listed["slow_queries"]} == {f"{s.provider}:beta"}

    set_sim(sim, models={})
    assert detector_for(s, sessions, rclient, s.batch("back"))() == {}

    def two_events() -> list[dict[str, Any]] | None:
        got = events()
        return got if len(got) >= 2 else None

    got = poll(two_events, timeout=20, what="provider.recovered delivered")
    assert [e["type"] for e in got] == ["provider.degraded", "provider.recovered"]
    recovered = got[1]["data"]
    assert recovered["provider"] == s.provider and recovered["degraded_since"] == event["data"]["since"]
    assert len({r.headers["webhook-id"] for r in receiver.on("/ops")}) == 2

    anomalies = read_anomalies(rclient, s.namespace)
    assert anomalies["degraded_providers"] == []
    assert [e["kind"] for e in anomalies["recent"]] == ["provider.recovered", "provider.degraded"]


def test_an_open_circuit_degrades_until_it_closes(
    sessions: Any, rclient: redis.Redis, settings: Settings
) -> None:
    namespace = f"ctest-anom-{uuid.uuid4().hex[:8]}"
    catalog = load_catalog(settings.providers_file, settings.sim_provider_url)  # the simulated "sim"
    detector = AnomalyDetector(sessions, rclient, namespace, catalog, AnomalyConfig(recent_s=1))
    key = f"{namespace}:breaker:sim"
    try:
        rclient.hset(
            key, mapping={"state": "open", "opened_at": int(time.time() * 1000), "cooldown": 600_000}
        )
        degraded = detector.run()
        assert degraded["sim"]["reasons"] == [{"kind": "circuit", "state": "open"}]
        rclient.hset(key, "state", "closed")
        assert detector.run() == {}
        kinds = [e["kind"] for e in read_anomalies(rclient, namespace)["recent"]]
        assert kinds == ["provider.recovered", "provider.degraded"]
    finally:
        for k in list(rclient.scan_iter(f"{namespace}:*")):
            rclient.delete(k)


@pytest.fixture
def tenants(
    own_sessions: Any, own_database_url: str, settings: Settings, rclient: redis.Redis
) -> Iterator[Tenants]:
    own = settings.model_copy(
        update={"queue_namespace": f"ctest-anom-{uuid.uuid4().hex[:8]}", "database_url": own_database_url}
    )
    broker = make_worker_broker(own)
    yield Tenants(own_sessions, broker, own)
    broker.close()
    broker.client.close()
    for k in list(rclient.scan_iter(f"{own.queue_namespace}:*", count=1000)):
        rclient.delete(k)


def test_a_batch_at_risk_is_announced_once_to_its_url_and_its_tenant(
    tenants: Tenants, receiver: WebhookReceiver
) -> None:
    sessions: sessionmaker[Session] = tenants.sessions
    tenant = tenants.new()
    with sessions.begin() as session:
        register_endpoint(session, tenant, f"{receiver.url}/tenant", ["batch.at_risk"], allow_private=True)
        secret = current_secret(session, tenant)
    late = tenants.batch(tenant, 20, window="20m")
    safe = tenants.batch(tenant, 20, window="24h")
    now = int(time.time())
    with sessions.begin() as session:
        session.execute(
            update(Batch)
            .where(col(Batch.id) == late)
            .values(in_progress_at=now - 700, expires_at=now + 500, webhook_url=f"{receiver.url}/batch")
        )
    # Weighed again and again, and after its lanes forgot it was urgent: one event per target.
    for _ in range(3):
        assert promote_at_risk(sessions, tenants.broker, now=now)["normal"] == [late]
    tenants.broker.client.delete(f"{tenants.broker.namespace}:fair:normal:urgent")
    promote_at_risk(sessions, tenants.broker, now=now)
    with sessions() as session:
        rows = session.scalars(
            select(WebhookDelivery).where(col(WebhookDelivery.event_type) == "batch.at_risk")
        ).all()
    assert sorted((r.batch_id, r.url.rpartition("/")[2]) for r in rows) == [(late, "batch"), (late, "tenant")]
    assert safe not in {r.batch_id for r in rows}

    dispatcher = Dispatcher(sessions, schedule=[0, 1], allow_private=True)

    def delivered() -> list[Any]:
        dispatcher.run()
        return (
            receiver.on("/batch") + receiver.on("/tenant")
            if receiver.on("/batch") and receiver.on("/tenant")
            else []
        )

    for request in poll(delivered, timeout=20, what="batch.at_risk delivered"):
        event = verify(secret, request)
        assert event["type"] == "batch.at_risk" and event["data"]["id"] == late
        assert event["data"]["status"] == "in_progress"
    recent = read_anomalies(tenants.broker.client, tenants.broker.namespace)["recent"]
    assert [(e["kind"], e["batch_id"]) for e in recent] == [("batch.at_risk", late)]
