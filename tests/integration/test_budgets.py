"""Budgets that hold while batches run (SPEC §17), through the real system: API and two worker
processes (64 queries in flight at once), real Redis, the simulated provider over HTTP on priced
models. Spend is read from ``/v1/usage`` (the ledger); events from a real webhook receiver."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.jobs.webhooks import Dispatcher
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import new_key, settings_env
from tests.helpers import poll, wait_for_batch
from tests.leaks import remember_secret
from tests.receivers import WebhookReceiver

pytestmark = pytest.mark.integration

PRICES = {"alpha": (1.0, 2.0), "beta": (3.0, 5.0), "gamma": (0.5, 0.5), "chairman": (2.0, 4.0)}
PROVIDERS = """
[providers.sim]
api = "openai"
base_url = "{url}/v1"
max_concurrency = 256

{models}
[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"
"""


@pytest.fixture(scope="module")
def budget_stack(
    settings: Settings, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    models = "\n".join(
        f'[models."sim:{name}"]\ninput_usd_per_mtok = {i}\noutput_usd_per_mtok = {o}\n'
        for name, (i, o) in PRICES.items()
    )
    cfg: Path = tmp_path_factory.mktemp("budget-cfg") / "providers.toml"
    cfg.write_text(PROVIDERS.format(url=sim_server.url, models=models))
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_PROVIDERS_FILE": str(cfg),
        "CONCLAVE_QUEUE_NAMESPACE": f"{settings.queue_namespace}-budget",
        # Waiting queries look again within 3 s: the test sees them resume quickly.
        "CONCLAVE_BUDGET_RECHECK_MAX_S": "3",
    }
    stack = Stack(env=env, logs=tmp_path_factory.mktemp("budget-logs"))
    try:
        stack.start_api()
        stack.start_workers(processes=2, threads=32)
        yield stack
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())


def api_client(stack: Stack, key: str) -> httpx.Client:
    assert stack.api_url
    return httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def operator_key(sessions: sessionmaker[Session]) -> str:
    with sessions.begin() as session:
        issued = issue_key(
            session, tenant_name=f"op-{uuid.uuid4().hex[:8]}", role="admin", tier="enterprise", operator=True
        )
    remember_secret(issued.api_key, issued.webhook_secret)
    return issued.api_key


def queries(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"b-{i}", "prompt": f"[tag:{tag}-{i:06d}] Name a prime above {i}."} for i in range(n)
    ]


def events(receiver: WebhookReceiver) -> list[str]:
    return [json.loads(r.body)["type"] for r in receiver.on("/cost")]


def test_a_tenant_over_budget_stops_spending_waits_and_resumes_when_the_budget_is_raised(
    budget_stack: Stack, sim: SimServer, sessions: sessionmaker[Session], receiver: WebhookReceiver
) -> None:
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 20}).raise_for_status()
    key, tenant_id = new_key(sessions)
    dispatcher = Dispatcher(sessions, schedule=[1, 1, 1], allow_private=True)
    with (
        api_client(budget_stack, key) as client,
        api_client(budget_stack, operator_key(sessions)) as operator,
    ):
        hook = client.post(
            "/v1/webhooks",
            json={"url": receiver.at("/cost"), "events": ["cost.budget_warning", "cost.budget_exceeded"]},
        )
        assert hook.status_code == 201, hook.text
        # What one query costs here, from a batch run without a budget.
        calibration = wait_for_batch(
            client, client.post("/v1/batches", json={"queries": queries(20, "cal")}).json()["id"], 120
        )
        per_query = calibration["cost_usd"] / 20
        assert per_query > 0
        budget = round(client.get("/v1/usage").json()["cost_usd"] + 100 * per_query, 6)
        patched = operator.patch(f"/v1/admin/tenants/{tenant_id}", json={"budget_usd_monthly": budget})
        assert patched.status_code == 200, patched.text
        assert patched.json()["budget_usd_monthly"] == budget

        batch_id = client.post("/v1/batches", json={"queries": queries(400, uuid.uuid4().hex[:8])}).json()[
            "id"
        ]

        # Stopped: the batch says it waits for budget, nothing runs, and nothing finished for
        # longer than a waiting query takes to look again (CONCLAVE_BUDGET_RECHECK_MAX_S, 3 s).
        seen: dict[str, Any] = {"completed": -1, "since": time.monotonic()}

        def stalled() -> dict[str, Any] | None:
            batch = client.get(f"/v1/batches/{batch_id}").json()
            counts = batch["request_counts"]
            if counts["completed"] != seen["completed"]:
                seen.update(completed=counts["completed"], since=time.monotonic())
            waits = batch["waiting"] and batch["waiting"]["reason"] == "budget"
            quiet = time.monotonic() - seen["since"] > 8
            return batch if waits and quiet and counts["running"] == 0 and counts["queued"] > 0 else None

        stopped = poll(stalled, timeout=180, interval=0.25, what="the batch to wait for budget")
        spent = client.get("/v1/usage").json()["cost_usd"]
        assert abs(spent - budget) <= max(0.05 * budget, 50 * per_query), (spent, budget, per_query)
        assert 50 <= stopped["request_counts"]["completed"] <= 150
        assert stopped["status"] == "in_progress"
        assert stopped["waiting"]["budget_usd"] == budget

        poll(
            lambda: (
                dispatcher.run() >= 0
                and sorted(events(receiver)) == ["cost.budget_exceeded", "cost.budget_warning"]
            ),
            timeout=30,
            what="the budget events",
        )
        # Still waiting, not failing: nothing more is spent while the budget stays as it is.
        again = client.get(f"/v1/batches/{batch_id}").json()
        assert again["request_counts"]["failed"] == 0 and again["request_counts"]["queued"] > 0
        assert client.get("/v1/usage").json()["cost_usd"] == pytest.approx(spent, abs=1e-9)

        raised = operator.patch(f"/v1/admin/tenants/{tenant_id}", json={"budget_usd_monthly": budget * 100})
        assert raised.status_code == 200, raised.text
        final = wait_for_batch(client, batch_id, timeout=240)
        assert final["status"] == "completed"
        assert final["request_counts"]["completed"] == 400
        assert final["waiting"] is None
        dispatcher.run()
        assert sorted(events(receiver)) == ["cost.budget_exceeded", "cost.budget_warning"]


def test_only_operator_admins_set_budgets_and_bad_values_change_nothing(
    budget_stack: Stack, sessions: sessionmaker[Session]
) -> None:
    key, tenant_id = new_key(sessions)
    with (
        api_client(budget_stack, key) as tenant_admin,
        api_client(budget_stack, operator_key(sessions)) as operator,
    ):
        refused = tenant_admin.patch(f"/v1/admin/tenants/{tenant_id}", json={"budget_usd_monthly": 5})
        assert refused.status_code == 403
        bad = operator.patch(f"/v1/admin/tenants/{tenant_id}", json={"budget_usd_monthly": -1})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_request_error"
        bad_tier = operator.patch(
            f"/v1/admin/tenants/{tenant_id}", json={"tier": "platinum", "budget_usd_monthly": 5}
        )
        assert bad_tier.status_code == 422 and bad_tier.json()["error"]["param"] == "tier"
        missing = operator.patch("/v1/admin/tenants/tenant_nobody", json={"tier": "pro"})
        assert missing.status_code == 404

        # null = unlimited, even on a tier that has a budget.
        free = operator.patch(
            f"/v1/admin/tenants/{tenant_id}", json={"tier": "free", "limits": {"requests_per_minute": 120}}
        ).json()
        assert (
            free["tier"] == "free"
            and free["budget_usd_monthly"] == 10.0
            and free["limits"] == {"requests_per_minute": 120}
        )
        unlimited = operator.patch(f"/v1/admin/tenants/{tenant_id}", json={"budget_usd_monthly": None}).json()
        assert unlimited["budget_usd_monthly"] is None and unlimited["tier"] == "free"
        bad_limit = operator.patch(f"/v1/admin/tenants/{tenant_id}", json={"limits": {"cache": "sometimes"}})
        assert bad_limit.status_code == 422 and bad_limit.json()["error"]["param"] == "limits"
