"""Members whose provider is down, against real worker processes and the simulated provider:
a member answered by its fallback (itself a member) is reported as who answered and never
judges its own answer; queries behind an open circuit wait for the provider for as long as
their window allows (SPEC §5.2, §18).

Each test starts its own API and workers with its own ``providers.toml`` and Redis namespace.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared.providers.breaker import read_circuit
from shared.settings import Settings
from shared.sim import SimConfig, SimServer
from shared.stack import Stack, free_port
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, poll, tagged_queries, wait_for_batch
from tests.integration.test_resilience import RefusingServer, sim_provider
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

StackFactory = Callable[[str], tuple[httpx.Client, str]]


@pytest.fixture
def make_stack(settings: Settings, sessions: Any, tmp_path: Path) -> Iterator[StackFactory]:
    """Start an API and two worker processes with the given providers.toml in a fresh namespace;
    returns a client with a fresh key, and the namespace."""
    started: list[tuple[Stack, httpx.Client, str]] = []

    def start(providers_toml: str) -> tuple[httpx.Client, str]:
        namespace = f"ctest-out-{uuid.uuid4().hex[:8]}"
        providers = tmp_path / f"providers-{namespace}.toml"
        providers.write_text(providers_toml)
        env = {
            **os.environ,
            **settings_env(settings),
            "CONCLAVE_PROVIDERS_FILE": str(providers),
            "CONCLAVE_QUEUE_NAMESPACE": namespace,
            "SIM_API_KEY": remember_secret("sk-sim-test"),
        }
        stack = Stack(env=env, logs=tmp_path / f"logs-{namespace}")
        stack.logs.mkdir()
        url = stack.start_api()
        stack.start_workers(processes=2, threads=16)
        key, _ = new_key(sessions)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        started.append((stack, client, namespace))
        return client, namespace

    yield start
    rdb = redis.Redis.from_url(settings.redis_url)
    for stack, client, namespace in started:
        client.close()
        stack.stop()
        keys = list(rdb.scan_iter(f"{namespace}:*"))
        if keys:
            rdb.delete(*keys)
    rdb.close()


def test_a_member_answered_by_a_fellow_member_is_reported_so_and_never_reviews_itself(
    make_stack: StackFactory, sim: SimServer
) -> None:
    # As in deploy/providers.toml: a member falls back to another member.
    toml = (
        sim_provider("p1", sim.url)
        + f"""
[providers.down]
api = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
api_key_env = "SIM_API_KEY"
timeout_s = 2

[models."down:alpha"]
fallbacks = ["p1:beta"]

[council]
members = ["down:alpha", "p1:beta", "p1:gamma"]
chairman = "p1:chairman"
"""
    )
    client, _ = make_stack(toml)
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(6, prefix="fb")}).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=120)["request_counts"]["completed"] == 6

    records = jsonl(client.get(f"/v1/batches/{batch_id}/results", params={"include": "stages"}))
    assert len(records) == 6
    for record in records:
        assert record["status"] == "succeeded"
        assert [(m["model"], m["requested_model"], m["status"]) for m in record["members"]] == [
            ("p1:beta", "down:alpha", "succeeded"),
            ("p1:beta", "p1:beta", "succeeded"),
            ("p1:gamma", "p1:gamma", "succeeded"),
        ]
        # beta wrote two answers: it is ranked once, and no reviewer saw an answer of its own.
        reviews = record["stages"]["reviews"]
        assert sorted(r["reviewer"] for r in reviews) == ["p1:beta", "p1:gamma"]
        for review in reviews:
            assert review["status"] == "valid"
            assert review["reviewer"] not in review["labels"].values()
        assert {(e["model"], e["votes"]) for e in record["aggregate_ranking"]} == {
            ("p1:beta", 1),
            ("p1:gamma", 1),
        }

    detail = client.get(f"/v1/queries/{records[0]['query_id']}").json()
    assert detail["members"][0]["model"] == "p1:beta"
    assert detail["members"][0]["requested_model"] == "down:alpha"


def test_a_simple_auto_query_goes_to_the_cheapest_healthy_member(
    make_stack: StackFactory, sim: SimServer, settings: Settings
) -> None:
    toml = (
        sim_provider("p1", sim.url)
        + f"""
[providers.down]
api = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
api_key_env = "SIM_API_KEY"
timeout_s = 2
breaker_failures = 3
breaker_cooldown_s = 300

[models."down:cheap"]
input_usd_per_mtok = 0.1
output_usd_per_mtok = 0.1
[models."p1:beta"]
input_usd_per_mtok = 1.0
output_usd_per_mtok = 1.0
[models."p1:gamma"]
input_usd_per_mtok = 5.0
output_usd_per_mtok = 5.0

[council]
members = ["down:cheap", "p1:beta", "p1:gamma"]
chairman = "p1:chairman"
"""
    )
    client, namespace = make_stack(toml)
    rdb = redis.Redis.from_url(settings.redis_url)
    try:
        # A council batch finds the cheapest member's provider down and opens its circuit.
        first = client.post("/v1/batches", json={"queries": tagged_queries(10, prefix="trip")}).json()["id"]
        poll(
            lambda: read_circuit(rdb, namespace, "down", time.time()).state == "open",
            timeout=60,
            what="the circuit of provider down to open",
        )
        wait_for_batch(client, first, timeout=120)

        body = {"queries": tagged_queries(5, prefix="auto"), "council": {"mode": "auto"}}
        batch_id = client.post("/v1/batches", json=body).json()["id"]
        final = wait_for_batch(client, batch_id, timeout=120)
    finally:
        rdb.close()

    records = jsonl(client.get(f"/v1/batches/{batch_id}/results", params={"include": "stages"}))
    assert final["request_counts"]["completed"] == 5, [r["error"] for r in records]
    for record in records:
        routing = record["stages"]["routing"]
        assert (routing["mode"], routing["members"]) == ("single", ["p1:beta"])
        assert routing["reason"].endswith("cheapest healthy member p1:beta (circuit open: down:cheap)")
        assert [m["model"] for m in record["members"]] == ["p1:beta"]


# The old policy gave up after four waits of 2, 4, 8 and 16 s (+0-50%): 34-49 s in all. With a
# 1 s breaker cooldown (doubling to 16 s) the probes fall 1, 3, 7, 15, 31 and 47 s after the
# circuit opens; a provider back 46 s after the batch arrives is found by the probe at ~47 s.
OUTAGE_S = 46


def test_queries_behind_an_open_circuit_wait_for_the_provider_longer_than_four_waits(
    make_stack: StackFactory, sim: SimServer
) -> None:
    down = RefusingServer()
    toml = (
        sim_provider("p1", sim.url)
        + f"""
[providers.p2]
api = "openai"
base_url = "http://127.0.0.1:{down.port}/v1"
api_key_env = "SIM_API_KEY"
timeout_s = 2
breaker_failures = 3
breaker_cooldown_s = 1

[council]
members = ["p1:alpha", "p2:beta"]
chairman = "p1:chairman"
"""
    )
    try:
        client, _ = make_stack(toml)
        # Two members, two answers needed: while p2 is down every query fails behind its circuit.
        submitted = time.monotonic()
        batch_id = client.post("/v1/batches", json={"queries": tagged_queries(20, prefix="lo")}).json()["id"]

        def outage_over() -> bool:
            # While the provider is down, queries wait for it: none fails.
            counts = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
            assert counts["failed"] == 0, f"{counts} after {time.monotonic() - submitted:.0f} s of outage"
            return time.monotonic() - submitted > OUTAGE_S

        poll(outage_over, timeout=OUTAGE_S + 10, interval=1.0, what="the outage to end")
        port = down.port
        down.stop()
        with SimServer(SimConfig(), port=port):
            final = wait_for_batch(client, batch_id, timeout=60)
            records = jsonl(client.get(f"/v1/batches/{batch_id}/results"))
            runs = [client.get(f"/v1/queries/{r['query_id']}").json()["attempts"] for r in records]
    finally:
        down.stop()

    assert final["request_counts"]["completed"] == 20, [r["error"] for r in records if r["error"]][:3]
    assert all(r["status"] == "succeeded" for r in records)
    # Every query waited out the outage, more times than the old policy's four waits.
    assert max(runs) > 5, runs
