"""A batch through the real system: API process, two dramatiq worker processes, real Redis,
the simulated provider over HTTP, and the database as the truth."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from shared.sim import SimServer
from tests.helpers import counts_add_up, jsonl, poll, sim_log, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration


def set_sim(sim: SimServer, **config: object) -> None:
    httpx.post(f"{sim.url}/_sim/config", json=config).raise_for_status()


def test_thousand_query_council_batch_completes_with_full_records(
    client: httpx.Client, sim: SimServer
) -> None:
    set_sim(sim, latency_ms=50)
    created = client.post("/v1/batches", json={"queries": tagged_queries(1000)})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["object"] == "batch" and batch["endpoint"] == "/v1/council"
    assert batch["request_counts"]["total"] == 1000
    assert batch["council"]["members"] == ["sim:alpha", "sim:beta", "sim:gamma"]

    polls: list[dict] = []

    def record(b: dict) -> None:
        polls.append(b["request_counts"])
        assert counts_add_up(b), b["request_counts"]

    final = wait_for_batch(client, batch["id"], timeout=240, on_poll=record)
    assert final["status"] == "completed"
    assert final["request_counts"]["completed"] == 1000
    assert final["completed_at"] >= final["in_progress_at"] >= final["created_at"]
    assert final["usage"]["total_tokens"] > 0
    assert len(polls) >= 2

    records = jsonl(client.get(f"/v1/batches/{batch['id']}/results"))
    assert len(records) == 1000
    assert len({r["custom_id"] for r in records}) == 1000
    for r in records:
        assert r["status"] == "succeeded"
        assert r["synthesis"] == "chairman"
        assert r["answer"] and r["answer"].startswith("[simulated chairman] Council synthesis for: [tag:q-")
        assert [m["model"] for m in r["members"]] == ["sim:alpha", "sim:beta", "sim:gamma"]
        assert all(m["status"] == "succeeded" and m["error"] is None for m in r["members"])
        ranking = r["aggregate_ranking"]
        assert sorted(e["model"] for e in ranking) == ["sim:alpha", "sim:beta", "sim:gamma"]
        # Three reviewers, each ranking the two others: six votes in all.
        assert sum(e["votes"] for e in ranking) == 6
        assert all(1 <= e["mean_rank"] <= 2 for e in ranking)

    # The CSV holds the same records.
    rows = list(csv.DictReader(io.StringIO(client.get(f"/v1/batches/{batch['id']}/results?format=csv").text)))
    assert len(rows) == 1000 and {row["synthesis"] for row in rows} == {"chairman"}

    # One query in detail: every stage and every provider call (3 answers, 3 reviews, 1 synthesis).
    detail = client.get(f"/v1/queries/{records[0]['query_id']}").json()
    stages = sorted(c["stage"] for c in detail["provider_calls"])
    assert stages == ["answer"] * 3 + ["review"] * 3 + ["synthesis"]
    assert len(detail["stages"]["reviews"]) == 3


def test_cancel_running_batch_stops_provider_calls_for_cancelled_queries(
    client: httpx.Client, sim: SimServer
) -> None:
    set_sim(sim, latency_ms=50)
    created = client.post(
        "/v1/batches", json={"queries": tagged_queries(5000, prefix="c"), "priority": "normal"}
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]

    def some_done() -> bool:
        c = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        return c["completed"] >= 50

    poll(some_done, timeout=120, what="the batch to be under way")
    cancelled = client.post(f"/v1/batches/{batch_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] in ("cancelling", "cancelled")

    final = wait_for_batch(client, batch_id, timeout=120, on_poll=lambda b: None)
    assert final["status"] == "cancelled"
    assert final["cancelled_at"] and final["cancelling_at"]
    counts = final["request_counts"]
    assert counts_add_up(final)
    assert counts["queued"] == 0 and counts["running"] == 0
    assert counts["cancelled"] > 0 and counts["completed"] >= 50

    cancelled_ids = {
        r["custom_id"]
        for r in jsonl(client.get(f"/v1/batches/{batch_id}/results", params={"status": "cancelled"}))
    }
    assert len(cancelled_ids) == counts["cancelled"]
    # No provider ever heard of a cancelled query.
    called = "\n".join(rec["text"] for rec in sim_log(sim.url))
    leaked = [cid for cid in cancelled_ids if f"[tag:c-{int(cid.split('-')[1]):06d}]" in called]
    assert leaked == []
    # ... while the ones that ran did reach it.
    assert "[tag:c-000000]" in called

    again = client.post(f"/v1/batches/{batch_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_results_are_partial_while_the_batch_runs(client: httpx.Client, sim: SimServer) -> None:
    set_sim(sim, latency_ms=100)
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(400, prefix="p")}).json()["id"]

    def partial() -> list | None:
        records = jsonl(client.get(f"/v1/batches/{batch_id}/results"))
        return records if 0 < len(records) < 400 else None

    records = poll(partial, timeout=60, interval=0.1, what="partial results")
    assert all(r["status"] == "succeeded" for r in records)
    final = wait_for_batch(client, batch_id, timeout=120)
    assert final["status"] == "completed"
    assert len(jsonl(client.get(f"/v1/batches/{batch_id}/results"))) == 400


def test_failing_member_is_recorded_and_the_council_goes_on(client: httpx.Client, sim: SimServer) -> None:
    set_sim(sim, models={"gamma": {"error_rate": 1.0, "error_kinds": ["invalid_request"]}})
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(20, prefix="f")}).json()["id"]
    final = wait_for_batch(client, batch_id, timeout=60)
    assert final["status"] == "completed" and final["request_counts"]["completed"] == 20
    for r in jsonl(client.get(f"/v1/batches/{batch_id}/results")):
        gamma = next(m for m in r["members"] if m["model"] == "sim:gamma")
        assert gamma["status"] == "failed" and gamma["error"]["type"] == "invalid_request"
        votes = {e["model"]: e["votes"] for e in r["aggregate_ranking"]}
        assert votes == {"sim:alpha": 1, "sim:beta": 1, "sim:gamma": 0}
        assert r["synthesis"] == "chairman"


def test_single_mode_uses_first_member_only(client: httpx.Client, sim: SimServer) -> None:
    body = {"queries": tagged_queries(5, prefix="s"), "council": {"mode": "single", "members": ["sim:beta"]}}
    batch_id = client.post("/v1/batches", json=body).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"
    for r in jsonl(client.get(f"/v1/batches/{batch_id}/results")):
        assert r["synthesis"] == "single"
        assert r["answer"].startswith("[simulated beta]")
