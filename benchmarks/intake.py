"""Intake benchmark: time to 202 for a 10,000-query batch (persisted and enqueued), and latency
of 100-query POSTs under concurrent load, against a real API process on real Redis.

    python -m benchmarks.intake [--runs 5] [--size 10000] [--concurrency 4] [--api-workers 2]
                                [--database-url URL]

No workers run, so every message the API enqueued is still in Redis and is counted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sqlite3
import time

import httpx
import redis

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
    parser.add_argument("--small-posts", type=int, default=300, help="100-query POSTs for the latency test")
    parser.add_argument("--concurrency", type=int, default=4, help="clients posting 100-query batches")
    parser.add_argument(
        "--api-workers", type=int, default=2, help="uvicorn worker processes (the Procfile's default)"
    )
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    env = bench_env(redis_.url, args.database_url)
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    rdb = redis.Redis.from_url(redis_.url)
    namespace = env["CONCLAVE_QUEUE_NAMESPACE"]
    try:
        url = stack.start_api(workers=args.api_workers)
        api_pid = stack.procs[0].pid
        headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            client.post("/v1/batches", content=batch_body(10, "warm")).raise_for_status()
            timings = []
            cpu_before = proc_tree_sample(api_pid)
            for run in range(args.runs):
                body = batch_body(args.size, f"r{run}")
                depth_before = rdb.llen(f"{namespace}:normal")
                started = time.perf_counter()
                response = client.post("/v1/batches", content=body)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                enqueued = rdb.llen(f"{namespace}:normal") - depth_before
                assert enqueued == args.size, f"only {enqueued} of {args.size} messages enqueued"
                timings.append(elapsed)
            cpu_after = proc_tree_sample(api_pid)
            cpu_per_batch = (cpu_after.cpu_s - cpu_before.cpu_s) / args.runs

            # Latency of 100-query POSTs with several clients at once.
            bodies = [batch_body(100, f"s{i}") for i in range(args.small_posts)]

            def post(b: bytes) -> float:
                t = time.perf_counter()
                client.post("/v1/batches", content=b).raise_for_status()
                return (time.perf_counter() - t) * 1000

            cpu_before = proc_tree_sample(api_pid)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                small = list(pool.map(post, bodies))
            small_wall = time.perf_counter() - started
            small_cpu_ms = (proc_tree_sample(api_pid).cpu_s - cpu_before.cpu_s) / len(bodies) * 1000
            rss = proc_tree_sample(api_pid).rss_mb
        db = env["CONCLAVE_DATABASE_URL"]
        stored = None
        if db.startswith("sqlite:///"):
            with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
                stored = conn.execute("select count(*) from queries").fetchone()[0]
    finally:
        stack.stop()
        clear_namespace(rdb, namespace)
        redis_.stop()

    med = median(timings)
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
            [f"100-query POST p50 ({args.concurrency} clients)", f"{percentile(small, 50):.1f} ms"],
            ["100-query POST p99", f"{percentile(small, 99):.1f} ms"],
            ["100-query POSTs per second", f"{len(small) / small_wall:.0f}"],
            ["API CPU per 100-query POST", f"{small_cpu_ms:.1f} ms"],
            ["API RSS after", f"{rss:.0f} MB"],
            ["query rows stored", stored if stored is not None else "n/a"],
        ],
    )


if __name__ == "__main__":
    main()
