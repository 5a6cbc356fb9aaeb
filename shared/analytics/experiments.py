"""A/B experiments over councils (SPEC §13): the experiments, each query's variant, and the report.

This module owns two tables, ``experiments`` (a tenant's experiment: its variants with their
councils and weights, and the metric it is judged on) and ``experiment_assignments`` (one row per
query run in an experiment: which variant it got, written in the transaction that stores the
query rows, ``shared.batches.service``), and the statistics of the report.

Assignment is deterministic: a query's point in [0, 1) is the first 64 bits of
SHA-256(experiment id, NUL, custom_id); the variants, in their declared order, cover consecutive
stretches of [0, 1) as long as their share of the total weight, and the query gets the variant
whose stretch holds its point. The same ``custom_id`` therefore gets the same variant in every
batch while the weights stand; raising a weight (``PATCH``, a rollout 10% → 50% → 100%) moves
only the points between the old and the new boundaries, and a weight of 0 gets no query.

The assigned variant travels in the query's request doc: its ``council`` (which the worker runs
instead of the batch's, as for a file line) and ``experiment: {name, variant}``, which results
and ``GET /v1/queries/{id}`` show.

The report is one grouped query over the assignments joined to the query rows (or to the
feedback): per variant ``n``, the mean and its 95% interval, and a p-value against the best
variant. Lower is better for ``cost`` (a succeeded query's ``cost_usd``), ``latency`` (its
``latency_ms``) and ``failure_rate`` (failed among succeeded and failed); higher for
``feedback`` (users' 1-5 ratings) and ``peer_score``. ``peer_score`` is how clearly the peers
agreed on the best answer: for the top entry of a query's ``aggregate_ranking`` among n ranked
answers, (n - mean_rank) / (n - 1), 1 when every reviewer put it first; it is read from the
result documents of the newest ``PEER_SCORE_SCAN`` succeeded queries of the experiment, the one
metric that is not a grouped query (it is not stored apart from the result).

Tests: Welch's t-test (``scipy.stats.ttest_ind_from_stats``, unequal variances, from the grouped
n, mean and variance) for the continuous metrics; for ``failure_rate`` a two-proportion z-test
(pooled), with the Wilson interval. Each variant is compared with the best one; with more than
two variants the best wins only if every comparison is below 0.05 / (k - 1) (Bonferroni), so
the chance of a false winner stays under 0.05. The best variant's ``p_value`` is its largest
against the others. A variant needs ``MIN_N`` observations before any winner is named.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON, Column, Index, Table, UniqueConstraint, case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel, col

from shared.councils import resolve_council
from shared.db import write_transaction
from shared.errors import Conflict, InvalidField, NotFound
from shared.ids import new_id
from shared.lifecycle.statuses import QueryStatus
from shared.providers.config import Catalog
from shared.schemas import CouncilIn

Metric = Literal["peer_score", "feedback", "cost", "latency", "failure_rate"]
LOWER_IS_BETTER = {"cost", "latency", "failure_rate"}
ALPHA = 0.05
MIN_N = 2
PEER_SCORE_SCAN = 20_000
MAX_VARIANTS = 10


# ---------------------------------------------------------------- tables


class Experiment(SQLModel, table=True):
    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_experiments_tenant_name"),)

    id: str = SQLField(primary_key=True, max_length=40)
    tenant_id: str = SQLField(max_length=40)
    name: str = SQLField(max_length=64)
    metric: str = SQLField(max_length=16)
    # [{"name", "council": {mode, members, chairman}, "weight"}], in assignment order.
    variants: list[dict[str, Any]] = SQLField(sa_column=Column(JSON, nullable=False))
    created_at: int
    updated_at: int


class ExperimentAssignment(SQLModel, table=True):
    __tablename__ = "experiment_assignments"
    # The report groups one experiment's rows by variant; results read one batch's.
    __table_args__ = (
        Index("ix_experiment_assignments_experiment", "experiment_id", "variant"),
        Index("ix_experiment_assignments_batch", "batch_id"),
    )

    query_id: str = SQLField(primary_key=True, max_length=40)
    experiment_id: str = SQLField(max_length=40)
    batch_id: str = SQLField(max_length=40)
    variant: str = SQLField(max_length=64)


EXPERIMENTS: Table = Experiment.__table__  # type: ignore[attr-defined]
ASSIGNMENTS: Table = ExperimentAssignment.__table__  # type: ignore[attr-defined]


# ---------------------------------------------------------------- request bodies

Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class VariantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Name
    council: CouncilIn | None = None
    weight: float = Field(ge=0, le=1_000_000)


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Name
    variants: list[VariantIn] = Field(min_length=2, max_length=MAX_VARIANTS)
    metric: Metric


class WeightIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(ge=0, le=1_000_000)


class ExperimentPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variants: list[WeightIn] = Field(min_length=1, max_length=MAX_VARIANTS)


# ---------------------------------------------------------------- create, read, patch


def _check_weights(variants: Sequence[dict[str, Any]], param: str) -> None:
    if not sum(v["weight"] for v in variants) > 0:
        raise InvalidField("at least one variant needs a weight above 0", param=param)


def create_experiment(
    sessions: sessionmaker[Session], tenant_id: str, body: ExperimentCreate, catalog: Catalog
) -> dict[str, Any]:
    names = [v.name for v in body.variants]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InvalidField(f"variant name {name!r} is used twice", param=f"variants[{i}].name")
    variants = [
        {
            "name": v.name,
            "council": resolve_council(v.council, catalog, f"variants[{i}].council"),
            "weight": v.weight,
        }
        for i, v in enumerate(body.variants)
    ]
    _check_weights(variants, "variants")
    now = int(time.time())
    row: dict[str, Any] = {
        "id": new_id("exp"),
        "tenant_id": tenant_id,
        "name": body.name,
        "metric": body.metric,
        "variants": variants,
        "created_at": now,
        "updated_at": now,
    }
    duplicate = Conflict(f"an experiment named {body.name!r} exists already", param="name")
    try:
        with write_transaction(sessions) as session:
            if by_name(session, tenant_id, body.name) is not None:
                raise duplicate
            session.execute(insert(EXPERIMENTS), [row])
    except IntegrityError as exc:  # the same name, created at the same moment
        raise duplicate from exc
    return experiment_object(Experiment(**row))


def get_experiment(session: Session, tenant_id: str, experiment_id: str) -> Experiment:
    row = session.get(Experiment, experiment_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no experiment {experiment_id!r}", param="experiment_id")
    return row


def by_name(session: Session, tenant_id: str, name: str) -> Experiment | None:
    return session.scalars(
        select(Experiment).where(col(Experiment.tenant_id) == tenant_id, col(Experiment.name) == name)
    ).first()


def list_experiments(
    session: Session, tenant_id: str, limit: int, after: str | None
) -> tuple[list[Experiment], bool]:
    stmt = select(Experiment).where(col(Experiment.tenant_id) == tenant_id)
    if after:
        stmt = stmt.where(col(Experiment.id) < after)
    rows = list(session.scalars(stmt.order_by(col(Experiment.id).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def patch_weights(session: Session, tenant_id: str, experiment_id: str, body: ExperimentPatch) -> Experiment:
    """New weights for the named variants (the others keep theirs): a rollout step."""
    row = get_experiment(session, tenant_id, experiment_id)
    variants = [dict(v) for v in row.variants]
    index = {v["name"]: i for i, v in enumerate(variants)}
    seen: set[str] = set()
    for i, w in enumerate(body.variants):
        if w.name not in index:
            raise InvalidField(f"the experiment has no variant {w.name!r}", param=f"variants[{i}].name")
        if w.name in seen:
            raise InvalidField(f"variant {w.name!r} is named twice", param=f"variants[{i}].name")
        seen.add(w.name)
        variants[index[w.name]]["weight"] = w.weight
    _check_weights(variants, "variants")
    now = int(time.time())
    session.execute(
        update(EXPERIMENTS).where(EXPERIMENTS.c.id == row.id).values(variants=variants, updated_at=now)
    )
    row.variants, row.updated_at = variants, now
    return row


def experiment_object(row: Experiment) -> dict[str, Any]:
    total = sum(v["weight"] for v in row.variants)
    return {
        "object": "experiment",
        "id": row.id,
        "name": row.name,
        "metric": row.metric,
        "variants": [{**v, "share": round(v["weight"] / total, 6) if total else 0.0} for v in row.variants],
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


# ---------------------------------------------------------------- assignment (intake)


def point(experiment_id: str, custom_id: str) -> float:
    """The query's point in [0, 1): stable across batches, processes and Python versions."""
    digest = hashlib.sha256(f"{experiment_id}\0{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose(variants: Sequence[dict[str, Any]], p: float) -> dict[str, Any]:
    total = sum(v["weight"] for v in variants)
    edge = 0.0
    for v in variants:
        if v["weight"] <= 0:
            continue
        edge += v["weight"] / total
        if p < edge:
            return v
    # Rounding can leave the last stretch a hair short of 1: the last weighted variant takes it.
    return next(v for v in reversed(variants) if v["weight"] > 0)


@dataclass(frozen=True)
class Assigned:
    """A batch's experiment and each query's variant, in input order, for the query rows."""

    experiment_id: str
    variants: list[str]


def assign(
    session: Session, tenant_id: str, name: str, custom_ids: Sequence[str], catalog: Catalog
) -> tuple[Assigned, list[tuple[dict[str, Any], dict[str, str]]]]:
    """The experiment ``name``'s variant for each ``custom_id``: (the assignment to record, and
    per query the council to run and the ``experiment`` to show). Checks the variants' councils
    against the catalog as it is now (it may have changed since the experiment was made)."""
    row = by_name(session, tenant_id, name)
    if row is None:
        raise InvalidField(f"no experiment named {name!r}", param="experiment")
    for v in row.variants:
        if v["weight"] > 0:
            for model in [*v["council"]["members"], v["council"]["chairman"]]:
                problem = catalog.check_model(model)
                if problem:
                    raise InvalidField(f"variant {v['name']!r}: {problem}", param="experiment")
    chosen = [choose(row.variants, point(row.id, c)) for c in custom_ids]
    tags = {v["name"]: {"name": row.name, "variant": v["name"]} for v in row.variants}
    work = [(v["council"], tags[v["name"]]) for v in chosen]
    return Assigned(row.id, [v["name"] for v in chosen]), work


def record_assignments(session: Session, assigned: Assigned, batch_id: str, query_ids: Sequence[str]) -> None:
    """One row per query, in the transaction that stores the queries."""
    rows = [
        {"query_id": q, "experiment_id": assigned.experiment_id, "batch_id": batch_id, "variant": v}
        for q, v in zip(query_ids, assigned.variants, strict=True)
    ]
    for i in range(0, len(rows), 5000):
        session.execute(insert(ASSIGNMENTS), rows[i : i + 5000])


def batch_variants(session: Session, batch_id: str, query_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``{query_id: {name, variant}}`` for those of ``query_ids`` (of one batch) in an experiment."""
    if not query_ids:
        return {}
    rows = session.execute(
        select(ASSIGNMENTS.c.query_id, ASSIGNMENTS.c.variant, EXPERIMENTS.c.name)
        .join(EXPERIMENTS, EXPERIMENTS.c.id == ASSIGNMENTS.c.experiment_id)
        .where(ASSIGNMENTS.c.batch_id == batch_id, ASSIGNMENTS.c.query_id.in_(list(query_ids)))
    ).all()
    return {r.query_id: {"name": r.name, "variant": r.variant} for r in rows}


def batch_has_experiment(session: Session, batch_id: str) -> bool:
    return (
        session.scalar(select(ASSIGNMENTS.c.query_id).where(ASSIGNMENTS.c.batch_id == batch_id).limit(1))
        is not None
    )


# ---------------------------------------------------------------- the report


@dataclass
class Sample:
    n: int
    mean: float
    var: float  # sample variance (n - 1); for a proportion p(1 - p)
    successes: int = 0  # failure_rate: failures


def _grouped(session: Session, experiment_id: str, metric: str) -> dict[str, Sample]:
    from shared.models import FEEDBACK, QUERIES

    a = ASSIGNMENTS
    if metric == "failure_rate":
        failed = func.sum(case((QUERIES.c.status == str(QueryStatus.FAILED), 1), else_=0))
        rows = session.execute(
            select(a.c.variant, func.count(), failed)
            .join(QUERIES, QUERIES.c.id == a.c.query_id)
            .where(
                a.c.experiment_id == experiment_id,
                QUERIES.c.status.in_([str(QueryStatus.SUCCEEDED), str(QueryStatus.FAILED)]),
            )
            .group_by(a.c.variant)
        ).all()
        out = {}
        for variant, n, k in rows:
            p = (k or 0) / n if n else 0.0
            out[variant] = Sample(int(n), p, p * (1 - p), int(k or 0))
        return out
    if metric == "peer_score":
        return _peer_scores(session, experiment_id)
    if metric == "feedback":
        value = FEEDBACK.c.rating
        stmt = select(a.c.variant, func.count(), func.sum(value), func.sum(value * value)).join(
            FEEDBACK, FEEDBACK.c.query_id == a.c.query_id
        )
        stmt = stmt.where(a.c.experiment_id == experiment_id)
    else:
        value = QUERIES.c.cost_usd if metric == "cost" else QUERIES.c.latency_ms
        stmt = (
            select(a.c.variant, func.count(value), func.sum(value), func.sum(value * value))
            .join(QUERIES, QUERIES.c.id == a.c.query_id)
            .where(a.c.experiment_id == experiment_id, QUERIES.c.status == str(QueryStatus.SUCCEEDED))
        )
    out = {}
    for variant, n, total, squares in session.execute(stmt.group_by(a.c.variant)).all():
        out[variant] = _sample(int(n or 0), float(total or 0), float(squares or 0))
    return out


def _sample(n: int, total: float, squares: float) -> Sample:
    if n == 0:
        return Sample(0, 0.0, 0.0)
    mean = total / n
    var = max(0.0, (squares - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    return Sample(n, mean, var)


def peer_score(result: dict[str, Any] | None) -> float | None:
    ranked = [r for r in (result or {}).get("aggregate_ranking") or [] if r.get("votes")]
    if len(ranked) < 2:
        return None
    best = min(float(r["mean_rank"]) for r in ranked)
    return (len(ranked) - best) / (len(ranked) - 1)


def _peer_scores(session: Session, experiment_id: str) -> dict[str, Sample]:
    from shared.models import QUERIES

    rows = session.execute(
        select(ASSIGNMENTS.c.variant, QUERIES.c.result)
        .join(QUERIES, QUERIES.c.id == ASSIGNMENTS.c.query_id)
        .where(ASSIGNMENTS.c.experiment_id == experiment_id, QUERIES.c.status == str(QueryStatus.SUCCEEDED))
        .order_by(ASSIGNMENTS.c.query_id.desc())
        .limit(PEER_SCORE_SCAN)
    ).all()
    sums: dict[str, list[float]] = {}
    for variant, result in rows:
        score = peer_score(result)
        if score is not None:
            s = sums.setdefault(variant, [0, 0.0, 0.0])
            s[0] += 1
            s[1] += score
            s[2] += score * score
    return {v: _sample(int(s[0]), s[1], s[2]) for v, s in sums.items()}


def _interval(sample: Sample, metric: str) -> list[float] | None:
    from scipy import stats  # here: SciPy takes 0.3 s to import, and every process loads this module

    if sample.n == 0:
        return None
    if metric == "failure_rate":
        ci = stats.binomtest(sample.successes, sample.n).proportion_ci(0.95, method="wilson")
        return [float(ci.low), float(ci.high)]
    if sample.n < 2:
        return None
    half = float(stats.t.ppf(0.975, sample.n - 1)) * math.sqrt(sample.var / sample.n)
    return [sample.mean - half, sample.mean + half]


def p_value(a: Sample, b: Sample, metric: str) -> float | None:
    """Two-sided p of "a and b have the same mean" (Welch; two-proportion z for failure_rate)."""
    from scipy import stats

    if a.n < MIN_N or b.n < MIN_N:
        return None
    if metric == "failure_rate":
        pooled = (a.successes + b.successes) / (a.n + b.n)
        se = math.sqrt(pooled * (1 - pooled) * (1 / a.n + 1 / b.n))
        if se == 0:
            return 1.0
        return float(2 * stats.norm.sf(abs(a.mean - b.mean) / se))
    if a.var == 0 and b.var == 0:
        return 1.0 if a.mean == b.mean else 0.0
    result = stats.ttest_ind_from_stats(
        a.mean, math.sqrt(a.var), a.n, b.mean, math.sqrt(b.var), b.n, equal_var=False
    )
    return float(result.pvalue)


def report(session: Session, row: Experiment) -> dict[str, Any]:
    """The experiment with, per variant, ``n``, ``mean``, ``interval`` (95%) and ``p_value``
    (against the best variant), and the ``winner`` once significant."""
    samples = _grouped(session, row.id, row.metric)
    names = [v["name"] for v in row.variants]
    present = [n for n in names if samples.get(n, Sample(0, 0.0, 0.0)).n > 0]
    sign = 1 if row.metric in LOWER_IS_BETTER else -1
    best = min(present, key=lambda n: sign * samples[n].mean) if present else None
    others = [n for n in names if n != best]
    threshold = ALPHA / max(1, len(others))
    pvalues: dict[str, float | None] = {}
    if best is not None:
        for n in others:
            pvalues[n] = p_value(samples[best], samples.get(n, Sample(0, 0.0, 0.0)), row.metric)
        known = [p for p in pvalues.values() if p is not None]
        pvalues[best] = max(known) if known and len(known) == len(others) else None
    winner = (
        best
        if best is not None
        and others
        and all(pvalues.get(n) is not None and pvalues[n] < threshold for n in others)  # type: ignore[operator]
        else None
    )
    body = experiment_object(row)
    body["variants"] = [
        {
            **v,
            "n": samples[v["name"]].n if v["name"] in samples else 0,
            "mean": samples[v["name"]].mean if v["name"] in samples else None,
            "interval": _interval(samples[v["name"]], row.metric) if v["name"] in samples else None,
            "p_value": pvalues.get(v["name"]),
        }
        for v in body["variants"]
    ]
    body.update(
        {"best": best, "winner": winner, "alpha": ALPHA, "lower_is_better": row.metric in LOWER_IS_BETTER}
    )
    return body
