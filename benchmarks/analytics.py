"""Analytics benchmark (SPEC §13, issue 17 done-when 5): the leaderboard and a batch report over
1,000,000 call rows in PostgreSQL.

    python -m benchmarks.analytics [--calls 1000000] [--batches 20] [--requests 30]

Builds a throwaway database (dropped afterwards) with bulk inserts: three tenants, councils of
three members drawn from six models plus a chairman, seven ledger rows per query (three answers,
three reviews, one synthesis) spread over 30 days, every query's stored result with its reviews'
labels and rankings. Then runs the scheduler's fold over all of it (timed: the rate a backlog is
caught up at) and times, through the API app (in process, real PostgreSQL and Redis), the
30-day leaderboard of the tenant holding most of the data and the report of its largest batch.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, insert, select, text

from api.main import create_app
from benchmarks.common import ensure_redis, percentile, print_table
from shared.analytics.rollups import fold_finished
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.models import BATCHES, PROVIDER_CALLS, QUERIES, Tenant
from shared.settings import Settings
from shared.tenants import issue_key

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODELS = [f"sim:m{i}" for i in range(6)]
CHAIRMAN = "sim:chairman"
CALLS_PER_QUERY = 7
CHUNK = 5000
DAY = 86400


def council_result(rng: random.Random, members: list[str]) -> dict[str, Any]:
    reviews = []
    for reviewer in members:
        shown = [m for m in members if m != reviewer]
        rng.shuffle(shown)
        ranking = sorted(shown, key=lambda m: rng.random() - 0.15 * MODELS.index(m))
        reviews.append(
            {
                "reviewer": reviewer,
                "requested_reviewer": reviewer,
                "status": "valid",
                "text": "…",
                "labels": {f"Response {chr(65 + i)}": m for i, m in enumerate(shown)},
                "ranking": ranking,
                "error": None,
                "latency_ms": rng.randint(200, 2000),
            }
        )
    return {
        "status": "succeeded",
        "answer": "…",
        "synthesis": "chairman",
        "chairman": CHAIRMAN,
        "answered_by": CHAIRMAN,
        "members": [
            {
                "model": m,
                "requested_model": m,
                "status": "succeeded",
                "answer": "…",
                "error": None,
                "latency_ms": rng.randint(200, 3000),
                "duplicate_of": None,
            }
            for m in members
        ],
        "reviews": reviews,
        "aggregate_ranking": [],
    }


def build(url: str, calls: int, batches: int, seed: int = 17) -> tuple[str, str]:
    """Tenants, batches, queries and ledger rows; returns (API key of the main tenant, its largest batch)."""
    rng = random.Random(seed)
    engine = make_engine(url, pool_size=2)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        issued = issue_key(session, tenant_name="bench-main", role="user", tier="enterprise")
        tenants = [issued.tenant_id]
        for name in ("bench-b", "bench-c"):
            tid = f"ten_{uuid.uuid4().hex[:12]}"
            session.add(Tenant(id=tid, name=name, webhook_secret="whsec_x", created_at=0))
            tenants.append(tid)
    now = int(time.time())
    # Rounded up: at least ``calls`` ledger rows.
    per_batch = -(-calls // (CALLS_PER_QUERY * batches))
    # The main tenant holds 60% of the batches, so its leaderboard reads most of the rollups.
    owners = [tenants[0] if i < batches * 6 // 10 else tenants[1 + i % 2] for i in range(batches)]
    batch_ids = [f"batch_{uuid.uuid4().hex[:20]}" for _ in range(batches)]
    with engine.begin() as conn:
        conn.execute(
            insert(BATCHES),
            [
                {
                    "id": b,
                    "tenant_id": owners[i],
                    "status": "completed",
                    "priority": "normal",
                    "council": {},
                    "metadata": {},
                    "completion_window": "24h",
                    "endpoint": "/v1/council",
                    "total": per_batch,
                    "created_at": now - 30 * DAY,
                    "expires_at": now,
                }
                for i, b in enumerate(batch_ids)
            ],
        )
    sequence = 0
    for i, batch_id in enumerate(batch_ids):
        members_pool = MODELS[i % 3 : i % 3 + 4]
        for start in range(0, per_batch, CHUNK):
            qrows, crows = [], []
            for seq in range(start, min(start + CHUNK, per_batch)):
                sequence += 1
                qid = f"q_{sequence:012d}"
                finished = now - rng.randint(0, 30 * DAY - 1)
                members = rng.sample(members_pool, 3)
                qrows.append(
                    {
                        "id": qid,
                        "batch_id": batch_id,
                        "tenant_id": owners[i],
                        "seq": seq,
                        "custom_id": f"c-{seq}",
                        "status": "succeeded",
                        "priority": "normal",
                        "request": {"messages": [{"role": "user", "content": "q"}]},
                        "attempts": 1,
                        "circuit_waits": 0,
                        "finished_at": finished,
                        "result": council_result(rng, members),
                        "input_tokens": 700,
                        "output_tokens": 900,
                        "cost_usd": 0.002,
                        "latency_ms": rng.randint(1000, 20000),
                    }
                )
                stages = [
                    *((m, "answer") for m in members),
                    *((m, "review") for m in members),
                    (CHAIRMAN, "synthesis"),
                ]
                for model, stage in stages:
                    failed = rng.random() < 0.03
                    crows.append(
                        {
                            "query_id": qid,
                            "batch_id": batch_id,
                            "tenant_id": owners[i],
                            "model": model,
                            "stage": stage,
                            "attempt": 1,
                            "status": "failed" if failed else "succeeded",
                            "error_category": "timeout" if failed else None,
                            "latency_ms": rng.randint(100, 4000),
                            "input_tokens": 100,
                            "output_tokens": 130,
                            "cost_usd": 0.0003,
                            "created_at": finished - 5,
                        }
                    )
            with engine.begin() as conn:
                conn.execute(insert(QUERIES), qrows)
                conn.execute(insert(PROVIDER_CALLS), crows)
    engine.dispose()
    return issued.api_key, batch_ids[0]


def timed(client: TestClient, path: str, params: dict[str, Any], n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    name = f"conclave_bench_analytics_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    redis_server = ensure_redis(args.redis_url)
    try:
        upgrade(url)
        started = time.perf_counter()
        key, batch_id = build(url, args.calls, args.batches)
        build_s = time.perf_counter() - started

        engine = make_engine(url, pool_size=2)
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            call_rows = session.scalar(select(func.count()).select_from(PROVIDER_CALLS))
            query_rows = session.scalar(select(func.count()).select_from(QUERIES))
            session.execute(text("ANALYZE"))
        started = time.perf_counter()
        folded = fold_finished(sessions, settle_s=0, page=2000)
        fold_s = time.perf_counter() - started
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        engine.dispose()

        settings = Settings(
            database_url=url,
            redis_url=redis_server.url,
            queue_namespace=f"bench-ana-{uuid.uuid4().hex[:6]}",
            rate_limits_enabled=False,
            log_level="WARNING",
            _env_file=None,  # type: ignore[call-arg]
        )
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as client:
            board_params = {"from": int(time.time()) - 30 * DAY}
            board = client.get("/v1/analytics/models", params=board_params).json()["data"]
            report = client.get(f"/v1/batches/{batch_id}/report").json()
            board_ms = timed(client, "/v1/analytics/models", board_params, args.requests)
            report_ms = timed(client, f"/v1/batches/{batch_id}/report", {}, args.requests)
    finally:
        redis_server.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print_table(
        "analytics data (PostgreSQL)",
        ["what", "value"],
        [
            ("provider_calls rows", f"{call_rows:,}"),
            ("queries rows", f"{query_rows:,}"),
            ("bulk build", f"{build_s:.1f} s"),
            (
                "fold (scheduler job, from scratch)",
                f"{folded:,} queries in {fold_s:.1f} s ({folded / fold_s:,.0f}/s)",
            ),
            ("leaderboard models", len(board)),
            ("report batch queries", report["queries_folded"]),
        ],
    )
    print_table(
        f"response time over {args.requests} requests (ms)",
        ["endpoint", "p50", "p95", "max"],
        [
            (label, f"{percentile(ms, 50):.1f}", f"{percentile(ms, 95):.1f}", f"{max(ms):.1f}")
            for label, ms in (
                ("GET /v1/analytics/models (30 days)", board_ms),
                ("GET /v1/batches/{id}/report", report_ms),
            )
        ],
    )


if __name__ == "__main__":
    main()
