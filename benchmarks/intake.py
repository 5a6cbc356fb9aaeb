"""Intake benchmark: time to 202 for a 10,000-query batch (persisted and enqueued), and latency
of 100-query POSTs under concurrent load, against a real API process on real Redis.

    python -m benchmarks.intake [--runs 5] [--size 10000] [--concurrency 8] [--api-workers 2]
                                [--postgres | --database-url URL]

``--postgres`` runs against a throwaway PostgreSQL database (created on the local server and
dropped afterwards); the default is a new SQLite file. No workers run, so every message the API
enqueued is still in Redis (in its fair lane, its body in the queue's message hash) and is counted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import redis
from sqlalchemy import create_engine, text

from benchmarks.common import (
    Stack,
    bench_env,
    bench_key,
    clear_namespace,
    ensure_redis,
    median,
    percentile,
    print_table,
    proc_tree_sample,
)
from shared import keys

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """A new, empty database on the local PostgreSQL server, dropped afterwards."""
    name = f"conclave_bench_{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def database_arg(args: argparse.Namespace, prefix: str) -> Iterator[str | None]:
    """The database a benchmark runs on: ``--database-url``, a throwaway one (``--postgres``),
    or None (bench_env's new SQLite file)."""
    if args.postgres:
        with throwaway_postgres(prefix) as url:
            yield url
    else:
        yield args.database_url


def add_database_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--database-url", default=None)
    group.add_argument("--postgres", action="store_true", help="a throwaway database on local PostgreSQL")


def batch_body(size: int, tag: str) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "queries": [
                {"custom_id": f"{tag}-{i}", "prompt": f"Benchmark question {i}: what is {i} squared?"}
                for i in range(size)
            ]
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--small-posts", type=int, default=400, help="small POSTs for the latency test")
    parser.add_argument("--concurrency", type=int, default=8, help="clients posting small batches")
    parser.add_argument("--small-size", type=int, default=100, help="queries per small POST")
    parser.add_argument(
        "--api-workers", type=int, default=2, help="uvicorn worker processes (the Procfile's default)"
    )
    add_database_args(parser)
    args = parser.parse_args()
    for database_url in database_arg(args, "intake"):
        run(args, database_url)


def run(args: argparse.Namespace, database_url: str | None) -> None:
    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    env = bench_env(redis_.url, database_url)
    db = env["CONCLAVE_DATABASE_URL"]
    key = bench_key(db)
    stack = Stack(env=env)
    rdb = redis.Redis.from_url(redis_.url)
    namespace = env["CONCLAVE_QUEUE_NAMESPACE"]
    # Every enqueued message's body is in the queue's hash, whether it waits in a lane or on the list.
    bodies_key = keys.queue_messages(namespace, "normal")
    try:
        url = stack.start_api(workers=args.api_workers)
        api_pid = stack.procs[0].pid
        headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        limits = httpx.Limits(
            max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2
        )
        with httpx.Client(base_url=url, headers=headers, timeout=120, limits=limits) as client:
            # Warm every API process (imports, pools, scripts) before anything is timed.
            for i in range(4 * args.api_workers):
                client.post("/v1/batches", content=batch_body(10, f"warm{i}")).raise_for_status()
            timings = []
            loads = []
            cpu_before = proc_tree_sample(api_pid)
            for run_no in range(args.runs):
                body = batch_body(args.size, f"r{run_no}")
                depth_before = rdb.hlen(bodies_key)
                loads.append(os.getloadavg()[0])
                started = time.perf_counter()
                response = client.post("/v1/batches", content=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                enqueued = rdb.hlen(bodies_key) - depth_before
                assert enqueued == args.size, f"only {enqueued} of {args.size} messages enqueued"
                timings.append(elapsed)
            cpu_after = proc_tree_sample(api_pid)
            cpu_per_batch = (cpu_after.cpu_s - cpu_before.cpu_s) / args.runs

            # Latency of small (100-query) POSTs with several clients at once.
            bodies = [batch_body(args.small_size, f"s{i}") for i in range(args.small_posts)]

            def post(b: bytes) -> float:
                t = time.perf_counter()
                client.post("/v1/batches", content=b).raise_for_status()
                return (time.perf_counter() - t) * 1000

            cpu_before = proc_tree_sample(api_pid)
            loads.append(os.getloadavg()[0])
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                small = list(pool.map(post, bodies))
            small_wall = time.perf_counter() - started
            small_cpu_ms = (proc_tree_sample(api_pid).cpu_s - cpu_before.cpu_s) / len(bodies) * 1000
            rss = proc_tree_sample(api_pid).rss_mb
        loads.append(os.getloadavg()[0])
        stored = None
        engine = create_engine(db)
        with engine.connect() as conn:
            stored = conn.execute(text("select count(*) from queries")).scalar()
        engine.dispose()
    finally:
        stack.stop()
        clear_namespace(rdb, namespace)
        redis_.stop()

    med = median(timings)
    n = args.small_size
    print_table(
        f"Intake: {args.size:,}-query POST → 202 (persisted + enqueued), {args.runs} runs; "
        f"DB {'SQLite' if db.startswith('sqlite') else 'PostgreSQL'}, Redis {redis_.kind}, "
        f"{args.api_workers} API process{'es' if args.api_workers > 1 else ''}",
        ["measure", "value"],
        [
            ["median time to 202", f"{med:.3f} s"],
            ["min / max", f"{min(timings):.3f} s / {max(timings):.3f} s"],
            ["queries accepted per second (median)", f"{args.size / med:,.0f}"],
            ["API CPU per 10k batch", f"{cpu_per_batch:.3f} s"],
            [f"{n}-query POST p50 ({args.concurrency} clients)", f"{percentile(small, 50):.1f} ms"],
            [f"{n}-query POST p99", f"{percentile(small, 99):.1f} ms"],
            [f"{n}-query POSTs per second", f"{len(small) / small_wall:.0f}"],
            [f"API CPU per {n}-query POST", f"{small_cpu_ms:.1f} ms"],
            ["API RSS after", f"{rss:.0f} MB"],
            ["query rows stored", stored if stored is not None else "n/a"],
            ["load average (1 min) during", " / ".join(f"{x:.1f}" for x in loads)],
        ],
    )


if __name__ == "__main__":
    main()
