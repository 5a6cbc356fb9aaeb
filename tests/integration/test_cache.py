"""The exact cache (SPEC §14) through the real system: API and worker processes, real Redis, the
simulated provider over HTTP. What a call cost or whether it was made is read from the provider's
own log (``sim_log``) and the ledger."""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.lifecycle.statuses import CallStatus
from shared.models import ProviderCall
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from shared.tenants import issue_key
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, sim_log, wait_for_batch
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

MEMBERS = ["sim:alpha", "sim:beta", "sim:gamma"]
# Priced models, so that what a hit saves is a real amount.
PRICES = {"alpha": (1.0, 2.0), "beta": (3.0, 5.0), "gamma": (0.5, 0.5), "chairman": (2.0, 4.0)}


def providers_toml(sim_url: str) -> str:
    models = "\n".join(
        f'[models."sim:{name}"]\ninput_usd_per_mtok = {i}\noutput_usd_per_mtok = {o}\n'
        for name, (i, o) in PRICES.items()
    )
    return f"""
[providers.sim]
api = "openai"
base_url = "{sim_url}/v1"
max_concurrency = 256

{models}
[council]
members = {MEMBERS!r}
chairman = "sim:chairman"
""".replace("'", '"')


@pytest.fixture(scope="module")
def cache_stack(
    settings: Settings, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """An API and two worker processes (the de-duplication is across processes) on priced models."""
    cfg: Path = tmp_path_factory.mktemp("cache-cfg") / "providers.toml"
    cfg.write_text(providers_toml(sim_server.url))
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_PROVIDERS_FILE": str(cfg),
        "CONCLAVE_QUEUE_NAMESPACE": f"{settings.queue_namespace}-cache",
    }
    stack = Stack(env=env, logs=tmp_path_factory.mktemp("cache-logs"))
    try:
        stack.start_api()
        stack.start_workers(processes=2, threads=32)
        yield stack
    finally:
        stack.stop()
        if stack.dead():
            print(stack.log_text())


@pytest.fixture
def client(cache_stack: Stack, sessions: sessionmaker[Session]) -> Iterator[httpx.Client]:
    with user_client(cache_stack, new_key(sessions)[0]) as c:
        yield c


def queries(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"c-{i}", "prompt": f"[tag:{tag}-{i:06d}] Name a prime above {i}."} for i in range(n)
    ]


def run_batch(client: httpx.Client, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    created = client.post("/v1/batches", json=body)
    assert created.status_code == 202, created.text
    final = wait_for_batch(client, created.json()["id"], timeout=timeout)
    assert final["status"] == "completed", final
    assert final["request_counts"]["completed"] == final["request_counts"]["total"]
    return final


def calls_made(sim: SimServer, since: int = 0) -> list[tuple[str, str]]:
    """(model, full prompt text) of every request the provider received after ``since``."""
    return [(r["model"], r["text"]) for r in sim_log(sim.url) if r["seq"] > since]


def stage_1(calls: list[tuple[str, str]] | Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    """The member answers among ``calls``: a stage 1 prompt is the question itself (reviews and
    syntheses quote it inside their own instructions)."""
    return [c for c in calls if c[1].startswith("[tag:")]


def last_seq(sim: SimServer) -> int:
    log = sim_log(sim.url)
    return log[-1]["seq"] if log else 0


def ledger(sessions: sessionmaker[Session], batch_id: str) -> list[ProviderCall]:
    with sessions() as s:
        return list(s.scalars(select(ProviderCall).where(col(ProviderCall.batch_id) == batch_id)))


def user_client(stack: Stack, api_key: str) -> httpx.Client:
    assert stack.api_url
    return httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)


def test_the_same_batch_again_makes_no_stage_1_call_and_reports_what_it_saved(
    client: httpx.Client, sim: SimServer, sessions: sessionmaker[Session]
) -> None:
    body = {"queries": queries(200, uuid.uuid4().hex[:8]), "cache": "exact"}
    mark = last_seq(sim)
    first = run_batch(client, body)
    assert first["council"]["cache"] == "exact"
    assert first["cache_hits"] == 0 and first["cost_saved_usd"] == 0
    first_calls = calls_made(sim, since=mark)
    assert len(stage_1(first_calls)) == 200 * len(MEMBERS)
    stage1 = [r for r in ledger(sessions, first["id"]) if r.stage == "answer"]
    assert len(stage1) == 200 * len(MEMBERS)
    stage1_cost = sum(r.cost_usd for r in stage1)

    mark = last_seq(sim)
    second = run_batch(client, body)
    again = calls_made(sim, since=mark)
    assert stage_1(again) == []  # the provider saw no member answer of the second batch
    # Nor any review or synthesis: with the same answers their prompts are the same too.
    assert again == []
    rows = ledger(sessions, second["id"])
    assert not [r for r in rows if r.stage == "answer" and r.status != CallStatus.CACHED]
    hits = [r for r in rows if r.status == CallStatus.CACHED]
    assert all(r.cost_usd == 0 for r in hits)
    saved_stage1 = sum(r.saved_usd for r in hits if r.stage == "answer")
    assert stage1_cost > 0
    assert saved_stage1 == pytest.approx(stage1_cost, rel=1e-9)
    # The batch reports every hit and its saving; the ledger holds the calls actually sent.
    assert second["cache_hits"] == len(hits) >= 200 * len(MEMBERS)
    assert second["cost_saved_usd"] == pytest.approx(sum(r.saved_usd for r in hits), abs=1e-8)
    # Every call was reused, so the whole first batch's cost was saved.
    assert second["cost_saved_usd"] == pytest.approx(first["cost_usd"], abs=1e-8)
    sent = [r for r in rows if r.status != CallStatus.CACHED]
    assert second["cost_usd"] == pytest.approx(sum(r.cost_usd for r in sent), abs=1e-8)
    assert len(sent) == len(again)

    records = jsonl(client.get(f"/v1/batches/{second['id']}/results"))
    assert all(m["cached"] == "exact" for r in records for m in r["members"])
    assert all(r["cache_hits"] >= len(MEMBERS) and r["cost_saved_usd"] > 0 for r in records)
    first_records = jsonl(client.get(f"/v1/batches/{first['id']}/results"))
    assert all(m["cached"] is None for r in first_records for m in r["members"])

    usage = client.get("/v1/usage").json()
    assert usage["cache_hits"] >= len(hits)
    assert usage["cost_saved_usd"] >= saved_stage1 - 1e-8
    metrics = client.get("/metrics").text
    assert "conclave_cache_hits_total" in metrics or "conclave_cache_hits{" in metrics


def test_invalidation_by_model_makes_that_model_answer_again(
    client: httpx.Client, sim: SimServer, sessions: sessionmaker[Session]
) -> None:
    body = {"queries": queries(20, uuid.uuid4().hex[:8]), "cache": "exact"}
    run_batch(client, body)
    dropped = client.delete("/v1/cache", params={"model": "sim:beta"})
    assert dropped.status_code == 200, dropped.text
    assert dropped.json()["model"] == "sim:beta"

    again = run_batch(client, body)
    answered = {(r.model, r.status) for r in ledger(sessions, again["id"]) if r.stage == "answer"}
    assert answered == {("sim:alpha", "cached"), ("sim:beta", "succeeded"), ("sim:gamma", "cached")}

    assert client.delete("/v1/cache").status_code == 200
    fresh = run_batch(client, body)
    assert not [r for r in ledger(sessions, fresh["id"]) if r.status == CallStatus.CACHED]

    other = client.delete("/v1/cache", params={"tenant_id": "tenant_someone_else"})
    assert other.status_code == 403 and other.json()["error"]["param"] == "tenant_id"


def test_two_identical_batches_at_once_make_each_distinct_call_once(
    client: httpx.Client, sim: SimServer, sessions: sessionmaker[Session]
) -> None:
    # Calls slow enough that the two batches' identical calls are in flight together.
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 300}).raise_for_status()
    body = {"queries": queries(60, uuid.uuid4().hex[:8]), "cache": "exact"}
    mark = last_seq(sim)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        finals = list(pool.map(lambda _: run_batch(client, body), range(2)))

    made = Counter(calls_made(sim, since=mark))
    assert [c for c, n in made.items() if n > 1] == []
    assert len(stage_1(made)) == 60 * len(MEMBERS)
    rows = [r for f in finals for r in ledger(sessions, f["id"])]
    sent = [r for r in rows if r.status != CallStatus.CACHED]
    assert len(sent) == sum(made.values())
    assert sum(f["cache_hits"] for f in finals) >= 60 * len(MEMBERS)


def test_another_tenant_submitting_the_same_batch_makes_every_call_itself(
    cache_stack: Stack, client: httpx.Client, sim: SimServer, sessions: sessionmaker[Session]
) -> None:
    body = {"queries": queries(30, uuid.uuid4().hex[:8]), "cache": "exact"}
    mark = last_seq(sim)
    first = run_batch(client, body)
    a_calls = Counter(calls_made(sim, since=mark))

    mark = last_seq(sim)
    with user_client(cache_stack, new_key(sessions)[0]) as b:
        second = run_batch(b, body)
        records = jsonl(b.get(f"/v1/batches/{second['id']}/results"))
    b_calls = Counter(calls_made(sim, since=mark))
    stage1 = stage_1(a_calls)
    assert len(stage1) == 30 * len(MEMBERS)
    assert all(b_calls[c] == 1 for c in stage1)
    assert second["cache_hits"] == 0 and second["cost_saved_usd"] == 0
    assert not [r for r in ledger(sessions, second["id"]) if r.status == CallStatus.CACHED]
    assert all(m["cached"] is None for r in records for m in r["members"])
    assert first["id"] != second["id"]


def test_a_batch_without_a_cache_field_takes_its_tenants_setting(
    cache_stack: Stack, sessions: sessionmaker[Session]
) -> None:
    key, tenant_id = new_key(sessions)
    with sessions.begin() as session:
        operator = issue_key(
            session, tenant_name=f"op-{uuid.uuid4().hex[:8]}", role="admin", tier="enterprise", operator=True
        )
    remember_secret(operator.api_key, operator.webhook_secret)
    with user_client(cache_stack, operator.api_key) as op, user_client(cache_stack, key) as client:
        body = {"queries": queries(2, uuid.uuid4().hex[:8])}
        assert "cache" not in client.post("/v1/batches", json=body).json()["council"]
        patched = op.patch(f"/v1/admin/tenants/{tenant_id}", json={"limits": {"cache": "exact"}})
        assert patched.status_code == 200, patched.text
        assert client.post("/v1/batches", json=body).json()["council"]["cache"] == "exact"
        assert "cache" not in client.post("/v1/batches", json={**body, "cache": "off"}).json()["council"]
        bad = client.post("/v1/batches", json={**body, "cache": "sometimes"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "cache"
