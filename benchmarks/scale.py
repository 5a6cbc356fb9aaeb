"""Scale benchmark (issue 15 done-when 6): reading a running 50,000-query batch, listing 20
large batches and downloading a batch's results, with 1,000,000 finished queries in PostgreSQL.

    python -m benchmarks.scale [--finished 1000000] [--batch-size 50000] [--requests 200]

Builds a throwaway database (dropped afterwards) with COPY: ``finished / batch_size`` completed
batches of succeeded queries, and one ``in_progress`` batch of ``batch_size`` queries, half of
them succeeded, 1,000 running, the rest queued. The batches whose results are downloaded hold
council results of a real size (about 9 KB: three members' answers, their reviews, the
synthesis), the others small ones (about 1.6 KB). While it is timed, a writer thread keeps that
batch moving through the real transitions (``claim_queries``, ``record_outcomes``: about 200
queries a second), as workers would. The API
runs as its own process (``conclave api``, one worker) so its RSS is its own; the results are
downloaded over HTTP with a streaming client, RSS sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import threading
import time
import uuid
from typing import Any

import httpx
import orjson
from sqlalchemy import create_engine, func, select, text

from benchmarks.common import Stack, bench_env, ensure_redis, percentile, print_table, proc_tree_sample
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.lifecycle import transitions
from shared.models import BATCHES, QUERIES
from shared.tenants import issue_key

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RUNNING = 1000
COPY_COLUMNS = (
    "id",
    "batch_id",
    "tenant_id",
    "seq",
    "custom_id",
    "status",
    "priority",
    "request",
    "worker_id",
    "lease_expires_at",
    "attempts",
    "circuit_waits",
    "started_at",
    "finished_at",
    "result",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
)


_TEXT = (
    "the council weighs each answer against the question and its sources before it ranks them "
    "evidence suggests a careful reading of terms conditions and likely outcomes matters most "
    "however another member disagrees citing cost latency accuracy and the risk of overreach"
)
WORDS = _TEXT.split()


def prose(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    n = 0
    while n < chars:
        words.append(rng.choice(WORDS))
        n += len(words[-1]) + 1
    return " ".join(words)


def council_result(rng: random.Random, full: bool) -> dict[str, Any]:
    """A stored council result: ``full`` with answers and reviews of realistic length (about
    9 KB, as a real provider's answers make it), else a small one (about 1.6 KB)."""
    members = [f"sim:m{i}" for i in range(3)]
    answer, member_answer, review = (1500, 1500, 800) if full else (300, 100, 20)
    return {
        "status": "succeeded",
        "answer": prose(rng, answer),
        "synthesis": "chairman",
        "chairman": "sim:chairman",
        "answered_by": "sim:chairman",
        "members": [
            {
                "model": m,
                "requested_model": m,
                "status": "succeeded",
                "answer": prose(rng, member_answer),
                "error": None,
                "latency_ms": 900,
                "duplicate_of": None,
            }
            for m in members
        ],
        "reviews": [
            {"reviewer": m, "status": "valid", "ranking": members, "text": prose(rng, review)}
            for m in members
        ],
        "aggregate_ranking": [{"model": m, "mean_rank": i + 1.0, "votes": 2} for i, m in enumerate(members)],
        "citations": [],
    }


def _copy_cell(value: Any) -> str:
    if value is None:
        return "\\N"
    s = str(value)
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def copy_queries(engine: Any, rows: Any) -> int:
    """COPY query rows (tuples in ``COPY_COLUMNS`` order) in 20,000-row chunks; returns how many."""
    n = 0
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        buf = io.StringIO()
        chunk = 0

        def flush() -> None:
            with cur.copy(f"COPY queries ({', '.join(COPY_COLUMNS)}) FROM STDIN") as copy:
                copy.write(buf.getvalue())
            raw.commit()
            buf.seek(0)
            buf.truncate()

        for row in rows:
            buf.write("\t".join(map(_copy_cell, row)))
            buf.write("\n")
            n += 1
            chunk += 1
            if chunk == 20_000:
                flush()
                chunk = 0
        if chunk:
            flush()
    finally:
        raw.close()
    return n


def build(url: str, finished: int, batch_size: int) -> tuple[str, str, list[str], str]:
    """Returns (API key, tenant id, completed batch ids, the running batch's id)."""
    engine = make_engine(url, pool_size=2)
    with make_sessionmaker(engine).begin() as session:
        issued = issue_key(session, tenant_name="bench-scale", role="user", tier="enterprise")
    tenant = issued.tenant_id
    now = int(time.time())
    n_done = max(1, finished // batch_size)
    done_ids = [f"batch_{i:04d}{uuid.uuid4().hex[:16]}" for i in range(n_done)]
    # ids are time-ordered in the app; here the running batch is named last so it leads the list.
    running_id = f"batch_{n_done:04d}{uuid.uuid4().hex[:16]}"
    with engine.begin() as conn:
        conn.execute(
            BATCHES.insert(),
            [
                {
                    "id": b,
                    "tenant_id": tenant,
                    "status": "completed" if b != running_id else "in_progress",
                    "priority": "normal",
                    "council": {},
                    "metadata": {},
                    "completion_window": "24h",
                    "endpoint": "/v1/council",
                    "total": batch_size,
                    "created_at": now - 3600,
                    "in_progress_at": now - 3600,
                    "completed_at": None if b == running_id else now - 60,
                    "expires_at": now + 86400,
                }
                for b in [*done_ids, running_id]
            ],
        )
    request = orjson.dumps({"messages": [{"role": "user", "content": "A benchmark question?"}]}).decode()
    # The batches downloaded (the first two completed ones and the running one) hold full-size
    # results, 64 different ones in turn (so the database cannot compress them to nothing).
    rng = random.Random(15)
    full = [orjson.dumps(council_result(rng, True)).decode() for _ in range(64)]
    small = orjson.dumps(council_result(rng, False)).decode()
    downloaded = {*done_ids[:2], running_id}

    def rows() -> Any:
        k = 0
        for b in [*done_ids, running_id]:
            for seq in range(batch_size):
                k += 1
                result = full[seq % len(full)] if b in downloaded else small
                if b != running_id or seq < batch_size // 2:
                    status, res, fin, worker, lease, started = (
                        "succeeded",
                        result,
                        now - 60,
                        None,
                        None,
                        now - 120,
                    )
                elif seq < batch_size // 2 + RUNNING:
                    status, res, fin, worker, lease, started = (
                        "running",
                        None,
                        None,
                        "w-seed",
                        now + 3600,
                        now,
                    )
                else:
                    status, res, fin, worker, lease, started = "queued", None, None, None, None, None
                yield (
                    f"q_{k:012d}",
                    b,
                    tenant,
                    seq,
                    f"c-{seq}",
                    status,
                    "normal",
                    request,
                    worker,
                    lease,
                    1 if started else 0,
                    0,
                    started,
                    fin,
                    res,
                    700 if res else 0,
                    900 if res else 0,
                    0.002 if res else 0.0,
                    4000 if res else None,
                )

    copy_queries(engine, rows())
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        seed_counters(conn)
        conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return issued.api_key, tenant, done_ids, running_id


def seed_counters(conn: Any) -> None:
    """The batches' finished counters, as migration 0010 backfills them (the rows were COPYed,
    past the transitions that keep them); nothing to do on a schema without them."""
    if not conn.execute(text("SELECT to_regclass('batch_counts') IS NOT NULL")).scalar():
        return
    statuses = ("succeeded", "failed", "cancelled", "expired")
    sums = ", ".join(f"SUM(CASE WHEN status = '{s}' THEN 1 ELSE 0 END)" for s in statuses)
    conn.execute(
        text(
            f"INSERT INTO batch_counts (batch_id, {', '.join(statuses)}) SELECT batch_id, {sums} "
            f"FROM queries WHERE status IN ({', '.join(repr(s) for s in statuses)}) GROUP BY batch_id"
        )
    )


class Churn(threading.Thread):
    """Moves the running batch along through the real transitions, as workers would: each tick
    claims ``per_tick`` queued queries and records those of the tick before as succeeded."""

    def __init__(self, url: str, batch_id: str, per_tick: int = 50, tick_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.sessions = make_sessionmaker(make_engine(url, pool_size=2))
        self.batch_id, self.per_tick, self.tick_s = batch_id, per_tick, tick_s
        self.stop = threading.Event()
        self.moved = 0
        self.claimed: list[transitions.ClaimedQuery] = []

    def run(self) -> None:
        q = QUERIES.c
        while not self.stop.wait(self.tick_s):
            now = int(time.time())
            with self.sessions.begin() as session:
                ids = session.scalars(
                    select(q.id)
                    .where(q.batch_id == self.batch_id, q.status == "queued")
                    .order_by(q.seq)
                    .limit(self.per_tick)
                ).all()
                if not ids:
                    return
                claimed = list(transitions.claim_queries(session, ids, "w-churn", 600, now).values())
            # What the previous tick claimed finishes now: each query runs for one tick.
            done, self.claimed = self.claimed, claimed
            outcomes = [
                transitions.Outcome(c, "succeeded", {"answer": "x"}, None, None, (), 900, now) for c in done
            ]
            with self.sessions.begin() as session:
                transitions.record_outcomes(session, outcomes, "w-churn")
            self.moved += len(done)


def timed_get(client: httpx.Client, path: str, n: int, params: dict[str, Any] | None = None) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def download(
    client: httpx.Client, path: str, api_pid: int, params: dict[str, Any]
) -> tuple[int, int, float, float, float]:
    """(records, bytes, seconds, API CPU µs per record, peak API RSS MB) of one streamed download.
    The API's CPU per record is what the machine's load changes least: its records per second
    on a core of its own would be about 1e6 / that."""
    before = proc_tree_sample(api_pid)
    peak = [before.rss_mb]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], proc_tree_sample(api_pid).rss_mb)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    records = size = 0
    started = time.perf_counter()
    with client.stream("GET", path, params=params) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                records += 1
                size += len(line) + 1
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    if params.get("format") == "csv":
        records -= 1  # the header (cells here hold no line breaks)
    cpu_us = (proc_tree_sample(api_pid).cpu_s - before.cpu_s) / max(records, 1) * 1e6
    return records, size, elapsed, cpu_us, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    name = f"conclave_bench_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    redis_ = ensure_redis(args.redis_url)
    stack = None
    churn = None
    try:
        upgrade(url)
        started = time.perf_counter()
        key, _tenant, done_ids, running_id = build(url, args.finished, args.batch_size)
        build_s = time.perf_counter() - started
        engine = make_engine(url, pool_size=1)
        with engine.connect() as conn:
            query_rows = conn.scalar(select(func.count()).select_from(QUERIES))
        engine.dispose()

        env = bench_env(redis_.url, url)
        env["CONCLAVE_RATE_LIMITS_ENABLED"] = "false"
        stack = Stack(env=env)
        api_url = stack.start_api(workers=1)
        api_pid = stack.procs[0].pid
        churn = Churn(url, running_id)
        with httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=600
        ) as client:
            timed_get(client, f"/v1/batches/{running_id}", 10)  # warm the pool and caches
            churn.start()
            get_ms = timed_get(client, f"/v1/batches/{running_id}", args.requests)
            list_ms = timed_get(client, "/v1/batches", max(20, args.requests // 4), {"limit": 20})
            churn.stop.set()
            churn.join()
            final = client.get(f"/v1/batches/{running_id}").json()["request_counts"]
            rss_idle = proc_tree_sample(api_pid).rss_mb
            downloads = [
                (f"JSONL, completed batch ({args.batch_size:,})", done_ids[0], {"format": "jsonl"}),
                (
                    f"CSV, completed batch ({args.batch_size:,})",
                    done_ids[1 % len(done_ids)],
                    {"format": "csv"},
                ),
                ("JSONL, the running batch", running_id, {"format": "jsonl"}),
            ]
            measured = [
                (label, *download(client, f"/v1/batches/{bid}/results", api_pid, params))
                for label, bid, params in downloads
            ]
            rss_after = proc_tree_sample(api_pid).rss_mb
    finally:
        if churn is not None:
            churn.stop.set()
        if stack is not None:
            stack.stop()
        redis_.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    load = os.getloadavg()
    print_table(
        f"Scale (PostgreSQL): {query_rows:,} query rows, a running {args.batch_size:,}-query batch; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        ["measure", "value"],
        [
            ["bulk build (COPY)", f"{build_s:.1f} s"],
            ["running batch moved during reads", f"{churn.moved if churn else 0:,} queries"],
            ["running batch at the end", " ".join(f"{k}={v:,}" for k, v in final.items())],
            [
                f"GET /v1/batches/{{id}} (running) p50 / p95, {len(get_ms)} requests",
                f"{percentile(get_ms, 50):.1f} / {percentile(get_ms, 95):.1f} ms",
            ],
            [
                f"GET /v1/batches?limit=20 p50 / p95, {len(list_ms)} requests",
                f"{percentile(list_ms, 50):.1f} / {percentile(list_ms, 95):.1f} ms",
            ],
            ["API RSS before downloads", f"{rss_idle:.0f} MB"],
            *(
                [
                    f"results {label}",
                    f"{records:,} records, {size / 2**20:.0f} MB in {secs:.2f} s: "
                    f"{records / secs:,.0f} records/s; API CPU {cpu_us:.0f} µs a record; "
                    f"API peak RSS {peak:.0f} MB",
                ]
                for label, records, size, secs, cpu_us, peak in measured
            ),
            ["API RSS after downloads", f"{rss_after:.0f} MB"],
        ],
    )


if __name__ == "__main__":
    main()
