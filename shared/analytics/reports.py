"""The analytics read models (SPEC §13): the model leaderboard and a batch's council report.

Both read the rollups of ``shared.analytics.rollups`` (sums over a few rows per model and day, or
per batch) and never scan the call ledger; the only other reads are a batch's slowest queries
(an indexed top-N of the batch's own rows) and feedback ratings (one row per rating).

The leaderboard's order (``composite``): a model's chance of being ranked above the average
model by its peers (the logistic of its Bradley–Terry log-strength), times its reliability (the
share of the times it was asked to answer that it did, after retries and fallbacks). Quality
and reliability are what a council is for; cost and latency are shown beside them, not folded
in, because how much they are worth is the customer's trade-off. Models no review has ranked
(a chairman, say) come after every ranked one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from scipy import stats
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.analytics.fitting import bradley_terry, percentile, proportion_interval
from shared.analytics.rollups import CURSOR, DAY_S, SYNTHESIS_SOURCES, day_of
from shared.errors import NotFound
from shared.models import (
    BATCH_LATENCY,
    BATCH_POSITION,
    BATCH_STAGE,
    FEEDBACK,
    MODEL_DAY,
    MODEL_LATENCY,
    PAIRS,
    QUERIES,
    AnalyticsCursor,
    Batch,
    BatchRollup,
)

SLOWEST = 10
_SUMMED = (
    "calls",
    "call_failures",
    "call_timeouts",
    "answers",
    "answer_failures",
    "rank_sum",
    "rank_votes",
    "first_places",
    "cost_usd",
)


def _rate(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def leaderboard(
    session: Session, tenant_id: str | None, start: int, end: int, confidence: float = 0.95
) -> list[dict[str, Any]]:
    """Every model seen between ``start`` and ``end`` (Unix seconds; rollups are per UTC day, so
    a day counts when it overlaps the range), best first. ``tenant_id`` None: every tenant."""
    first_day = day_of(start)

    def scoped(table: Any) -> list[Any]:
        where = [table.c.day >= first_day, table.c.day < end]
        if tenant_id is not None:
            where.append(table.c.tenant_id == tenant_id)
        return where

    d = MODEL_DAY.c
    totals = {
        row.model: row
        for row in session.execute(
            select(d.model, *(func.sum(d[c]).label(c) for c in _SUMMED))
            .where(*scoped(MODEL_DAY))
            .group_by(d.model)
        )
    }
    histograms: dict[str, dict[int, int]] = defaultdict(dict)
    lat = MODEL_LATENCY.c
    for row in session.execute(
        select(lat.model, lat.bucket, func.sum(lat.calls).label("n"))
        .where(*scoped(MODEL_LATENCY))
        .group_by(lat.model, lat.bucket)
    ):
        histograms[row.model][row.bucket] = int(row.n)
    p = PAIRS.c
    wins = {
        (row.winner, row.loser): int(row.n)
        for row in session.execute(
            select(p.winner, p.loser, func.sum(p.wins).label("n"))
            .where(*scoped(PAIRS))
            .group_by(p.winner, p.loser)
        )
    }
    f = FEEDBACK.c
    feedback_where = [f.created_at >= start, f.created_at < end]
    if tenant_id is not None:
        feedback_where.append(f.tenant_id == tenant_id)
    feedback = {
        row.model: (int(row.n), float(row.mean))
        for row in session.execute(
            select(f.model, func.count().label("n"), func.avg(f.rating).label("mean"))
            .where(*feedback_where)
            .group_by(f.model)
        )
    }
    models = sorted(totals)
    strengths = bradley_terry(models, wins, confidence)
    rows = []
    for model in models:
        t = totals[model]
        strength = strengths.get(model)
        asked = int(t.answers) + int(t.answer_failures)
        reliability = int(t.answers) / asked if asked else 1.0
        quality = 1 / (1 + math.exp(-strength.score)) if strength else 0.5
        wins_first = int(t.first_places)
        count, mean = feedback.get(model, (0, None))
        rows.append(
            {
                "model": model,
                "answers": int(t.answers),
                "answer_failures": int(t.answer_failures),
                "calls": int(t.calls),
                "failures": int(t.call_failures),
                "timeouts": int(t.call_timeouts),
                "error_rate": _rate(int(t.call_failures), int(t.calls)),
                "timeout_rate": _rate(int(t.call_timeouts), int(t.calls)),
                "latency_p50_ms": _ms(percentile(histograms[model], 0.5)),
                "latency_p95_ms": _ms(percentile(histograms[model], 0.95)),
                "votes": int(t.rank_votes),
                "mean_rank": _rate(int(t.rank_sum), int(t.rank_votes)),
                "win_rate": _rate(wins_first, int(t.rank_votes)),
                "strength": strength.to_dict() if strength else None,
                "cost_usd": round(float(t.cost_usd), 8),
                "cost_per_win_usd": round(float(t.cost_usd) / wins_first, 8) if wins_first else None,
                "feedback": {"count": count, "mean": None if mean is None else round(mean, 4)},
                "composite": round(quality * reliability, 6),
            }
        )
    rows.sort(key=lambda r: (r["strength"] is not None, r["composite"]), reverse=True)
    return rows


def _position_bias(rows: list[Any], confidence: float) -> dict[str, Any]:
    reviews = sum(int(r.reviews) for r in rows)
    hits = sum(int(r.first_ranked_first) for r in rows)
    # Chance: a reviewer shown k answers ranks the first of them first one time in k.
    expected = sum(int(r.reviews) / int(r.shown) for r in rows if r.shown)
    chance = expected / reviews if reviews else None
    interval = proportion_interval(hits, reviews, confidence)
    p_value: float | None = None
    if reviews and chance is not None:
        if len(rows) == 1:
            p_value = float(stats.binomtest(hits, reviews, chance).pvalue)
        else:  # several k: the count is a sum of binomials; its normal approximation
            variance = sum(int(r.reviews) * (1 / r.shown) * (1 - 1 / r.shown) for r in rows if r.shown)
            z = (hits - expected) / math.sqrt(variance) if variance else 0.0
            p_value = float(2 * stats.norm.sf(abs(z)))
    return {
        "reviews": reviews,
        "first_ranked_first": hits,
        "rate": _rate(hits, reviews),
        "chance": None if chance is None else round(chance, 6),
        "confidence": confidence,
        "interval": None if interval is None else [round(interval[0], 6), round(interval[1], 6)],
        "excludes_chance": None
        if interval is None or chance is None
        else not interval[0] <= chance <= interval[1],
        "p_value": p_value,
        "by_shown": [
            {
                "shown": int(r.shown),
                "reviews": int(r.reviews),
                "first_ranked_first": int(r.first_ranked_first),
                "chance": round(1 / r.shown, 6) if r.shown else None,
            }
            for r in rows
        ],
    }


def batch_report(session: Session, tenant_id: str, batch_id: str, confidence: float = 0.95) -> dict[str, Any]:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    rollup = session.get(BatchRollup, batch_id) or BatchRollup(batch_id=batch_id, tenant_id=tenant_id)
    positions = list(
        session.execute(
            select(BATCH_POSITION)
            .where(BATCH_POSITION.c.batch_id == batch_id)
            .order_by(BATCH_POSITION.c.shown)
        )
    )
    histograms: dict[str, dict[int, int]] = defaultdict(dict)
    for row in session.execute(select(BATCH_LATENCY).where(BATCH_LATENCY.c.batch_id == batch_id)):
        histograms[row.stage][row.bucket] = int(row.calls)
    stages = [
        {
            "stage": row.stage,
            "calls": int(row.calls),
            "failures": int(row.failures),
            "cost_usd": round(float(row.cost_usd), 8),
            "latency_p50_ms": _ms(percentile(histograms[row.stage], 0.5)),
            "latency_p95_ms": _ms(percentile(histograms[row.stage], 0.95)),
        }
        for row in session.execute(
            select(BATCH_STAGE).where(BATCH_STAGE.c.batch_id == batch_id).order_by(BATCH_STAGE.c.stage)
        )
    ]
    q = QUERIES.c
    slowest = [
        {"query_id": r.id, "custom_id": r.custom_id, "status": r.status, "latency_ms": r.latency_ms}
        for r in session.execute(
            select(q.id, q.custom_id, q.status, q.latency_ms)
            .where(q.batch_id == batch_id, q.latency_ms.is_not(None))
            .order_by(q.latency_ms.desc())
            .limit(SLOWEST)
        )
    ]
    cursor = session.get(AnalyticsCursor, CURSOR)
    judged = rollup.reviews_valid + rollup.reviews_invalid
    return {
        "object": "batch.report",
        "batch_id": batch_id,
        "status": batch.status,
        "queries_folded": rollup.queries,
        "folded_through": cursor.finished_at if cursor else None,
        "reviews": {
            "total": rollup.reviews,
            "valid": rollup.reviews_valid,
            "invalid": rollup.reviews_invalid,
            "failed": rollup.reviews_failed,
        },
        "invalid_review_rate": _rate(rollup.reviews_invalid, judged),
        "agreement": {
            "kendall_w": _rate(rollup.agreement_sum, rollup.agreement_queries),
            "chance": _rate(rollup.agreement_chance_sum, rollup.agreement_queries),
            "queries": rollup.agreement_queries,
        },
        "position_bias": _position_bias(positions, confidence),
        "synthesis": {s: getattr(rollup, f"synthesis_{s}") for s in SYNTHESIS_SOURCES},
        "stages": stages,
        "slowest_queries": slowest,
    }


__all__ = ["DAY_S", "batch_report", "leaderboard"]
