"""Prometheus metrics for the whole deployment (SPEC §9), scraped from any API process.

Counters and histograms are produced in many processes (workers make the provider calls, the
scheduler delivers webhooks, every API replica rejects over-limit requests). Each process
buffers its increments in memory and adds them to one Redis hash at most once a second
(``MetricsBuffer``); ``/metrics`` renders that hash together with gauges read at scrape time
(queue depths from Redis, batches and in-flight queries from the database). One scrape of one
API replica therefore sees the deployment, whatever the number of processes and machines.

Metric names and meanings are listed in the README.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from shared import keys

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SEP = "\x1f"  # separates name and label values in a hash field; never in a label value we emit


def _field(name: str, *labels: str) -> str:
    return SEP.join((name, *labels))


class MetricsBuffer:
    """Per-process increments, flushed to ``{ns}:metrics`` in one pipeline."""

    def __init__(self, client: redis.Redis, namespace: str, flush_s: float = 1.0):
        self.client = client
        self.key = keys.metrics(namespace)
        self.flush_s = flush_s
        self._pending: dict[str, float] = defaultdict(float)
        self._minutes: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.namespace = namespace

    def inc(self, name: str, *labels: str, value: float = 1.0) -> None:
        with self._lock:
            self._pending[_field(name, *labels)] += value
        self._maybe_flush()

    def count_minute(self, name: str, n: int = 1) -> None:
        """Per-minute counts (kept an hour), for "throughput over the last minutes"."""
        with self._lock:
            self._minutes[keys.minute_counter(self.namespace, name, int(time.time() // 60))] += n
        self._maybe_flush()

    def observe_latency(self, provider: str, model: str, seconds: float) -> None:
        with self._lock:
            for le in LATENCY_BUCKETS:
                if seconds <= le:
                    self._pending[_field("provider_call_bucket", provider, model, repr(le))] += 1
            self._pending[_field("provider_call_count", provider, model)] += 1
            self._pending[_field("provider_call_sum", provider, model)] += seconds
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(float)
            minutes, self._minutes = self._minutes, defaultdict(int)
            self._last = time.monotonic()
        if not pending and not minutes:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for field, value in pending.items():
                pipe.hincrbyfloat(self.key, field, value)
            for key, n in minutes.items():
                pipe.incrby(key, n)
                pipe.expire(key, 3600)
            pipe.execute()
        except redis.RedisError:
            # Metrics must never break work; these increments are lost, and the ledger still has them.
            pass


class DeploymentCollector(Collector):
    """Renders the shared hash and the scrape-time gauges."""

    def __init__(self, client: redis.Redis, namespace: str, gauges: Any):
        self.client = client
        self.namespace = namespace
        self.gauges = gauges  # callable → dict with queue_depth, batches, in_flight

    def collect(self) -> Iterator[Metric]:
        try:
            raw = self.client.hgetall(keys.metrics(self.namespace))
        except redis.RedisError:
            raw = {}
        values: dict[tuple[str, ...], float] = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            values[tuple(key.split(SEP))] = float(v)
        yield from self._gauges()
        yield from self._latency(values)
        yield from _counters(values)

    def _gauges(self) -> Iterator[Metric]:
        snapshot = self.gauges()
        depth = GaugeMetricFamily(
            "conclave_queue_depth", "Messages waiting per priority queue", labels=["queue"]
        )
        for queue, n in snapshot["queue_depth"].items():
            depth.add_metric([queue], n)
        yield depth
        in_flight = GaugeMetricFamily("conclave_queries_in_flight", "Queries running on workers now")
        in_flight.add_metric([], snapshot["in_flight"])
        yield in_flight
        batches = GaugeMetricFamily("conclave_batches", "Batches by status", labels=["status"])
        for status, n in snapshot["batches"].items():
            batches.add_metric([status], n)
        yield batches

    @staticmethod
    def _latency(values: dict[tuple[str, ...], float]) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "conclave_provider_call_duration_seconds",
            "Provider call latency, every attempt",
            labels=["provider", "model"],
        )
        series = {k[1:3] for k in values if k[0] == "provider_call_count"}
        for provider, model in sorted(series):
            buckets = [
                (repr(le), values.get(("provider_call_bucket", provider, model, repr(le)), 0.0))
                for le in LATENCY_BUCKETS
            ]
            count = values.get(("provider_call_count", provider, model), 0.0)
            buckets.append(("+Inf", count))
            family.add_metric(
                [provider, model], buckets, values.get(("provider_call_sum", provider, model), 0.0)
            )
        yield family


COUNTERS = {
    "provider_call_errors": (
        "conclave_provider_call_errors",
        "Failed provider calls by error category",
        ["provider", "category"],
    ),
    "tokens": (
        "conclave_tokens",
        "Tokens used, by direction (input/output)",
        ["provider", "model", "direction"],
    ),
    "cost_usd": ("conclave_cost_usd", "Cost of provider calls in USD", ["provider", "model"]),
    "cache_hits": (
        "conclave_cache_hits",
        "Calls answered from the exact cache instead of a provider (SPEC §14)",
        ["provider", "model", "stage"],
    ),
    "queries_finished": ("conclave_queries_finished", "Queries finished by outcome", ["status"]),
    "webhook_deliveries": (
        "conclave_webhook_deliveries",
        "Webhook delivery attempts by outcome",
        ["outcome"],
    ),
    "rate_limit_rejections": (
        "conclave_rate_limit_rejections",
        "Requests refused by a rate limit",
        ["scope"],
    ),
}


def _counters(values: dict[tuple[str, ...], float]) -> Iterable[Metric]:
    for name, (metric, doc, labels) in COUNTERS.items():
        family = CounterMetricFamily(metric, doc, labels=labels)
        for key, value in sorted(values.items()):
            if key[0] == name and len(key) == len(labels) + 1:
                family.add_metric(list(key[1:]), value)
        yield family


def render(collector: DeploymentCollector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def recent_counts(client: redis.Redis, namespace: str, name: str, minutes: int = 15) -> list[int]:
    """Counts of the last ``minutes`` whole minutes, oldest first (the current minute excluded)."""
    now = int(time.time() // 60)
    counters = [keys.minute_counter(namespace, name, m) for m in range(now - minutes, now)]
    return [int(v or 0) for v in client.mget(counters)]
