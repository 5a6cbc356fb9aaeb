"""``/v1/admin/*`` (admins of the operator tenant): queues and workers, provider health."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlmodel import col

from api.deps import OperatorDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.metrics import recent_counts
from shared.models import ProviderCall
from shared.providers.ratelimit import Limit
from shared.settings import PRIORITIES
from workers.heartbeat import DEAD_AFTER_S

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/queues", responses=ERROR_RESPONSES)
def queues(state: StateDep, principal: OperatorDep) -> JSONBytes:
    client = state.broker.client
    ns = state.broker.namespace
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for p in PRIORITIES:
        pipe.llen(f"{ns}:{p}")
        pipe.zcard(f"{ns}:{p}.DQ")
        pipe.zcard(f"{ns}:{p}.XQ")
        pipe.hlen(f"{ns}:{p}.msgs")
    pipe.zrangebyscore(f"{ns}:workers", now - DEAD_AFTER_S, "+inf")
    results = pipe.execute()
    data = []
    for i, p in enumerate(PRIORITIES):
        depth, delayed, dead, stored = results[i * 4 : i * 4 + 4]
        data.append(
            {
                "queue": p,
                "depth": depth,
                "delayed": delayed,
                "dead_lettered": dead,
                # Messages stored but not waiting in the list are held by workers.
                "in_flight": max(0, stored - depth),
            }
        )
    workers = [w.decode() if isinstance(w, bytes) else w for w in results[-1]]
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
    latencies = _recent_latencies(session, int(now) - LATENCY_WINDOW_S)
    data = []
    for name, cfg in sorted(state.catalog.providers.items()):
        raw = client.hgetall(f"{ns}:breaker:{name}")
        h = {_text(k): _text(v) for k, v in raw.items()}
        calls = float(h.get("calls", 0))
        recent = sorted(latencies.get(name, []))
        data.append(
            {
                "provider": name,
                "api": cfg.api,
                "circuit": _circuit(h, now),
                "window_calls": int(calls),
                "window_error_rate": round(float(h.get("fails", 0)) / calls, 4) if calls else 0.0,
                "latency_p50_ms": _quantile(recent, 0.50),
                "latency_p95_ms": _quantile(recent, 0.95),
                "latency_sample": len(recent),
                "rpm": cfg.rpm,
                "tpm": cfg.tpm,
                "rpm_headroom": _headroom(client, f"{ns}:ratelimit:{name}:rpm", Limit(cfg.rpm), now)
                if cfg.rpm
                else None,
                "tpm_headroom": _headroom(client, f"{ns}:ratelimit:{name}:tpm", Limit(cfg.tpm), now)
                if cfg.tpm
                else None,
            }
        )
    return list_page(data)


# Latency percentiles are over the last quarter hour of recorded attempts.
LATENCY_WINDOW_S = 900
LATENCY_SAMPLE = 20_000


def _recent_latencies(session: Any, since: int) -> dict[str, list[int]]:
    rows = session.execute(
        select(col(ProviderCall.model), col(ProviderCall.latency_ms))
        .where(col(ProviderCall.created_at) >= since)
        .order_by(col(ProviderCall.id).desc())
        .limit(LATENCY_SAMPLE)
    ).all()
    by_provider: dict[str, list[int]] = {}
    for model, latency in rows:
        by_provider.setdefault(model.partition(":")[0], []).append(latency)
    return by_provider


def _quantile(ordered: list[int], q: float) -> int | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _circuit(h: dict[str, str], now: float) -> str:
    state = h.get("state", "closed")
    if state == "open" and now * 1000 >= float(h.get("opened_at", 0)) + float(h.get("cooldown", 0)):
        return "half_open"
    return state


def _headroom(client: Any, key: str, limit: Limit, now: float) -> int:
    """How many units (requests or tokens) the shared limiter would admit right now."""
    tat = client.get(key)
    backlog_ms = max(0.0, float(tat) - now * 1000) if tat else 0.0
    return max(0, int((limit.capacity_ms - backlog_ms) / limit.emission_ms))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
