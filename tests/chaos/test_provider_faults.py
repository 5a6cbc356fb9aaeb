"""Chaos: the provider misbehaves through a whole batch, and goes down completely for a while.

The simulated provider answers a share of calls with HTTP 500, 503 (overloaded), 429 with a
``retry-after``, or hangs past the client's 1 s timeout; a third of the way through, every call
fails until the circuit breaker has opened. Queries may fail or lose council members, but each
is terminal exactly once and the ledger holds every call that reached the provider.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from sqlalchemy import select
from sqlmodel import col

from shared.models import ProviderCall, Query
from shared.sim import SimServer
from tests.chaos.conftest import QUERIES, TEST_TIMEOUT, Launch, set_sim, sim_requests
from tests.chaos.invariants import check_batch
from tests.helpers import poll, sim_log, tagged_queries
from tests.leaks import remember_secret

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(TEST_TIMEOUT)]

FAULT_MIX = {
    "error_rate": 0.3,
    "error_kinds": ["server", "server", "rate_limited", "rate_limited", "overloaded", "timeout"],
    "hang_s": 2.0,
    "retry_after_s": 1.0,
}
OUTAGE = {"error_rate": 1.0, "error_kinds": ["server", "overloaded"]}


def providers_toml(sim_url: str) -> str:
    return f"""
[providers.sim]
api = "openai"
base_url = "{sim_url}/v1"
api_key_env = "SIM_API_KEY"
timeout_s = 1.0
max_concurrency = 512
breaker_cooldown_s = 2

[council]
members = ["sim:alpha", "sim:beta", "sim:gamma"]
chairman = "sim:chairman"
"""


def test_provider_faults_leave_every_query_terminal_once(launch: Launch, sim: SimServer) -> None:
    chaos = launch(
        pools=2,
        processes=1,
        threads=64,
        providers_toml=providers_toml(sim.url),
        env={"SIM_API_KEY": remember_secret("sk-sim-chaos")},
    )
    set_sim(sim, latency_ms=20, latency_jitter_ms=10, seed=7, **FAULT_MIX)
    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix="fault")}
    ).json()["id"]

    def done(fraction: float) -> bool:
        c = chaos.client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        return c["completed"] + c["failed"] >= QUERIES * fraction

    poll(lambda: done(1 / 3), timeout=240, what="a third of the batch")
    # The provider fails every call until the shared circuit breaker opens.
    before = sim_requests(sim)
    outage_started = time.monotonic()
    outage_wall = int(time.time())
    set_sim(sim, **OUTAGE)
    breaker = f"{chaos.namespace}:breaker:sim"
    poll(
        lambda: chaos.redis.hget(breaker, "state") == b"open" or done(1.0),
        timeout=60,
        interval=0.05,
        what="the circuit to open",
    )
    set_sim(sim, **FAULT_MIX)
    outage = (time.monotonic() - outage_started, sim_requests(sim) - before)
    figures = check_batch(chaos, sim, batch_id, "fault", started=started, all_succeed=False)
    set_sim(sim, error_rate=0)

    with chaos.sessions() as session:
        calls = session.execute(
            select(
                col(ProviderCall.status), col(ProviderCall.error_category), col(ProviderCall.created_at)
            ).where(col(ProviderCall.batch_id) == batch_id)
        ).all()
    # The fault mix alone (30% of calls failing, fast) never opened the circuit: only the outage did.
    early_refusals = [
        c for c in calls if c.error_category == "circuit_open" and c.created_at < outage_wall - 1
    ]
    assert early_refusals == [], f"{len(early_refusals)} calls refused by an open circuit before the outage"
    # A query refused by the open circuit was handed back to wait out the cooldown, not failed:
    # with hours left in its window, none fails for the circuit.
    with chaos.sessions() as session:
        refused = set(
            session.scalars(
                select(col(ProviderCall.query_id)).where(
                    col(ProviderCall.batch_id) == batch_id, col(ProviderCall.error_category) == "circuit_open"
                )
            )
        )
        failed_errors: dict[str, dict[str, str] | None] = dict(
            session.execute(
                select(col(Query.id), col(Query.error)).where(
                    col(Query.batch_id) == batch_id, col(Query.status) == "failed"
                )
            ).all()
        )
    gave_up = {q: e for q, e in failed_errors.items() if q in refused and e and e["type"] == "circuit_open"}
    assert gave_up == {}, f"failed behind an open circuit without waiting it out: {gave_up}"
    requeued = sum(1 for a, n in figures.attempts.items() if a > 1 for _ in range(n))
    categories = Counter(c.error_category for c in calls if c.status == "failed")
    # The outage opened the circuit: calls refused without reaching the provider.
    assert {"server", "overloaded", "rate_limited", "timeout", "circuit_open"} <= set(categories), categories
    # Every call that reached the provider is in the ledger once; refused by the open circuit, it never left.
    reached = sum(1 for c in calls if c.error_category != "circuit_open")
    requests = sum(1 for r in sim_log(sim.url) if "[tag:fault-" in r["text"])
    assert reached == requests, (reached, requests)
    assert chaos.broken() is None
    assert figures.batch["request_counts"]["completed"] > 0, figures.line()
    errors = Counter(r["error"]["type"] for r in figures.records if r["status"] == "failed")
    line = figures.line(
        provider_calls=requests,
        outage=f"{outage[0]:.1f}s/{outage[1]}calls",
        faults=dict(categories.most_common()),
        errors=dict(errors),
        requeued_behind_open_circuit=requeued,
    )
    print(f"\nchaos provider-faults: {line}")
