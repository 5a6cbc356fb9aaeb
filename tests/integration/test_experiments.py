"""A/B experiments over councils (SPEC §13, issue 17 done-when 3), through a real API and real
worker processes, and the simulated provider over HTTP.

Two councils that differ in price: ``budget`` (two members and a chairman at $1/$2 per Mtok)
and ``premium`` (two members at $1-$10 and a $10 chairman), split 30/70. Sizes, and why they
suffice: 400 queries give about 120 ``budget`` and 280 ``premium`` ones; the per-query costs
differ several times over with a small spread (the simulator's answers vary little in length),
so Welch's p is far below 0.05. The split is checked against the 99.9% interval of
Binomial(400, 0.3) (about 95-146): a correct assignment fails that one run in a thousand.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from scipy import stats

from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import jsonl, tagged_queries, wait_for_batch
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

PRICES = (("alpha", 1.0), ("beta", 1.0), ("gamma", 1.0), ("chairman", 1.0), ("opus", 10.0))
BUDGET = {"mode": "council", "members": ["sim:alpha", "sim:beta"], "chairman": "sim:chairman"}
PREMIUM = {"mode": "council", "members": ["sim:gamma", "sim:opus"], "chairman": "sim:opus"}
NEUTRAL = {
    "latency_ms": 0,
    "latency_jitter_ms": 0,
    "error_rate": 0,
    "error_kinds": ["server"],
    "models": {},
    "messy_ranking_rate": 0,
}


class World:
    def __init__(self, client: httpx.Client, sessions: Any):
        self.client, self.sessions = client, sessions

    def run_batch(self, queries: list[dict[str, Any]], experiment: str) -> list[dict[str, Any]]:
        response = self.client.post("/v1/batches", json={"queries": queries, "experiment": experiment})
        assert response.status_code == 202, response.text
        batch = wait_for_batch(self.client, response.json()["id"], timeout=300)
        assert batch["status"] == "completed", batch
        return jsonl(self.client.get(f"/v1/batches/{batch['id']}/results"))

    def create(self, name: str, weights: tuple[float, float], metric: str = "cost") -> dict[str, Any]:
        body = {
            "name": name,
            "metric": metric,
            "variants": [
                {"name": "budget", "council": BUDGET, "weight": weights[0]},
                {"name": "premium", "council": PREMIUM, "weight": weights[1]},
            ],
        }
        response = self.client.post("/v1/experiments", json=body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


@pytest.fixture(scope="module")
def world(
    settings: Settings, sessions: Any, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("experiments")
    # Its own queue namespace: only this stack's workers (with these prices) run its queries.
    namespace = f"ctest-exp-{uuid.uuid4().hex[:8]}"
    providers = Path(tmp / "providers.toml")
    providers.write_text(
        f'[providers.sim]\napi = "openai"\nbase_url = "{sim_server.url}/v1"\n'
        'api_key_env = "SIM_API_KEY"\nmax_concurrency = 512\n'
        + "".join(
            f'[models."sim:{m}"]\ninput_usd_per_mtok = {p}\noutput_usd_per_mtok = {2 * p}\n'
            for m, p in PRICES
        )
        + '[council]\nmembers = ["sim:alpha", "sim:beta", "sim:gamma"]\nchairman = "sim:chairman"\n'
    )
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_PROVIDERS_FILE": str(providers),
        "CONCLAVE_QUEUE_NAMESPACE": namespace,
        "SIM_API_KEY": remember_secret("sk-sim-experiments"),
    }
    httpx.post(f"{sim_server.url}/_sim/config", json=NEUTRAL).raise_for_status()
    stack = Stack(env=env, logs=tmp / "logs")
    stack.logs.mkdir()
    try:
        url = stack.start_api()
        stack.start_workers(processes=2, threads=32)
        key, _ = new_key(sessions, role="user")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            yield World(client, sessions)
    finally:
        stack.stop()
        rdb = redis.Redis.from_url(settings.redis_url)
        stale = list(rdb.scan_iter(f"{namespace}:*"))
        if stale:
            rdb.delete(*stale)
        rdb.close()


def variants_of(records: list[dict[str, Any]]) -> dict[str, str]:
    return {r["custom_id"]: r["experiment"]["variant"] for r in records}


def test_the_cheaper_council_wins_on_cost_assignment_is_stable_and_a_rollout_moves_everyone(
    world: World,
) -> None:
    name = f"councils-{uuid.uuid4().hex[:6]}"
    experiment = world.create(name, (30, 70))
    queries = tagged_queries(400, "exp")
    records = world.run_batch(queries, name)

    # Every record says which variant it ran, and that variant's council is what ran.
    assert len(records) == 400 and all(r["status"] == "succeeded" for r in records)
    for r in records:
        assert r["experiment"]["name"] == name
        council = BUDGET if r["experiment"]["variant"] == "budget" else PREMIUM
        assert sorted(m["model"] for m in r["members"]) == sorted(council["members"]), r
        assert r["chairman"] == council["chairman"] or r["chairman"]["model"] == council["chairman"]
    detail = world.client.get(f"/v1/queries/{records[0]['query_id']}").json()
    assert detail["experiment"] == records[0]["experiment"]

    # The split is what the weights say, within what chance allows.
    first = variants_of(records)
    n_budget = sum(v == "budget" for v in first.values())
    low, high = stats.binom.interval(0.999, 400, 0.3)
    assert low <= n_budget <= high, (n_budget, low, high)

    # The cheaper council wins on cost.
    report = world.client.get(f"/v1/experiments/{experiment['id']}").json()
    by_name = {v["name"]: v for v in report["variants"]}
    assert by_name["budget"]["n"] == n_budget and by_name["premium"]["n"] == 400 - n_budget
    assert by_name["budget"]["mean"] < by_name["premium"]["mean"]
    assert by_name["budget"]["interval"][1] < by_name["premium"]["interval"][0], by_name
    assert by_name["premium"]["p_value"] < 0.05, by_name
    assert report["winner"] == "budget" and report["best"] == "budget"
    print(
        f"\nexperiment: budget n={by_name['budget']['n']} mean=${by_name['budget']['mean']:.6f}"
        f" premium n={by_name['premium']['n']} mean=${by_name['premium']['mean']:.6f}"
        f" p={by_name['premium']['p_value']:.3g} intervals {by_name['budget']['interval']}"
        f" {by_name['premium']['interval']}; split 99.9% interval [{low:.0f}, {high:.0f}]"
    )

    # The same custom_ids in a new batch get the same variants.
    again = world.run_batch(queries[:100], name)
    assert variants_of(again) == {c: first[c] for c in variants_of(again)}

    # A rollout to 100%: every new query (and every old custom_id) goes to the winner.
    patched = world.client.patch(
        f"/v1/experiments/{experiment['id']}",
        json={"variants": [{"name": "budget", "weight": 100}, {"name": "premium", "weight": 0}]},
    )
    assert patched.status_code == 200, patched.text
    assert {v["name"]: v["share"] for v in patched.json()["variants"]} == {"budget": 1.0, "premium": 0.0}
    rolled = world.run_batch(tagged_queries(60, "new") + queries[:40], name)
    assert set(variants_of(rolled).values()) == {"budget"}


def test_experiments_are_checked_scoped_and_listed(world: World) -> None:
    client = world.client
    name = f"checks-{uuid.uuid4().hex[:6]}"
    created = world.create(name, (50, 50), metric="failure_rate")
    assert created["object"] == "experiment" and created["name"] == name
    assert [v["council"] for v in created["variants"]] == [BUDGET, PREMIUM]

    def refused(method: str, path: str, body: Any, status: int, param: str | None) -> None:
        response = client.request(method, path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"type", "message", "param"}
        assert error["param"] == param, error

    good = {"name": "v", "council": BUDGET, "weight": 1}
    refused(
        "POST", "/v1/experiments", {"name": "x" + name, "metric": "cost", "variants": []}, 422, "variants"
    )
    body = {"name": name, "metric": "cost", "variants": [good, {**good, "name": "w"}]}
    refused("POST", "/v1/experiments", body, 409, "name")
    body = {"name": "x" + name, "metric": "cost", "variants": [good, good]}
    refused("POST", "/v1/experiments", body, 422, "variants[1].name")
    bad_model = {**good, "name": "w", "council": {"members": ["nosuch:model"]}}
    body = {"name": "x" + name, "metric": "cost", "variants": [good, bad_model]}
    refused("POST", "/v1/experiments", body, 422, "variants[1].council.members[0]")
    body = {
        "name": "x" + name,
        "metric": "cost",
        "variants": [{**good, "weight": 0}, {**good, "name": "w", "weight": 0}],
    }
    refused("POST", "/v1/experiments", body, 422, "variants")
    body = {"name": "x" + name, "metric": "speed", "variants": [good, {**good, "name": "w"}]}
    refused("POST", "/v1/experiments", body, 422, "metric")

    path = f"/v1/experiments/{created['id']}"
    refused("PATCH", path, {"variants": [{"name": "nosuch", "weight": 1}]}, 422, "variants[0].name")
    refused(
        "PATCH",
        path,
        {"variants": [{"name": "budget", "weight": 0}, {"name": "premium", "weight": 0}]},
        422,
        "variants",
    )
    refused("PATCH", path, {"variants": [{"name": "budget", "weight": -1}]}, 422, "variants[0].weight")

    one = [{"custom_id": "a", "prompt": "hi"}]
    refused("POST", "/v1/batches", {"queries": one, "experiment": "nosuch"}, 422, "experiment")
    refused("POST", "/v1/batches", {"queries": one, "experiment": name, "council": BUDGET}, 422, "council")

    # Before any query: no n, no winner.
    report = client.get(path).json()
    assert report["winner"] is None and [v["n"] for v in report["variants"]] == [0, 0]
    listed = client.get("/v1/experiments", params={"limit": 100}).json()
    assert created["id"] in {e["id"] for e in listed["data"]}

    # Another tenant sees none of it, and may use the same name; a viewer reads but cannot write.
    other_key, _ = new_key(world.sessions)
    other = {"Authorization": f"Bearer {other_key}"}
    assert client.get(path, headers=other).status_code == 404
    assert (
        client.patch(path, json={"variants": [{"name": "budget", "weight": 1}]}, headers=other).status_code
        == 404
    )
    assert created["id"] not in {e["id"] for e in client.get("/v1/experiments", headers=other).json()["data"]}
    refused_batch = client.post("/v1/batches", json={"queries": one, "experiment": name}, headers=other)
    assert refused_batch.status_code == 422 and refused_batch.json()["error"]["param"] == "experiment"
    same_name = {**body, "name": name, "metric": "cost"}
    assert client.post("/v1/experiments", json=same_name, headers=other).status_code == 201
    viewer_key, _ = new_key(world.sessions, role="viewer")
    viewer = {"Authorization": f"Bearer {viewer_key}"}
    assert (
        client.post("/v1/experiments", json={**same_name, "name": "y" + name}, headers=viewer).status_code
        == 403
    )
