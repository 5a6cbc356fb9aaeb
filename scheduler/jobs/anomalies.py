"""The anomaly job (SPEC §13): judges every configured provider every few seconds and sends
``provider.degraded`` / ``provider.recovered`` (the rules and their state are
``shared.analytics.anomalies``'; ``batch.at_risk`` is sent by ``scheduler/jobs/deadlines.py``).

What it reads, bounded whatever the ledger's size: ``provider_calls`` has no index on
``created_at`` alone (and the hot path should not pay for one), but its ids grow with time. Each
run stores a mark (its time, the ledger's largest id) in Redis; a window starting at T reads the
id range above the newest mark older than T (a primary-key range scan), at most ``recent_cap``
rows for the recent window and ``baseline_cap`` for the baseline, which the database aggregates
to one row per (model, stage). Without a mark old enough (a fresh start) the windows are the
newest ``cap`` rows.

Who hears of it: a provider is shared by every tenant, so its events go to every tenant with an
enabled endpoint subscribed to the event (by name or ``*``), the operator tenant included like
any other. The event says which provider and models and why; it carries no tenant's data. Each
(tenant, event, episode) is sent once: a ``Notice`` keyed by the provider and the time it turned
degraded commits with the delivery, and the episode is marked sent only after every tenant's
commit, so a job that dies half-way sends the rest on its next run, and nothing twice.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from shared.analytics.anomalies import (
    AnomalyConfig,
    ProviderWindow,
    Stat,
    counts_as_call,
    degraded_providers,
    drop_degraded,
    is_health_failure,
    iso,
    judge,
    marks_key,
    record,
    save_degraded,
    save_latest,
    stat_key,
)
from shared.lifecycle.statuses import CallStatus
from shared.models import ProviderCall
from shared.providers.breaker import read_circuit
from shared.providers.config import Catalog
from shared.webhooks.events import emit_once, once_period, subscribers

log = logging.getLogger("conclave.scheduler")

# Calls written after they were made (refused calls, recorded when their query settles) carry an
# older created_at than their id's neighbours: marks are taken this much before a window starts.
MARK_SLACK_S = 60


class AnomalyDetector:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: redis.Redis,
        namespace: str,
        catalog: Catalog,
        config: AnomalyConfig | None = None,
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.ns = namespace
        self.catalog = catalog
        self.config = config or AnomalyConfig()

    def run(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """One judgement of every provider; returns the degraded ones after it."""
        now = time.time() if now is None else now
        c = self.config
        recent_since = now - c.recent_s
        baseline_since = recent_since - c.baseline_s
        with self.sessions() as session:
            max_id = session.scalar(select(func.max(ProviderCall.id))) or 0
            recent_lo = max(self._mark_before(recent_since - MARK_SLACK_S), max_id - c.recent_cap)
            base_lo = max(self._mark_before(baseline_since - MARK_SLACK_S), max_id - c.baseline_cap)
            baseline = self._baseline(session, base_lo, baseline_since, recent_since)
            rows = session.execute(
                select(
                    col(ProviderCall.model),
                    col(ProviderCall.stage),
                    col(ProviderCall.status),
                    col(ProviderCall.error_category),
                    col(ProviderCall.latency_ms),
                    col(ProviderCall.query_id),
                    col(ProviderCall.batch_id),
                ).where(
                    col(ProviderCall.id) > recent_lo,
                    col(ProviderCall.created_at) >= recent_since,
                    col(ProviderCall.created_at) <= now,
                    col(ProviderCall.status).in_((CallStatus.SUCCEEDED, CallStatus.FAILED)),
                )
            ).all()
        self._mark(now, max_id)

        windows = {name: ProviderWindow() for name in self.catalog.providers}
        for model, stage, status, category, latency, _, _ in rows:
            window = windows.get(model.partition(":")[0])
            if window is None:
                continue
            if counts_as_call(status, category):
                window.calls += 1
            if is_health_failure(status, category):
                window.failures += 1
            if status == CallStatus.SUCCEEDED:
                stat = window.latency.setdefault(stat_key(model, stage), Stat())
                stat.n += 1
                stat.total_ms += latency
        for name, window in windows.items():
            window.circuit = read_circuit(self.client, self.ns, name, now).state

        degraded = degraded_providers(self.client, self.ns)
        for name, window in windows.items():
            state = degraded.get(name)
            reasons, healthy = judge(window, baseline, state, c)
            if state is None and reasons:
                state = {
                    "provider": name,
                    "since": int(now),
                    "reasons": reasons,
                    "baseline_ms": {
                        k: round(s.mean_ms, 3) for k, s in baseline.items() if s.n >= c.min_samples
                    },
                    "sent": False,
                }
                save_degraded(self.client, self.ns, name, state)
                record(self.client, self.ns, {"kind": "provider.degraded", "at": iso(now), **_public(state)})
                log.warning("provider %s degraded: %s", name, reasons)
                degraded[name] = state
            elif state is not None and state["sent"] and healthy:
                self._recover(name, state, now)
                del degraded[name]
                continue
            if state is not None and not state["sent"]:
                self._send_degraded(name, state, now)

        save_latest(
            self.client,
            self.ns,
            {"checked_at": iso(now), "slow_queries": self._slow_queries(rows, baseline, degraded)},
        )
        return degraded

    def _send_degraded(self, name: str, state: dict[str, Any], now: float) -> None:
        self._broadcast("provider.degraded", name, state, _public(state) | {"status": "degraded"}, now)
        state["sent"] = True
        save_degraded(self.client, self.ns, name, state)

    def _recover(self, name: str, state: dict[str, Any], now: float) -> None:
        data = {
            "provider": name,
            "status": "recovered",
            "degraded_since": iso(state["since"]),
            "recovered_at": iso(now),
            "duration_s": int(now) - state["since"],
            "reasons": state["reasons"],
        }
        self._broadcast("provider.recovered", name, state, data, now)
        # Dropped after every tenant's commit: a run that dies before this sends the rest next time.
        drop_degraded(self.client, self.ns, name)
        record(self.client, self.ns, {"kind": "provider.recovered", "at": iso(now), **data})
        log.warning("provider %s recovered after %d s", name, data["duration_s"])

    def _broadcast(
        self, event: str, name: str, state: dict[str, Any], data: dict[str, Any], now: float
    ) -> None:
        with self.sessions() as session:
            tenants = subscribers(session, event)
        period = once_period(f"{name}@{state['since']}")
        for tenant_id in tenants:
            emit_once(self.sessions, tenant_id, event, period, data, int(now))

    def _baseline(self, session: Session, lo: int, since: float, until: float) -> dict[str, Stat]:
        rows = session.execute(
            select(
                col(ProviderCall.model),
                col(ProviderCall.stage),
                func.count(),
                func.sum(col(ProviderCall.latency_ms)),
            )
            .where(
                col(ProviderCall.id) > lo,
                col(ProviderCall.created_at) >= since,
                col(ProviderCall.created_at) < until,
                col(ProviderCall.status) == CallStatus.SUCCEEDED,
            )
            .group_by(col(ProviderCall.model), col(ProviderCall.stage))
        ).all()
        return {stat_key(m, s): Stat(int(n), float(total or 0)) for m, s, n, total in rows}

    def _slow_queries(
        self, rows: Any, baseline: dict[str, Stat], degraded: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Succeeded calls of the window slower than ``slow_ratio`` × the rolling mean of their
        model and stage (the frozen one for a degraded provider), slowest first by ratio."""
        c = self.config
        slow: list[dict[str, Any]] = []
        for model, stage, status, _, latency, query_id, batch_id in rows:
            if status != CallStatus.SUCCEEDED:
                continue
            key = stat_key(model, stage)
            frozen = degraded.get(model.partition(":")[0], {}).get("baseline_ms", {})
            base_ms = frozen.get(key)
            if base_ms is None:
                base = baseline.get(key)
                base_ms = base.mean_ms if base and base.n >= c.min_samples else None
            if base_ms and latency > c.slow_ratio * base_ms:
                slow.append(
                    {
                        "query_id": query_id,
                        "batch_id": batch_id,
                        "model": model,
                        "stage": stage,
                        "latency_ms": latency,
                        "baseline_mean_ms": round(base_ms, 1),
                        "ratio": round(latency / base_ms, 2),
                    }
                )
        slow.sort(key=lambda s: -s["ratio"])
        return slow[: c.slow_queries_kept]

    def _mark_before(self, t: float) -> int:
        found: list[Any] = self.client.zrevrangebyscore(marks_key(self.ns), t, "-inf", start=0, num=1)
        if not found:
            return 0
        member = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
        return int(member.partition(":")[2])

    def _mark(self, now: float, max_id: int) -> None:
        key = marks_key(self.ns)
        keep_from = now - self.config.recent_s - self.config.baseline_s - 4 * MARK_SLACK_S
        pipe = self.client.pipeline()
        pipe.zadd(key, {f"{now:.3f}:{max_id}": now})
        pipe.zremrangebyscore(key, "-inf", keep_from)
        pipe.execute()


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {"provider": state["provider"], "since": iso(state["since"]), "reasons": state["reasons"]}
