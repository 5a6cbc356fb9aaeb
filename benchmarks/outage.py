"""Outage benchmark (issue 14): a council batch through a long outage of the only provider of one
member, on the real stack (API, `conclave worker` pool, scheduler, Redis, two simulated providers).

    python -m benchmarks.outage                                # 2,000 queries, 10-minute outage
    python -m benchmarks.outage --queries 200 --outage-s 60    # a quick trial

The council is two members on two providers, ``p1:alpha`` and ``p2:beta`` (chairman
``p1:chairman``), with no fallbacks and the default ``min_answers`` of 2: while ``p2`` is down
no query can get its two answers, so every query that reaches stage 1 then fails behind p2's
circuit and waits for it (``workers.runner.circuit_wait``). The breakers keep their shipped
defaults (10 failures, 15 s cooldown doubling on each failed probe up to 240 s).

The outage is what a provider that is down looks like from outside: its server is stopped
``--outage-after-s`` after the POST, so calls in flight are cut and every new connection is
refused (ECONNREFUSED, no listener), and after ``--outage-s`` a fresh server starts on the same
port. The batch's completion window is 24 h.

Only queries that met the open circuit wait for it: one whose member spent its five attempts on
refused connections before enough failures had opened the circuit (the breaker needs half of the
calls started in its 10 s window to fail) fails at once with ``insufficient_answers``; the table
counts it under errors by type and by its runs.

Provider calls are counted twice: by the simulated servers (every request they received,
appended to a JSONL log file as it arrives, both lives of p2 included) and by the ledger
(``provider_calls``: a row for every attempt, sent or refused by an open circuit). A sent row
that no server logged is a connection the stopped provider refused.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import redis
from sqlalchemy import func, select
from sqlmodel import col

from benchmarks.common import (
    Stack,
    bench_env,
    bench_key,
    ensure_redis,
    print_table,
    proc_tree_sample,
    stack_parser,
)
from shared import keys
from shared.db import make_engine, make_sessionmaker
from shared.lifecycle.statuses import BATCH_TERMINAL, QueryStatus
from shared.models import ProviderCall, Query
from shared.sim import SimConfig, SimServer

SIM_KEY_ENV = "SIM_API_KEY"
POLL_S = 0.5


def providers_toml(healthy_url: str, down_url: str) -> str:
    # Breaker and timeout settings are left out on purpose: the point is the shipped defaults.
    return f"""
[providers.p1]
api = "openai"
base_url = "{healthy_url}/v1"
api_key_env = "{SIM_KEY_ENV}"

[providers.p2]
api = "openai"
base_url = "{down_url}/v1"
api_key_env = "{SIM_KEY_ENV}"

[council]
members = ["p1:alpha", "p2:beta"]
chairman = "p1:chairman"
"""


def logged_calls(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def main() -> None:
    parser = stack_parser(__doc__, latency_ms=200.0, threads=64)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--outage-s", type=float, default=600.0, help="how long p2 is down")
    parser.add_argument("--outage-after-s", type=float, default=3.0, help="seconds after the POST")
    parser.add_argument(
        "--give-up-s", type=float, default=1800.0, help="stop waiting this long after the outage ends"
    )
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    workdir = Path(tempfile.mkdtemp(prefix="conclave-outage-"))
    healthy_log, down_log = workdir / "p1.jsonl", workdir / "p2.jsonl"
    healthy = SimServer(SimConfig(latency_ms=args.latency_ms, log_limit=1, log_file=str(healthy_log))).start()
    down_config = SimConfig(latency_ms=args.latency_ms, log_limit=1, log_file=str(down_log))
    down = SimServer(down_config).start()
    down_port = down.port

    env = bench_env(redis_.url, args.database_url, healthy.url)
    providers = workdir / "providers.toml"
    providers.write_text(providers_toml(healthy.url, down.url))
    env["CONCLAVE_PROVIDERS_FILE"] = str(providers)
    env[SIM_KEY_ENV] = "sk-sim-bench"
    namespace = env["CONCLAVE_QUEUE_NAMESPACE"]
    database_url = env["CONCLAVE_DATABASE_URL"]
    key = bench_key(database_url)
    rdb = redis.Redis.from_url(redis_.url, decode_responses=True)
    stack = Stack(env=env)

    # Every opening of p2's circuit, from its shared state: (opened at, wall clock; cooldown, s).
    # A failed probe re-opens it with a new opened_at, so none is missed between two polls.
    openings: list[tuple[float, float]] = []
    closed_again = 0.0  # wall clock of the first poll that found it closed after an opening
    max_failed_during = 0
    outage_began = outage_ended = 0.0  # wall clock
    finished = False
    try:
        url = stack.start_api()
        pool = stack.start_workers(processes=args.processes, threads=args.threads)
        stack.start_scheduler()
        time.sleep(3)  # let the worker processes import and connect before the clock starts
        before = proc_tree_sample(pool.pid)
        body = {
            "queries": [
                {"custom_id": f"o-{i}", "prompt": f"Outage question {i}?"} for i in range(args.queries)
            ],
            "completion_window": "24h",
        }
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
            submitted = time.time()
            response = client.post("/v1/batches", json=body)
            response.raise_for_status()
            batch_id = response.json()["id"]
            peak_rss = 0.0
            while True:
                now = time.time()
                if not outage_began and now - submitted >= args.outage_after_s:
                    down.stop()
                    outage_began = time.time()
                    print(f"outage began {outage_began - submitted:.1f} s after the POST", flush=True)
                if outage_began and not outage_ended and now - outage_began >= args.outage_s:
                    down = SimServer(down_config, port=down_port).start()
                    outage_ended = time.time()
                    print(f"provider p2 back after {outage_ended - outage_began:.1f} s", flush=True)
                batch = client.get(f"/v1/batches/{batch_id}").json()
                counts = batch["request_counts"]
                peak_rss = max(peak_rss, proc_tree_sample(pool.pid).rss_mb)
                if outage_began:
                    state, opened_ms, cooldown_ms = (
                        str(v or 0)
                        for v in rdb.hmget(keys.breaker(namespace, "p2"), ["state", "opened_at", "cooldown"])
                    )
                    opened = float(opened_ms) / 1000
                    if state == "open" and (not openings or openings[-1][0] != opened):
                        openings.append((opened, float(cooldown_ms) / 1000))
                        print(
                            f"t+{opened - outage_began:.1f} s: p2 circuit opened for {openings[-1][1]:g} s; "
                            f"{counts['completed']} succeeded, {counts['failed']} failed",
                            flush=True,
                        )
                    if state == "closed" and openings and not closed_again:
                        closed_again = time.time()
                        print(f"t+{closed_again - outage_began:.1f} s: p2 circuit closed", flush=True)
                    if not outage_ended:
                        max_failed_during = max(max_failed_during, counts["failed"])
                if batch["status"] in BATCH_TERMINAL:
                    finished = True
                    break
                broken = stack.dead()
                if broken:
                    print(f"stack broke: {broken}", flush=True)
                    break
                if outage_ended and now - outage_ended > args.give_up_s:
                    break
                time.sleep(POLL_S)
            batch_done = time.time()
            makespan = batch_done - submitted
            records = [
                orjson.loads(line)
                for line in client.get(f"/v1/batches/{batch_id}/results").content.splitlines()
            ]
        after = proc_tree_sample(pool.pid)
    finally:
        stack.stop()
        down.stop()
        healthy.stop()
        rdb.close()

    engine = make_engine(database_url, pool_size=1)
    with make_sessionmaker(engine)() as session:
        runs = session.execute(
            select(
                col(Query.attempts), col(Query.circuit_waits), col(Query.status), col(Query.finished_at)
            ).where(col(Query.batch_id) == batch_id)
        ).all()
        last_finished = session.scalar(
            select(func.max(Query.finished_at)).where(col(Query.batch_id) == batch_id)
        )
        grouping = (
            col(ProviderCall.model),
            col(ProviderCall.status),
            col(ProviderCall.error_category),
            col(ProviderCall.call_key).is_not(None),
        )
        ledger = session.execute(
            select(*grouping, func.count()).where(col(ProviderCall.batch_id) == batch_id).group_by(*grouping)
        ).all()
    engine.dispose()
    redis_.stop()

    statuses = Counter(r["status"] for r in records)
    first_error = next((r["error"]["message"][:160] for r in records if r.get("error")), "none")
    error_types = Counter(
        (r.get("error") or {}).get("type", "?") for r in records if r["status"] != QueryStatus.SUCCEEDED
    )
    waited = [(attempts, waits) for attempts, waits, _, _ in runs if waits > 0]
    failed_runs = Counter(
        f"{a} run(s), {w} circuit wait(s)" for a, w, status, _ in runs if status == QueryStatus.FAILED
    )
    sent: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    by_outcome: Counter[str] = Counter()
    for model, status, category, was_sent, n in ledger:
        provider = model.partition(":")[0]
        (sent if was_sent else refused)[provider] += n
        by_outcome[f"{status}" + (f" {category}" if category else "")] += n
    logged = {"p1": logged_calls(healthy_log), "p2": logged_calls(down_log)}
    cpu = after.cpu_s - before.cpu_s
    not_done = args.queries - statuses[QueryStatus.SUCCEEDED] - statuses[QueryStatus.FAILED]

    rows: list[list[object]] = [
        [
            "succeeded / failed",
            f"{statuses[QueryStatus.SUCCEEDED]:,} / {statuses[QueryStatus.FAILED]:,} of {args.queries:,}",
        ],
        ["batch status", batch["status"] if finished else f"{batch['status']} (not finished: gave up)"],
        ["errors by type", ", ".join(f"{k} {v}" for k, v in error_types.most_common()) or "none"],
        ["failed while p2 was down (peak count)", max_failed_during],
        ["failed for the circuit (circuit_open)", error_types["circuit_open"]],
        ["queries not finished", not_done],
        [
            "failed queries by runs",
            ", ".join(f"{v} with {k}" for k, v in failed_runs.most_common()) or "none",
        ],
        ["first failure message", first_error],
        ["outage", f"{outage_ended - outage_began:.0f} s" if outage_ended else "not ended"],
        [
            "p2 circuit opened (s after outage start: cooldown)",
            ", ".join(f"{at - outage_began:.0f}: {cooldown:g} s" for at, cooldown in openings) or "never",
        ],
        [
            "p2 circuit closed again",
            f"{closed_again - outage_began:.0f} s after outage start, {closed_again - outage_ended:.0f} s "
            "after its end"
            if closed_again and outage_ended
            else "not seen",
        ],
        [
            "outage end → last query done",
            f"{last_finished - outage_ended:.0f} s" if last_finished and outage_ended else "n/a",
        ],
        ["outage end → batch completed", f"{batch_done - outage_ended:.0f} s" if outage_ended else "n/a"],
        ["makespan", f"{makespan:.0f} s"],
        [
            "queries that waited behind the circuit",
            f"{len(waited):,} of {len(runs):,}",
        ],
        [
            "runs of a waiting query (median / max)",
            f"{statistics.median(a for a, _ in waited):.0f} / {max(a for a, _ in waited)}"
            if waited
            else "n/a",
        ],
        [
            "circuit waits of a waiting query (median / max)",
            f"{statistics.median(w for _, w in waited):.0f} / {max(w for _, w in waited)}"
            if waited
            else "n/a",
        ],
        ["runs, all queries", f"{sum(a for a, *_ in runs):,}"],
        ["calls the sim logged (p1 / p2)", f"{logged['p1']:,} / {logged['p2']:,}"],
        ["ledger rows sent (p1 / p2)", f"{sent['p1']:,} / {sent['p2']:,}"],
        ["ledger rows refused by an open circuit (p1 / p2)", f"{refused['p1']:,} / {refused['p2']:,}"],
        [
            "p2 sent rows no server logged (connection refused)",
            f"{sent['p2'] - logged['p2']:,}",
        ],
        ["ledger rows by outcome", ", ".join(f"{k} {v:,}" for k, v in by_outcome.most_common())],
        ["worker CPU total", f"{cpu:.1f} s"],
        ["worker CPU per sent call", f"{cpu / max(sum(sent.values()), 1) * 1000:.2f} ms"],
        ["worker peak RSS (all processes)", f"{peak_rss:.0f} MB"],
    ]
    print_table(
        f"Outage: {args.queries:,} council queries (p1:alpha + p2:beta, min_answers 2), p2 down "
        f"{args.outage_s:g} s from {args.outage_after_s:g} s after the POST, sim latency "
        f"{args.latency_ms:g} ms, {args.processes} worker processes × {args.threads} threads, window 24 h",
        ["measure", "value"],
        rows,
    )


if __name__ == "__main__":
    main()
