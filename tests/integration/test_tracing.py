"""One trace from POST /v1/batches through the queue to every provider call, across the real
API and worker processes (spans written by each process to its own JSON-lines file)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from shared.sim import SimServer
from shared.stack import Stack
from tests.conftest import new_key, settings_env
from tests.helpers import poll, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration


def spans(trace_file: Path) -> list[dict[str, Any]]:
    found = []
    for path in trace_file.parent.glob(trace_file.name + ".*"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def test_one_trace_from_request_to_every_provider_call(
    settings: Settings, sessions: Any, sim: SimServer, tmp_path: Path
) -> None:
    trace_file = tmp_path / "spans.jsonl"
    env = {
        **os.environ,
        **settings_env(settings),
        "CONCLAVE_QUEUE_NAMESPACE": f"ctest-trace-{uuid.uuid4().hex[:8]}",
        "CONCLAVE_TRACE_FILE": str(trace_file),
    }
    httpx.post(
        f"{sim.url}/_sim/config",
        json={"models": {"gamma": {"error_rate": 1.0, "error_kinds": ["invalid_request"]}}},
    )
    stack = Stack(env=env, logs=tmp_path / "logs")
    stack.logs.mkdir()
    try:
        url = stack.start_api()
        stack.start_workers(processes=1, threads=8)
        key, _ = new_key(sessions)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            batch_id = client.post("/v1/batches", json={"queries": tagged_queries(3, prefix="tr")}).json()[
                "id"
            ]
            assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"
    finally:
        stack.stop()

    def complete() -> list[dict[str, Any]] | None:
        found = spans(trace_file)
        return found if sum(1 for s in found if s["name"] == "query") >= 3 else None

    found = poll(complete, timeout=20)
    [request] = [
        s
        for s in found
        if s["name"] == "POST /v1/batches" and s["attributes"].get("conclave.batch_id") == batch_id
    ]
    trace_id = request["context"]["trace_id"]
    in_trace = [s for s in found if s["context"]["trace_id"] == trace_id]
    queries = [s for s in in_trace if s["name"] == "query"]
    assert len(queries) == 3
    assert all(q["parent_id"] == request["context"]["span_id"] for q in queries)
    assert {q["resource"]["attributes"]["service.name"] for q in queries} == {"conclave-worker"}
    stages = [s for s in in_trace if s["name"].startswith("stage ")]
    assert {s["name"] for s in stages} == {"stage answer", "stage review", "stage synthesis"}
    calls = [s for s in in_trace if s["name"].startswith("provider ")]
    # Per query: 3 answers (gamma fails), 2 reviews, 1 synthesis.
    assert len(calls) == 3 * 6
    for call in calls:
        attrs = call["attributes"]
        assert attrs["conclave.provider"] == "sim" and attrs["conclave.model"].startswith("sim:")
        assert "conclave.input_tokens" in attrs and "conclave.cost_usd" in attrs
    failed = [c for c in calls if c["attributes"]["conclave.model"] == "sim:gamma"]
    assert failed and all(c["attributes"]["conclave.error_category"] == "invalid_request" for c in failed)
    ok = [c for c in calls if c["attributes"]["conclave.status"] == "succeeded"]
    assert all(c["attributes"]["conclave.input_tokens"] > 0 for c in ok)
