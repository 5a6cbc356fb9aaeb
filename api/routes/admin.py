"""``/v1/admin/*`` (admins of the operator tenant): queues and workers, provider health."""

from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import OperatorDep, StateDep
from api.responses import JSONBytes
from api.routes.batches import _ERRORS
from shared.settings import PRIORITIES
from workers.heartbeat import DEAD_AFTER_S

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/queues", responses=_ERRORS)
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
    return JSONBytes({"object": "queues", "data": data, "workers_alive": len(workers), "workers": workers})


@router.get("/providers", responses=_ERRORS)
def providers(state: StateDep, principal: OperatorDep) -> JSONBytes:
    client = state.broker.client
    ns = state.broker.namespace
    data = []
    for name, cfg in sorted(state.catalog.providers.items()):
        raw = client.hgetall(f"{ns}:breaker:{name}")
        h = {_text(k): _text(v) for k, v in raw.items()}
        calls = float(h.get("calls", 0))
        data.append(
            {
                "provider": name,
                "api": cfg.api,
                "circuit": h.get("state", "closed"),
                "window_calls": int(calls),
                "window_error_rate": round(float(h.get("fails", 0)) / calls, 4) if calls else 0.0,
                "rpm": cfg.rpm,
                "tpm": cfg.tpm,
            }
        )
    return JSONBytes({"object": "list", "data": data, "has_more": False})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
