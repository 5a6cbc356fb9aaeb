"""Exact-cache benchmark (SPEC §14): the same council batch submitted twice with
``cache: "exact"`` on the real stack (API, dramatiq workers, Redis, simulated provider). Reports
both makespans, the speed-up, the provider calls each run made (from the simulated provider's
log), and the second run's ``cost_saved_usd`` against the first run's cost.

    python -m benchmarks.cache --queries 1000 --latency-ms 500

The models are priced (a providers file of its own) so that what the cache saves is a real amount.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Stack, bench_env, bench_key, ensure_redis, print_table, stack_parser
from shared.sim import SimConfig, SimServer

PRICES = {"alpha": (1.0, 2.0), "beta": (3.0, 5.0), "gamma": (0.5, 0.5), "chairman": (2.0, 4.0)}


def providers_file(sim_url: str) -> Path:
    models = "\n".join(
        f'[models."sim:{name}"]\ninput_usd_per_mtok = {i}\noutput_usd_per_mtok = {o}\n'
        for name, (i, o) in PRICES.items()
    )
    path = Path(tempfile.mkdtemp(prefix="conclave-bench-cache-")) / "providers.toml"
    path.write_text(
        f'[providers.sim]\napi = "openai"\nbase_url = "{sim_url}/v1"\nmax_concurrency = 512\n\n{models}\n'
        '[council]\nmembers = ["sim:alpha", "sim:beta", "sim:gamma"]\nchairman = "sim:chairman"\n'
    )
    return path


def run_batch(client: httpx.Client, body: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    batch_id = client.post("/v1/batches", json=body).json()["id"]
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled", "expired"):
            return batch, time.perf_counter() - started
        time.sleep(0.1)


def sim_calls(sim_url: str) -> int:
    return int(httpx.get(f"{sim_url}/_sim/stats").json()["requests"])


def main() -> None:
    parser = stack_parser(__doc__, latency_ms=500.0, threads=128)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    sim = SimServer(SimConfig(latency_ms=args.latency_ms, log_limit=1000)).start()
    env = bench_env(redis_.url, args.database_url, sim.url)
    env["CONCLAVE_PROVIDERS_FILE"] = str(providers_file(sim.url))
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    body = {
        "queries": [
            {"custom_id": f"b-{i}", "prompt": f"Benchmark question {i}?"} for i in range(args.queries)
        ],
        "cache": "exact",
    }
    try:
        url = stack.start_api()
        stack.start_workers(processes=args.processes, threads=args.threads)
        time.sleep(3)  # let the worker processes import and connect before the clock starts
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            httpx.delete(f"{sim.url}/_sim/stats")
            first, first_s = run_batch(client, body)
            first_calls = sim_calls(sim.url)
            second, second_s = run_batch(client, body)
            second_calls = sim_calls(sim.url) - first_calls
    finally:
        stack.stop()
        sim.stop()
        redis_.stop()

    print_table(
        f"Exact cache: {args.queries:,} council queries twice, sim latency {args.latency_ms:g} ms, "
        f"{args.processes} worker processes × {args.threads} threads",
        ["measure", "first run", "second run"],
        [
            [
                "succeeded",
                f"{first['request_counts']['completed']:,}",
                f"{second['request_counts']['completed']:,}",
            ],
            ["makespan", f"{first_s:.2f} s", f"{second_s:.2f} s"],
            ["speed-up", "", f"{first_s / second_s:.1f}×"],
            ["provider calls (simulated provider's count)", f"{first_calls:,}", f"{second_calls:,}"],
            ["cache hits", f"{first['cache_hits']:,}", f"{second['cache_hits']:,}"],
            ["cost_usd", f"{first['cost_usd']:.6f}", f"{second['cost_usd']:.6f}"],
            ["cost_saved_usd", f"{first['cost_saved_usd']:.6f}", f"{second['cost_saved_usd']:.6f}"],
        ],
    )


if __name__ == "__main__":
    main()
