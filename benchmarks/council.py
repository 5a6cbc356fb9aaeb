"""Council throughput benchmark: worker CPU per provider call, calls in flight, makespan against
the ideal, worker memory, on the real stack (API, dramatiq workers, Redis, simulated provider).

    python -m benchmarks.council --queries 2000 --latency-ms 0            # overhead per call
    python -m benchmarks.council --queries 5000 --latency-ms 2000 --threads 256   # concurrency

The ideal makespan for a council (three sequential rounds: answers, reviews, synthesis) is
ceil(N / in_flight) × 3 × latency, with in_flight = processes × threads.
"""

from __future__ import annotations

import math
import os
import time

import httpx

from benchmarks.common import (
    Stack,
    bench_env,
    bench_key,
    ensure_redis,
    percentile,
    print_table,
    proc_tree_sample,
    stack_parser,
)
from shared.sim import SimConfig, SimServer


def main() -> None:
    parser = stack_parser(__doc__, latency_ms=0.0, threads=64)
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    sim = SimServer(SimConfig(latency_ms=args.latency_ms, log_limit=1000)).start()
    env = bench_env(redis_.url, args.database_url, sim.url)
    env["CONCLAVE_LOG_LEVEL"] = "WARNING"
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    try:
        url = stack.start_api()
        pool = stack.start_workers(processes=args.processes, threads=args.threads)
        time.sleep(3)  # let the worker processes import and connect before the clock starts
        httpx.delete(f"{sim.url}/_sim/stats")
        before = proc_tree_sample(pool.pid)
        body = {
            "queries": [
                {"custom_id": f"b-{i}", "prompt": f"Benchmark question {i}?"} for i in range(args.queries)
            ]
        }
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            started = time.perf_counter()
            batch_id = client.post("/v1/batches", json=body).json()["id"]
            peak_rss = 0.0
            while True:
                batch = client.get(f"/v1/batches/{batch_id}").json()
                peak_rss = max(peak_rss, proc_tree_sample(pool.pid).rss_mb)
                if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                time.sleep(0.5)
            makespan = time.perf_counter() - started
            latencies = [
                r["latency_ms"]
                for r in map(
                    __import__("orjson").loads,
                    client.get(f"/v1/batches/{batch_id}/results").content.splitlines(),
                )
            ]
        after = proc_tree_sample(pool.pid)
        stats = httpx.get(f"{sim.url}/_sim/stats").json()
    finally:
        stack.stop()
        sim.stop()
        redis_.stop()

    calls = stats["requests"]
    in_flight = args.processes * args.threads
    ideal = math.ceil(args.queries / in_flight) * 3 * args.latency_ms / 1000
    cpu = after.cpu_s - before.cpu_s
    print_table(
        f"Council batch: {args.queries:,} queries × 7 calls, sim latency {args.latency_ms:g} ms, "
        f"{args.processes} worker processes × {args.threads} threads",
        ["measure", "value"],
        [
            ["succeeded", f"{batch['request_counts']['completed']:,} / {args.queries:,}"],
            ["provider calls", f"{calls:,}"],
            ["makespan", f"{makespan:.1f} s"],
            ["ideal makespan", f"{ideal:.1f} s" if ideal else "n/a (latency 0)"],
            ["makespan / ideal", f"{makespan / ideal:.2f}" if ideal else "n/a"],
            ["queries per second", f"{args.queries / makespan:,.0f}"],
            # At zero latency the simulated provider answers before the next call arrives.
            ["peak provider calls in flight", stats["max_in_flight"] if args.latency_ms else "n/a"],
            # Stages 1 and 2 make three calls per query at once.
            [
                "peak queries in flight per worker process",
                f"{stats['max_in_flight'] / 3 / args.processes:.0f}" if args.latency_ms else "n/a",
            ],
            ["worker CPU per provider call", f"{cpu / max(calls, 1) * 1000:.2f} ms"],
            ["worker CPU total", f"{cpu:.1f} s"],
            ["worker peak RSS (all processes)", f"{peak_rss:.0f} MB"],
            [
                "query latency p50 / p99",
                f"{percentile(latencies, 50):.0f} / {percentile(latencies, 99):.0f} ms",
            ],
        ],
    )


if __name__ == "__main__":
    main()
