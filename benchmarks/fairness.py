"""Fairness benchmark (SPEC §15): tenants at one priority sharing the workers, on the real stack
(API, `conclave worker` pools as the Procfile ships them, Redis, simulated provider).

    python -m benchmarks.fairness                   # 50 behind 3,000 at 1 s; shares 1:1:2
    python -m benchmarks.fairness --backlog 1000 --share-queries 600     # a quicker trial

1. **Behind a backlog**: tenant B's 50-query batch alone (idle system), then sent 3 s after
   tenant A's 3,000-query batch at the same priority. Target: B's loaded makespan within 2× its
   idle one. With one FIFO queue per priority B waited for all of A's queries (17.1×).
2. **Weighted shares**: three tenants of weights 1, 1 and 2 (their ``limits.weight``), each with
   a backlog; once the workers are saturated, their running queries are sampled for
   ``--share-seconds`` (from one council's time after the first wave, which the first tenant
   posted took alone). Target: each one's mean share within ±10 % of 25 / 25 / 50 %.

Makespan runs from the POST to the poll that sees the batch ``completed``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import httpx
import orjson
import redis

from benchmarks.common import (
    Stack,
    bench_env,
    bench_key,
    clear_namespace,
    ensure_redis,
    percentile,
    print_table,
    stack_parser,
)
from shared.sim import SimConfig, SimServer

TERMINAL = ("completed", "failed", "cancelled", "expired")


def tenant_key(database_url: str, weight: float) -> str:
    """A key of a new enterprise tenant whose share weight is ``weight``."""
    from sqlalchemy import update
    from sqlmodel import col

    from shared.db import make_engine, make_sessionmaker
    from shared.models import Tenant
    from shared.tenants import issue_key

    with make_sessionmaker(make_engine(database_url, pool_size=1)).begin() as session:
        issued = issue_key(
            session, tenant_name=f"fair-{uuid.uuid4().hex[:6]}", role="user", tier="enterprise"
        )
        session.execute(
            update(Tenant).where(col(Tenant.id) == issued.tenant_id).values(limits={"weight": weight})
        )
        return issued.api_key


def body(size: int, tag: str) -> bytes:
    return orjson.dumps(
        {
            "queries": [
                {"custom_id": f"{tag}-{i}", "prompt": f"Fairness question {i}?"} for i in range(size)
            ],
            "metadata": {"benchmark": "fairness", "run": tag},
        }
    )


def post(client: httpx.Client, key: str, size: int, tag: str) -> str:
    response = client.post(
        "/v1/batches",
        content=body(size, tag),
        headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    response.raise_for_status()
    return str(response.json()["id"])


def batch(client: httpx.Client, key: str, batch_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def running(client: httpx.Client, tenants: list[tuple[str, float]], ids: list[str]) -> list[int]:
    return [
        int(batch(client, key, bid)["request_counts"]["running"])
        for (key, _), bid in zip(tenants, ids, strict=True)
    ]


def wait_done(client: httpx.Client, key: str, batch_id: str, started: float, timeout: float) -> float:
    while True:
        now = time.perf_counter() - started
        if batch(client, key, batch_id)["status"] in TERMINAL:
            return now
        if now > timeout:
            raise TimeoutError(f"batch {batch_id} not finished after {timeout:g}s")
        time.sleep(0.1)


def cancel(client: httpx.Client, key: str, batch_id: str) -> None:
    client.post(f"/v1/batches/{batch_id}/cancel", headers={"Authorization": f"Bearer {key}"})


def main() -> None:
    # The defaults are the Procfile's `worker` pool (2 processes × 64 threads).
    parser = stack_parser(__doc__, latency_ms=1000.0, threads=64)
    parser.add_argument("--backlog", type=int, default=3000, help="tenant A's queries")
    parser.add_argument("--small", type=int, default=50, help="tenant B's queries")
    parser.add_argument("--delay", type=float, default=3.0, help="seconds between A's POST and B's")
    parser.add_argument("--share-queries", type=int, default=1500, help="each weighted tenant's backlog")
    parser.add_argument("--share-seconds", type=float, default=20.0)
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    sim = SimServer(SimConfig(latency_ms=args.latency_ms, log_limit=1000)).start()
    env = bench_env(redis_.url, args.database_url, sim.url)
    db = env["CONCLAVE_DATABASE_URL"]
    bench_key(db)  # brings the schema up
    a, b = tenant_key(db, 1), tenant_key(db, 1)
    weighted: list[tuple[str, float]] = [(tenant_key(db, w), w) for w in (1.0, 1.0, 2.0)]
    stack = Stack(env=env)
    timeout = 120 + 10 * args.backlog * args.latency_ms / 1000 / max(1, args.processes * args.threads)
    samples: list[list[int]] = []
    try:
        url = stack.start_api()
        stack.start_workers(processes=args.processes, threads=args.threads, queues=("normal", "high"))
        with httpx.Client(base_url=url, timeout=300) as client:
            time.sleep(3)  # let the worker processes import and connect before the clock starts
            warm = post(client, b, args.small, "warm")
            wait_done(client, b, warm, time.perf_counter(), timeout)
            started = time.perf_counter()
            idle_id = post(client, b, args.small, "idle")
            idle = wait_done(client, b, idle_id, started, timeout)

            started = time.perf_counter()
            backlog_id = post(client, a, args.backlog, "backlog")
            time.sleep(args.delay)  # the scenario: B arrives this long after A
            b_started = time.perf_counter()
            loaded_id = post(client, b, args.small, "loaded")
            loaded = wait_done(client, b, loaded_id, b_started, timeout)
            a_counts = batch(client, a, backlog_id)["request_counts"]
            cancel(client, a, backlog_id)
            wait_done(client, a, backlog_id, started, timeout)

            # Weighted shares: every tenant backlogged, the workers saturated.
            ids = [post(client, key, args.share_queries, f"share-{i}") for i, (key, _) in enumerate(weighted)]
            slots = args.processes * args.threads
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                if sum(running(client, weighted, ids)) >= 0.9 * slots:
                    break
                time.sleep(0.2)
            # The first tenant's batch took the idle slots before the others were posted; those
            # queries end one council (3 rounds) later, and from then on every slot that frees up
            # is shared by weight. Sampling starts after that first wave.
            time.sleep(3 * args.latency_ms / 1000 + 1)
            end = time.perf_counter() + args.share_seconds
            while time.perf_counter() < end:
                now_running = running(client, weighted, ids)
                if sum(now_running):
                    samples.append(now_running)
                time.sleep(0.25)
            for (key, _), bid in zip(weighted, ids, strict=True):
                cancel(client, key, bid)
            if (why := stack.dead()) is not None:
                raise RuntimeError(why)
            loadavg = os.getloadavg()
    except BaseException:
        print(stack.log_text())
        raise
    finally:
        stack.stop()
        clear_namespace(redis.Redis.from_url(redis_.url), env["CONCLAVE_QUEUE_NAMESPACE"])
        sim.stop()
        redis_.stop()

    ratio = loaded / idle
    db_kind = "SQLite" if db.startswith("sqlite") else "PostgreSQL"
    print_table(
        f"Fairness: tenant B's {args.small} queries alone, then {args.delay:g} s behind tenant A's "
        f"{args.backlog:,} (same priority); sim latency {args.latency_ms:g} ms; `worker` pool "
        f"{args.processes} × {args.threads} threads; DB {db_kind}; "
        f"load average {loadavg[0]:.1f}",
        ["measure", "value"],
        [
            ["B makespan, idle system", f"{idle:.2f} s"],
            ["B makespan, behind A's backlog", f"{loaded:.2f} s"],
            ["loaded / idle", f"{ratio:.2f} (target ≤ 2)"],
            [
                "A finished when B was done",
                f"{a_counts['total'] - a_counts['queued'] - a_counts['running']:,} of {a_counts['total']:,}",
            ],
        ],
    )
    total = [sum(s) for s in samples]
    rows = []
    weight_sum = sum(w for _, w in weighted)
    for i, (_, w) in enumerate(weighted):
        shares = [s[i] / t for s, t in zip(samples, total, strict=True)]
        mean = sum(shares) / len(shares) if shares else float("nan")
        target = w / weight_sum
        rows.append(
            [
                f"tenant {i + 1} (weight {w:g})",
                f"{target:.0%}",
                f"{mean:.1%}",
                f"{percentile(shares, 5):.1%} – {percentile(shares, 95):.1%}",
                f"{(mean - target) / target:+.1%}",
            ]
        )
    print_table(
        f"Weighted shares of running queries: {len(samples)} samples over {args.share_seconds:g} s "
        f"(from one council after the first wave), "
        f"mean {sum(total) / max(1, len(total)):.0f} running (slots {args.processes * args.threads})",
        ["tenant", "target", "mean share", "p5 – p95", "off target (±10 %)"],
        rows,
    )


if __name__ == "__main__":
    main()
