"""/metrics as Prometheus reads it: every metric SPEC §9 names, with values that move as a batch
runs on the real workers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.sim import SimServer
from shared.stack import Stack
from tests.helpers import poll, tagged_queries, wait_for_batch

pytestmark = pytest.mark.integration

NAMES = {
    "conclave_queue_depth",
    "conclave_queries_in_flight",
    "conclave_batches",
    "conclave_provider_call_duration_seconds",
    "conclave_provider_call_errors",
    "conclave_tokens",
    "conclave_cost_usd",
    "conclave_webhook_deliveries",
    "conclave_rate_limit_rejections",
}


def scrape(stack: Stack) -> dict[str, Any]:
    response = httpx.get(f"{stack.api_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in families.values():
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return {"families": families, "samples": samples}


def value(scraped: dict[str, Any], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in scraped["samples"].items()
        if n == name and all((k, labels[k]) in ls for k in labels)
    )


def test_metrics_name_every_spec_metric_and_move_with_a_batch(
    stack: Stack, client: httpx.Client, sim: SimServer
) -> None:
    before = scrape(stack)
    missing = NAMES - set(before["families"])
    assert not missing, missing
    assert {"high", "normal", "low"} <= {
        ls[0][1] for (n, ls) in before["samples"] if n == "conclave_queue_depth"
    }

    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 100}).raise_for_status()
    n = 300
    batch_id = client.post("/v1/batches", json={"queries": tagged_queries(n, prefix="metrics")}).json()["id"]

    # The gauge counts the whole database's running queries, which other tests share (some leave a
    # query held by a worker that never comes back): this batch's are what it adds.
    idle = value(before, "conclave_queries_in_flight")

    def busy() -> dict[str, Any] | None:
        s = scrape(stack)
        return s if value(s, "conclave_queries_in_flight") > idle else None

    during = poll(busy, timeout=30, interval=0.1, what="queries in flight")
    assert value(during, "conclave_batches", status="in_progress") >= 1
    wait_for_batch(client, batch_id, timeout=120)

    def settled() -> dict[str, Any] | None:
        s = scrape(stack)
        done = value(s, "conclave_provider_call_duration_seconds_count") - value(
            before, "conclave_provider_call_duration_seconds_count"
        )
        return s if done >= 7 * n else None

    after = poll(settled, timeout=30, interval=0.5, what="worker metrics to arrive")
    assert value(after, "conclave_tokens_total", direction="input") > value(
        before, "conclave_tokens_total", direction="input"
    )
    assert value(after, "conclave_batches", status="completed") >= 1
    assert value(after, "conclave_queries_in_flight") == idle
    # Histogram buckets are cumulative and end at the count.
    count = value(after, "conclave_provider_call_duration_seconds_count", model="sim:alpha")
    inf = value(after, "conclave_provider_call_duration_seconds_bucket", model="sim:alpha", le="+Inf")
    assert count == inf > 0
    assert (
        value(after, "conclave_provider_call_duration_seconds_bucket", model="sim:alpha", le="0.05") < count
    )
