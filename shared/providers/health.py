"""Each configured provider's health as an operator sees it: its circuit, recent latency and
rate-limit headroom, read from the modules that own them (``shared.providers.breaker``,
``shared.ledger``, ``shared.providers.ratelimit``). ``/v1/admin/providers`` lists it; the
dashboard's operations page shows part of it."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy.orm import Session

from shared.insights import quantile
from shared.ledger import LATENCY_WINDOW_S, recent_latencies
from shared.providers.breaker import read_circuit
from shared.providers.config import Catalog
from shared.providers.ratelimit import headroom


def provider_health(
    client: redis.Redis, namespace: str, catalog: Catalog, session: Session, now: float
) -> list[dict[str, Any]]:
    """One row per provider, by name: circuit state and window, p50/p95 latency of its calls in
    the last ``LATENCY_WINDOW_S`` (and how many there were), limits and their headroom now."""
    latencies = recent_latencies(session, int(now) - LATENCY_WINDOW_S)
    rows: list[dict[str, Any]] = []
    for name, cfg in sorted(catalog.providers.items()):
        circuit = read_circuit(client, namespace, name, now)
        recent = sorted(latencies.get(name, []))
        rows.append(
            {
                "provider": name,
                "api": cfg.api,
                "circuit": circuit.state,
                "window_calls": circuit.window_calls,
                "window_error_rate": circuit.window_error_rate,
                "latency_p50_ms": quantile(recent, 0.50),
                "latency_p95_ms": quantile(recent, 0.95),
                "latency_sample": len(recent),
                "rpm": cfg.rpm,
                "tpm": cfg.tpm,
                "rpm_headroom": headroom(client, namespace, name, "rpm", cfg.rpm, now) if cfg.rpm else None,
                "tpm_headroom": headroom(client, namespace, name, "tpm", cfg.tpm, now) if cfg.tpm else None,
            }
        )
    return rows
