"""``/v1/admin/*`` (admins of the operator tenant): queues and workers, provider health."""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import OperatorDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.ledger import LATENCY_WINDOW_S, recent_latencies
from shared.liveness import alive_workers
from shared.metrics import recent_counts
from shared.providers.breaker import read_circuit
from shared.providers.ratelimit import headroom
from shared.queue.inspect import queue_stats

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/queues", responses=ERROR_RESPONSES)
def queues(state: StateDep, principal: OperatorDep) -> JSONBytes:
    client = state.broker.client
    ns = state.broker.namespace
    data = [
        {
            "queue": q.queue,
            "depth": q.depth,
            "delayed": q.delayed,
            "dead_lettered": q.dead_lettered,
            "in_flight": q.in_flight,
        }
        for q in queue_stats(state.broker)
    ]
    workers = alive_workers(client, ns)
    per_minute = recent_counts(client, ns, "finished", 15)
    throughput = {
        "queries_per_minute_last_1m": per_minute[-1],
        "queries_per_minute_last_5m": round(sum(per_minute[-5:]) / 5, 2),
        "queries_per_minute_last_15m": round(sum(per_minute) / 15, 2),
    }
    return JSONBytes(
        {
            "object": "queues",
            "data": data,
            "workers_alive": len(workers),
            "workers": workers,
            "throughput": throughput,
        }
    )


@router.get("/providers", responses=ERROR_RESPONSES)
def providers(state: StateDep, session: SessionDep, principal: OperatorDep) -> JSONBytes:
    client = state.broker.client
    ns = state.broker.namespace
    now = time.time()
    latencies = recent_latencies(session, int(now) - LATENCY_WINDOW_S)
    data = []
    for name, cfg in sorted(state.catalog.providers.items()):
        circuit = read_circuit(client, ns, name, now)
        recent = sorted(latencies.get(name, []))
        data.append(
            {
                "provider": name,
                "api": cfg.api,
                "circuit": circuit.state,
                "window_calls": circuit.window_calls,
                "window_error_rate": circuit.window_error_rate,
                "latency_p50_ms": _quantile(recent, 0.50),
                "latency_p95_ms": _quantile(recent, 0.95),
                "latency_sample": len(recent),
                "rpm": cfg.rpm,
                "tpm": cfg.tpm,
                "rpm_headroom": headroom(client, ns, name, "rpm", cfg.rpm, now) if cfg.rpm else None,
                "tpm_headroom": headroom(client, ns, name, "tpm", cfg.tpm, now) if cfg.tpm else None,
            }
        )
    return list_page(data)


def _quantile(ordered: list[int], q: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
