"""Council analytics against the truth the simulated provider is told (SPEC §13), through real API,
worker and scheduler processes and the simulator over HTTP.

The stack runs on a database of its own (its scheduler's jobs scan the whole database) with a
``providers.toml`` whose 1 s timeout lets injected hangs time out quickly.

Sizes, and why they suffice (each batch's queries give 3 reviews of 2 answers each):
- 500 queries (done-when 1): alpha, preferred in 80% of the reviews that show it, wins about 90%
  of its comparisons; 500 per pair puts the log-strength gap near 2.2 with intervals of about
  ±0.15, so the intervals are far apart. Each model makes about 1,000 calls, so an injected rate
  of 5% (3%) is measured with a standard error of 0.7 (0.55) points: 2 points is 2.9 (3.7) of
  them.
- 100 queries (done-when 2): 300 reviews. Biased in 30% of reviews, the first-shown answer is
  ranked first 0.3 + 0.7 × 1/2 = 65% of the time; the 95% interval is about ±5.4 points, so its
  lower end stays above 50% unless the observed rate falls 3.5 standard errors short. Unbiased,
  a 95% interval misses chance one time in twenty by construction, so that check asks for the
  99.9% interval (``confidence=0.999``): it fails one run in a thousand, whatever the size.
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

from shared.analytics.rollups import fold_finished
from shared.db import make_engine, make_sessionmaker
from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import migrated_database, new_key, settings_env
from tests.helpers import jsonl, poll, tagged_queries, wait_for_batch
from tests.leaks import remember_secret

pytestmark = pytest.mark.integration

COUNCIL = {"mode": "council", "members": ["sim:alpha", "sim:beta", "sim:gamma"], "chairman": "sim:chairman"}
NEUTRAL = {
    "latency_ms": 0,
    "latency_jitter_ms": 0,
    "error_rate": 0,
    "error_kinds": ["server"],
    "models": {},
    "messy_ranking_rate": 0,
    "preferred_models": {},
    "first_position_bias": 0,
}


class World:
    def __init__(self, stack: Stack, client: httpx.Client, sessions: Any, sim: SimServer):
        self.stack, self.client, self.sessions, self.sim = stack, client, sessions, sim

    def configure(self, **patch: Any) -> None:
        httpx.post(f"{self.sim.url}/_sim/config", json={**NEUTRAL, **patch}).raise_for_status()

    def run_batch(self, n: int, prefix: str) -> dict[str, Any]:
        body = {"queries": tagged_queries(n, prefix), "council": COUNCIL}
        response = self.client.post("/v1/batches", json=body)
        assert response.status_code == 202, response.text
        batch = wait_for_batch(self.client, response.json()["id"], timeout=600)
        assert batch["status"] == "completed", batch
        return batch

    def fold(self) -> None:
        # The scheduler's fold, run here at once: the batch is complete, so nothing is unsettled.
        fold_finished(self.sessions, settle_s=0)


@pytest.fixture(scope="module")
def world(
    settings: Settings, sim_server: SimServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("analytics")
    namespace = f"ctest-ana-{uuid.uuid4().hex[:8]}"
    providers = Path(tmp / "providers.toml")
    providers.write_text(
        f'[providers.sim]\napi = "openai"\nbase_url = "{sim_server.url}/v1"\n'
        'api_key_env = "SIM_API_KEY"\ntimeout_s = 1.0\nmax_concurrency = 512\n'
        + "".join(
            f'[models."sim:{m}"]\ninput_usd_per_mtok = {p}\noutput_usd_per_mtok = {2 * p}\n'
            for m, p in (("alpha", 1.0), ("beta", 1.0), ("gamma", 1.0), ("chairman", 5.0))
        )
        + '[council]\nmembers = ["sim:alpha", "sim:beta", "sim:gamma"]\nchairman = "sim:chairman"\n'
    )
    with migrated_database("analytics", tmp) as database_url:
        env = {
            **os.environ,
            **settings_env(settings),
            "CONCLAVE_DATABASE_URL": database_url,
            "CONCLAVE_PROVIDERS_FILE": str(providers),
            "CONCLAVE_QUEUE_NAMESPACE": namespace,
            "SIM_API_KEY": remember_secret("sk-sim-analytics"),
        }
        engine = make_engine(database_url, pool_size=4)
        sessions = make_sessionmaker(engine)
        stack = Stack(env=env, logs=tmp / "logs")
        stack.logs.mkdir()
        try:
            url = stack.start_api()
            stack.start_workers(processes=2, threads=32)
            stack.start_scheduler()
            key, _ = new_key(sessions, role="user")
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
                yield World(stack, client, sessions, sim_server)
        finally:
            httpx.post(f"{sim_server.url}/_sim/config", json=NEUTRAL).raise_for_status()
            stack.stop()
            engine.dispose()
            rdb = redis.Redis.from_url(settings.redis_url)
            stale = list(rdb.scan_iter(f"{namespace}:*"))
            if stale:
                rdb.delete(*stale)
            rdb.close()


def test_the_preferred_model_leads_with_a_separate_interval_and_fault_rates_are_measured(
    world: World,
) -> None:
    world.configure(
        preferred_models={"alpha": 0.8},
        models={
            "beta": {"error_rate": 0.05, "error_kinds": ["server"]},
            "gamma": {"error_rate": 0.03, "error_kinds": ["timeout"], "hang_s": 3},
        },
    )
    batch = world.run_batch(500, "lead")
    # The scheduler process folds it (settled 30 s after the last query ended).
    poll(
        lambda: world.client.get(f"/v1/batches/{batch['id']}/report").json()["queries_folded"] == 500,
        timeout=120,
        interval=1.0,
        what="the scheduler to fold the batch",
    )
    board = world.client.get("/v1/analytics/models").json()["data"]
    by_model = {row["model"]: row for row in board}
    first, second = board[0], board[1]
    assert first["model"] == "sim:alpha", [(r["model"], r["strength"]) for r in board]
    assert first["strength"]["ci_low"] > second["strength"]["ci_high"], (first, second)
    assert first["win_rate"] > 0.8 and first["mean_rank"] < 1.2
    assert by_model["sim:beta"]["error_rate"] == pytest.approx(0.05, abs=0.02)
    assert by_model["sim:beta"]["timeout_rate"] == 0
    assert by_model["sim:gamma"]["timeout_rate"] == pytest.approx(0.03, abs=0.02)
    assert by_model["sim:gamma"]["error_rate"] == by_model["sim:gamma"]["timeout_rate"]
    assert by_model["sim:alpha"]["error_rate"] == 0
    assert by_model["sim:alpha"]["answers"] == 500
    assert by_model["sim:alpha"]["cost_per_win_usd"] is not None
    # Succeeded calls of a 0 ms simulator are fast; a timed-out one is not among them.
    assert by_model["sim:gamma"]["latency_p95_ms"] < 1000

    # Feedback: one rating per key and query, credited to the model that wrote the answer.
    query_id = jsonl(world.client.get(f"/v1/batches/{batch['id']}/results"))[0]["query_id"]
    bad = world.client.post(f"/v1/queries/{query_id}/feedback", json={"rating": 6})
    assert bad.status_code == 422 and bad.json()["error"]["param"]
    for rating in (2, 4):
        stored = world.client.post(f"/v1/queries/{query_id}/feedback", json={"rating": rating})
        assert stored.status_code == 200, stored.text
    assert stored.json()["model"] == "sim:chairman"
    board = world.client.get("/v1/analytics/models").json()["data"]
    assert {r["model"]: r["feedback"] for r in board}["sim:chairman"] == {"count": 1, "mean": 4.0}
    assert world.client.post("/v1/queries/q_unknown/feedback", json={"rating": 3}).status_code == 404


def test_position_bias_is_told_apart_from_chance(world: World) -> None:
    world.configure(first_position_bias=0.3)
    biased = world.run_batch(100, "bias")
    world.configure()
    unbiased = world.run_batch(100, "fair")
    world.fold()

    report = world.client.get(f"/v1/batches/{biased['id']}/report").json()
    bias = report["position_bias"]
    assert bias["reviews"] == 300 and bias["chance"] == 0.5
    assert bias["interval"][0] > 0.5, bias
    assert bias["excludes_chance"] is True and bias["p_value"] < 0.05
    assert report["invalid_review_rate"] == 0
    assert report["synthesis"]["chairman"] == 100
    assert {s["stage"] for s in report["stages"]} == {"answer", "review", "synthesis"}
    assert len(report["slowest_queries"]) == 10
    assert report["agreement"]["queries"] == 100 and report["agreement"]["chance"] == 0.75

    fair = world.client.get(f"/v1/batches/{unbiased['id']}/report", params={"confidence": 0.999}).json()
    bias = fair["position_bias"]
    assert bias["reviews"] == 300
    assert bias["interval"][0] <= 0.5 <= bias["interval"][1], bias
    assert bias["excludes_chance"] is False

    other_key, _ = new_key(world.sessions)
    stranger = world.client.get(
        f"/v1/batches/{biased['id']}/report", headers={"Authorization": f"Bearer {other_key}"}
    )
    assert stranger.status_code == 404 and stranger.json()["error"]["type"]
    assert world.client.get(f"/v1/batches/{biased['id']}/report", params={"confidence": 2}).status_code == 422
