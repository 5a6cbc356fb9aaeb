"""Anomalies (SPEC §13): what is judged unusual about the providers and batches, and the state
of that judgement. The scheduler job ``scheduler/jobs/anomalies.py`` runs ``judge`` on each
provider every few seconds and sends the events; ``/v1/admin/anomalies`` reads ``read_anomalies``.

The rules, per configured provider, over the calls of the last ``recent_s`` (30 s):
- slow: a (model, stage) whose mean latency of succeeded calls is more than ``slow_ratio`` (2×)
  its rolling mean, with at least ``min_samples`` (20) calls in the window. The rolling mean is
  that of the ``baseline_s`` (10 min) before the window (``scheduler/jobs/anomalies.py`` reads
  it as one aggregate over a bounded range of ledger ids). Each such call is also listed as a
  slow query.
- errors: at least ``error_rate`` (25%) of the provider's calls in the window failed in a way that
  says it is unhealthy (``HEALTH_FAILURES``), with at least ``min_calls`` (20) calls.
- circuit: its circuit is open or half-open (``shared/providers/breaker.py``).

Any one makes the provider ``degraded``. It is ``recovered`` only when every rule is back under a
lower bar (hysteresis, so a provider near a threshold does not flap): each slow (model, stage)
seen again with ``min_samples`` calls at no more than ``recover_ratio`` (1.5×) the mean it was
degraded against, an error rate at most ``recover_error_rate`` (10%) over ``min_calls`` calls if
errors were a reason, and a closed circuit. A degraded provider is judged against the rolling
means frozen when it turned degraded: otherwise ten minutes of slow calls would become its
new normal and it would "recover" while still slow. No calls at all is no evidence: a degraded
provider without traffic stays degraded.

State lives in Redis (derived, like the circuits it reads): one hash of degraded providers (when,
why, the frozen means, whether its event was sent), a capped log of transitions, the latest
run's slow queries, and id marks that bound the job's ledger reads. It survives a scheduler
restart or a change of leader; a Redis that lost it starts over: a provider still degraded is
reported degraded again (a new episode), one that recovered meanwhile gets no ``recovered``.

Keys (named in ``shared/keys.py``): ``{ns}:anomalies:providers`` (hash), ``{ns}:anomalies:log``
(list), ``{ns}:anomalies:latest`` (string), ``{ns}:anomalies:marks`` (sorted set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from shared import keys
from shared.providers.breaker import HEALTH_FAILURES

LOG_KEEP = 200


@dataclass(frozen=True)
class AnomalyConfig:
    recent_s: float = 30.0
    baseline_s: float = 600.0
    min_samples: int = 20
    slow_ratio: float = 2.0
    recover_ratio: float = 1.5
    min_calls: int = 20
    error_rate: float = 0.25
    recover_error_rate: float = 0.10
    # Ledger rows read per run at most: the recent window's rows, and the baseline's (aggregated
    # in the database). Past these the windows are the newest rows only.
    recent_cap: int = 20_000
    baseline_cap: int = 200_000
    slow_queries_kept: int = 20


@dataclass
class Stat:
    """Succeeded calls of one (model, stage) in a window: how many and their summed latency."""

    n: int = 0
    total_ms: float = 0.0

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.n if self.n else 0.0


@dataclass
class ProviderWindow:
    """What the recent window says about one provider."""

    latency: dict[str, Stat] = field(default_factory=dict)  # "model|stage" → stat
    calls: int = 0  # calls that reached the provider (not refused by the circuit)
    failures: int = 0  # ... that failed in a way saying it is unhealthy
    circuit: str = "closed"

    @property
    def error_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


def stat_key(model: str, stage: str) -> str:
    return f"{model}|{stage}"


def counts_as_call(status: str, category: str | None) -> bool:
    return status == "succeeded" or (status == "failed" and category != "circuit_open")


def is_health_failure(status: str, category: str | None) -> bool:
    return status == "failed" and category in HEALTH_FAILURES


def judge(
    window: ProviderWindow,
    baseline: dict[str, Stat],
    state: dict[str, Any] | None,
    config: AnomalyConfig,
) -> tuple[list[dict[str, Any]], bool]:
    """(reasons, healthy) for one provider. ``reasons`` are what is wrong now at the degrading
    bar (empty: nothing); ``healthy`` says whether a degraded provider (``state``) may recover."""
    c = config
    frozen: dict[str, float] = (state or {}).get("baseline_ms", {})
    reasons: list[dict[str, Any]] = []
    blocking = False
    for key, recent in sorted(window.latency.items()):
        base_ms = frozen.get(key)
        if base_ms is None:
            base = baseline.get(key)
            if base is None or base.n < c.min_samples:
                continue
            base_ms = base.mean_ms
        if recent.n < c.min_samples or base_ms <= 0:
            continue
        ratio = recent.mean_ms / base_ms
        if ratio > c.slow_ratio:
            model, _, stage = key.partition("|")
            reasons.append(
                {
                    "kind": "latency",
                    "model": model,
                    "stage": stage,
                    "recent_mean_ms": round(recent.mean_ms, 1),
                    "baseline_mean_ms": round(base_ms, 1),
                    "ratio": round(ratio, 2),
                    "samples": recent.n,
                }
            )
        if ratio > c.recover_ratio:
            blocking = True
    if window.calls >= c.min_calls and window.error_rate >= c.error_rate:
        reasons.append(
            {"kind": "error_rate", "error_rate": round(window.error_rate, 4), "calls": window.calls}
        )
    if window.calls >= c.min_calls and window.error_rate > c.recover_error_rate:
        blocking = True
    if window.circuit != "closed":
        reasons.append({"kind": "circuit", "state": window.circuit})
        blocking = True
    # Each reason the provider was degraded for needs evidence that it is gone.
    for reason in (state or {}).get("reasons", []):
        if reason["kind"] == "latency":
            seen = window.latency.get(stat_key(reason["model"], reason["stage"]))
            blocking = blocking or seen is None or seen.n < c.min_samples
        elif reason["kind"] == "error_rate":
            blocking = blocking or window.calls < c.min_calls
    return reasons, not blocking


# ---------------------------------------------------------------------------- state in Redis


providers_key = keys.anomaly_providers
log_key = keys.anomaly_log
latest_key = keys.anomaly_latest
marks_key = keys.anomaly_marks


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def degraded_providers(client: redis.Redis, ns: str) -> dict[str, dict[str, Any]]:
    raw: dict[Any, Any] = client.hgetall(providers_key(ns))
    return {_text(k): orjson.loads(v) for k, v in raw.items()}


def save_degraded(client: redis.Redis, ns: str, provider: str, state: dict[str, Any]) -> None:
    client.hset(providers_key(ns), provider, orjson.dumps(state))


def drop_degraded(client: redis.Redis, ns: str, provider: str) -> None:
    client.hdel(providers_key(ns), provider)


def record(client: redis.Redis, ns: str, entry: dict[str, Any]) -> None:
    """Append a transition (or an at-risk batch) to the capped log of recent anomalies."""
    pipe = client.pipeline()
    pipe.lpush(log_key(ns), orjson.dumps(entry))
    pipe.ltrim(log_key(ns), 0, LOG_KEEP - 1)
    pipe.execute()


def save_latest(client: redis.Redis, ns: str, latest: dict[str, Any]) -> None:
    client.set(latest_key(ns), orjson.dumps(latest))


def read_anomalies(client: redis.Redis, ns: str, limit: int = 100) -> dict[str, Any]:
    """Current anomalies (degraded providers, the last run's slow queries) and the recent log."""
    raw_latest: Any = client.get(latest_key(ns))
    latest = orjson.loads(raw_latest) if raw_latest else {}
    raw_log: list[Any] = client.lrange(log_key(ns), 0, limit - 1)
    degraded = degraded_providers(client, ns)
    return {
        "checked_at": latest.get("checked_at"),
        "degraded_providers": [
            {
                "provider": name,
                "since": iso(s["since"]),
                "reasons": s["reasons"],
                "baseline_ms": s.get("baseline_ms", {}),
            }
            for name, s in sorted(degraded.items())
        ],
        "slow_queries": latest.get("slow_queries", []),
        "recent": [orjson.loads(e) for e in raw_log],
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
