"""Priority benchmark: a small high-priority batch submitted behind a large low-priority backlog,
its makespan against the same batch on an idle system, on the real stack (API, dramatiq workers,
Redis, simulated provider).

    python -m benchmarks.priority                       # 50 high behind 10,000 low, 2 s latency
    python -m benchmarks.priority --low 2000 --threads 64 --latency-ms 500    # a quick trial

One worker pool consumes all three queues (high, normal, low): the hardest case, since the
processes that serve the backlog must also serve the high batch. The high batch is measured
first on the idle system (after a warm-up batch), then again once the low backlog has
saturated the workers. Target: the loaded makespan within 1.5× the idle one. With a constant
simulated latency the backlog runs in waves (its first ``processes × threads`` queries start
together and finish together), and the high batch is sent just after the first wave started:
the worst moment, since a dramatiq thread is freed only when its query ends.
``--high-pool THREADS`` adds the Procfile's ``worker_high`` pool (high queue only) for comparison;
with ``--queues normal,low`` it alone serves the high queue.

Makespan runs from the POST to the poll that sees the batch ``completed``. A query's
end-to-end latency runs from the POST to the first poll whose partial results hold it; the
worker's own ``latency_ms`` (claim to outcome) is shown beside it, so the difference is time
spent waiting (Redis queue, dramatiq prefetch buffer, thread pool). The milestones say where:
"all left Redis" is the first poll with the high queue empty, "all claimed" the first with
no high query ``queued`` in the database (a worker thread has started every one).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson
import redis

from benchmarks.common import (
    ProcSample,
    Stack,
    bench_env,
    bench_key,
    clear_namespace,
    ensure_redis,
    percentile,
    print_table,
    proc_tree_sample,
    stack_parser,
)
from shared import keys
from shared.sim import SimConfig, SimServer

TERMINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class Sample:
    """One poll of a measured batch: seconds since its POST and where its queries were."""

    t: float
    redis_depth: int  # messages still in the Redis list of the batch's queue
    held: int  # messages of that queue fetched by a worker and not yet acked
    queued: int  # database: not yet claimed by a worker thread
    running: int
    done: int  # terminal
    other_done: int = 0  # terminal queries of the watched (backlog) batch, if any


@dataclass
class BatchRun:
    makespan: float
    total: int
    succeeded: int
    end_to_end_ms: list[float]
    worker_ms: list[float]
    cpu_s: float
    peak_rss_mb: float
    samples: list[Sample] = field(default_factory=list)

    def first(self, check: Callable[[Sample], bool]) -> float | None:
        return next((s.t for s in self.samples if check(s)), None)


class QueueProbe:
    """Reads the broker's Redis keys: queue depth and messages held by live workers (their ack sets)."""

    def __init__(self, client: redis.Redis, namespace: str):
        self.client = client
        self.namespace = namespace

    def depth(self, queue: str) -> int:
        """Waiting: on the queue's list or in its fair lanes."""
        lanes = self.client.llen(keys.fair_depth(self.namespace, queue))
        return int(self.client.llen(f"{self.namespace}:{queue}")) + int(lanes)

    def held(self, queue: str) -> int:
        workers = self.client.zrange(f"{self.namespace}:__heartbeats__", 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for worker in workers:
            name = worker.decode() if isinstance(worker, bytes) else str(worker)
            pipe.scard(f"{self.namespace}:__acks__.{name}.{queue}")
        return sum(int(n) for n in pipe.execute())

    def clear(self) -> None:
        clear_namespace(self.client, self.namespace)


def workers_sample(pids: list[int]) -> ProcSample:
    """CPU and RSS summed over several worker pools (each pid with its children)."""
    samples = [proc_tree_sample(pid) for pid in pids]
    return ProcSample(sum(x.cpu_s for x in samples), sum(x.rss_mb for x in samples))


def batch_body(size: int, tag: str, priority: str) -> bytes:
    return orjson.dumps(
        {
            "priority": priority,
            "queries": [
                {"custom_id": f"{tag}-{i}", "prompt": f"Benchmark question {i}: why is the sky blue?"}
                for i in range(size)
            ],
            "metadata": {"benchmark": "priority", "run": tag},
        }
    )


def terminal_count(counts: dict[str, int]) -> int:
    return counts["total"] - counts["queued"] - counts["running"]


def run_batch(
    client: httpx.Client,
    probe: QueueProbe,
    worker_pids: list[int],
    *,
    size: int,
    tag: str,
    priority: str,
    interval: float,
    timeout: float,
    watch: str | None = None,
) -> BatchRun:
    """POST a batch, poll it until it is terminal, and time it and each of its queries."""
    body = batch_body(size, tag, priority)
    before = workers_sample(worker_pids)
    peak_rss = before.rss_mb
    seen: dict[str, float] = {}
    samples: list[Sample] = []
    started = time.perf_counter()
    response = client.post("/v1/batches", content=body)
    response.raise_for_status()
    batch_id = response.json()["id"]
    done_before = 0
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        now = time.perf_counter() - started
        counts = batch["request_counts"]
        done = terminal_count(counts)
        if done > done_before:
            # Partial results hold every terminal query: the first poll that shows one dates it.
            for line in client.get(f"/v1/batches/{batch_id}/results").content.splitlines():
                seen.setdefault(orjson.loads(line)["custom_id"], now)
            done_before = done
        depth, held = probe.depth(priority), probe.held(priority)
        other_done = 0
        if watch is not None:
            other_done = terminal_count(client.get(f"/v1/batches/{watch}").json()["request_counts"])
        samples.append(Sample(now, depth, held, counts["queued"], counts["running"], done, other_done))
        peak_rss = max(peak_rss, workers_sample(worker_pids).rss_mb)
        if batch["status"] in TERMINAL:
            break
        if now > timeout:
            raise TimeoutError(f"{tag} batch not finished after {timeout:g}s: {counts}")
        time.sleep(interval)
    makespan = now
    after = workers_sample(worker_pids)
    results = client.get(f"/v1/batches/{batch_id}/results").content
    records = [orjson.loads(line) for line in results.splitlines()]
    return BatchRun(
        makespan=makespan,
        total=size,
        succeeded=sum(1 for r in records if r["status"] == "succeeded"),
        end_to_end_ms=[t * 1000 for t in seen.values()],
        worker_ms=[float(r["latency_ms"]) for r in records if r.get("latency_ms") is not None],
        cpu_s=after.cpu_s - before.cpu_s,
        peak_rss_mb=peak_rss,
        samples=samples,
    )


@dataclass
class Backlog:
    batch_id: str
    post_s: float  # time to 202 for the low batch
    saturate_s: float  # from its POST until the workers were saturated (or the deadline)
    queued: int  # low queries in the database at the moment the high batch was submitted
    running: int
    redis_depth: int
    held: int
    sim_in_flight: int


def load_backlog(
    client: httpx.Client,
    probe: QueueProbe,
    sim_url: str,
    *,
    size: int,
    target: int,
    interval: float,
    deadline: float,
) -> Backlog:
    """POST the low batch and wait until its running count reaches ``target`` (or the deadline)."""
    started = time.perf_counter()
    response = client.post("/v1/batches", content=batch_body(size, "low", "low"))
    response.raise_for_status()
    post_s = time.perf_counter() - started
    batch_id = response.json()["id"]
    while True:
        counts = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
        waited = time.perf_counter() - started
        if counts["running"] >= target or waited > deadline or counts["queued"] == 0:
            break
        time.sleep(interval)
    sim_in_flight = httpx.get(f"{sim_url}/_sim/stats").json()["in_flight"]
    return Backlog(
        batch_id,
        post_s,
        waited,
        counts["queued"],
        counts["running"],
        probe.depth("low"),
        probe.held("low"),
        sim_in_flight,
    )


def ms(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct) / 1000:.2f} s" if values else "n/a"


def milestone(value: float | None) -> str:
    return f"{value:.2f} s" if value is not None else "n/a"


def main() -> None:
    parser = stack_parser(__doc__, latency_ms=2000.0, threads=256)
    parser.add_argument("--low", type=int, default=10_000, help="queries in the low-priority backlog")
    parser.add_argument("--high", type=int, default=50, help="queries in the measured high-priority batch")
    parser.add_argument("--interval", type=float, default=0.2, help="poll interval in seconds")
    parser.add_argument(
        "--saturation",
        type=float,
        default=0.95,
        help="share of processes × threads running before the high batch is sent",
    )
    parser.add_argument("--saturation-deadline", type=float, default=90.0)
    parser.add_argument(
        "--queues", default="high,normal,low", help="queues of the main pool (comma-separated)"
    )
    parser.add_argument(
        "--high-pool",
        type=int,
        default=0,
        metavar="THREADS",
        help="also run a one-process pool on the high queue only, with this many threads (0: none)",
    )
    parser.add_argument("--timeline", action="store_true", help="print every poll of the loaded run")
    parser.add_argument("--target", type=float, default=1.5, help="loaded / idle makespan to meet")
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    sim = SimServer(SimConfig(latency_ms=args.latency_ms, log_limit=1000)).start()
    env = bench_env(redis_.url, args.database_url, sim.url)
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    probe = QueueProbe(redis.Redis.from_url(redis_.url), env["CONCLAVE_QUEUE_NAMESPACE"])
    # `conclave worker` gives a process serving high and lower queues extra threads for high
    # work (workers/broker.py): the backlog saturates the `threads` it asked for.
    in_flight = args.processes * args.threads
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    if "low" not in queues or ("high" not in queues and not args.high_pool):
        parser.error("the main pool must serve low, and high unless --high-pool serves it")
    # A council query is three rounds of provider calls; allow for slow rounds before giving up.
    timeout = 60 + 30 * args.latency_ms / 1000
    backlog: Backlog | None = None
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    try:
        url = stack.start_api()
        pools = [stack.start_workers(processes=args.processes, threads=args.threads, queues=queues).pid]
        if args.high_pool:
            # The Procfile's ``worker_high``: a pool that only serves the high queue.
            pools.append(stack.start_workers(processes=1, threads=args.high_pool, queues=("high",)).pid)
        with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
            time.sleep(3)  # let the worker processes import and connect before the clock starts

            def high(tag: str, watch: str | None = None) -> BatchRun:
                if (why := stack.dead()) is not None:
                    raise RuntimeError(why)
                return run_batch(
                    client,
                    probe,
                    pools,
                    size=args.high,
                    tag=tag,
                    priority="high",
                    interval=args.interval,
                    timeout=timeout,
                    watch=watch,
                )

            # The first batch pays for connections, caches and imports in every process.
            warm = high("warm")
            idle = high("idle")
            cpu_before_load = workers_sample(pools)
            loaded_started = time.perf_counter()
            backlog = load_backlog(
                client,
                probe,
                sim.url,
                size=args.low,
                target=int(args.saturation * in_flight),
                interval=args.interval,
                deadline=args.saturation_deadline,
            )
            load_cpu = workers_sample(pools)
            loaded = high("loaded", watch=backlog.batch_id)
            loadavg = os.getloadavg()
            low_counts = client.get(f"/v1/batches/{backlog.batch_id}").json()["request_counts"]
            client.post(f"/v1/batches/{backlog.batch_id}/cancel").raise_for_status()
            backlog_wall = time.perf_counter() - loaded_started
            backlog_cpu = workers_sample(pools).cpu_s - cpu_before_load.cpu_s
            saturate_cpu = load_cpu.cpu_s - cpu_before_load.cpu_s
            if (why := stack.dead()) is not None:
                raise RuntimeError(why)
    except BaseException:
        print(stack.log_text())
        raise
    finally:
        if backlog is not None:
            # With --database-url the database outlives the run: leave no queued backlog in it.
            with contextlib.suppress(httpx.HTTPError):
                cancel = f"{stack.api_url}/v1/batches/{backlog.batch_id}/cancel"
                httpx.post(cancel, headers=headers, timeout=30)
        stack.stop()
        probe.clear()
        sim.stop()
        redis_.stop()

    ratio = loaded.makespan / idle.makespan
    pool_note = f" (+ a high-only pool: 1 × {args.high_pool} threads)" if args.high_pool else ""
    low_at_post = loaded.samples[0].other_done
    first_low_done = loaded.first(lambda s: s.other_done > low_at_post)
    claimed = next((s for s in loaded.samples if s.queued == 0), loaded.samples[-1])
    low_before_claimed = claimed.other_done - low_at_post
    db = env["CONCLAVE_DATABASE_URL"]

    def cpu(run: BatchRun) -> str:
        return f"{run.cpu_s:.1f} s ({run.cpu_s / run.makespan:.2f} cores)"

    print_table(
        f"Priority: {args.high} high queries alone, then behind {args.low:,} low; sim latency "
        f"{args.latency_ms:g} ms; one pool on {','.join(queues)}: {args.processes} processes × "
        f"{args.threads} threads{pool_note}; DB {'SQLite' if db.startswith('sqlite') else 'PostgreSQL'}, "
        f"Redis {redis_.kind}",
        ["measure", "idle", "loaded"],
        [
            ["high batch makespan", f"{idle.makespan:.2f} s", f"{loaded.makespan:.2f} s"],
            ["loaded / idle makespan", "", f"{ratio:.2f} (target ≤ {args.target:g})"],
            ["succeeded", f"{idle.succeeded} / {idle.total}", f"{loaded.succeeded} / {loaded.total}"],
            ["high latency POST → result p50", ms(idle.end_to_end_ms, 50), ms(loaded.end_to_end_ms, 50)],
            ["high latency POST → result p99", ms(idle.end_to_end_ms, 99), ms(loaded.end_to_end_ms, 99)],
            ["high worker latency (claim → outcome) p50", ms(idle.worker_ms, 50), ms(loaded.worker_ms, 50)],
            ["high worker latency (claim → outcome) p99", ms(idle.worker_ms, 99), ms(loaded.worker_ms, 99)],
            [
                "all high messages left Redis",
                milestone(idle.first(lambda s: s.redis_depth == 0)),
                milestone(loaded.first(lambda s: s.redis_depth == 0)),
            ],
            [
                "all high queries claimed by a thread",
                milestone(idle.first(lambda s: s.queued == 0)),
                milestone(loaded.first(lambda s: s.queued == 0)),
            ],
            [
                "first high query done",
                milestone(idle.first(lambda s: s.done > 0)),
                milestone(loaded.first(lambda s: s.done > 0)),
            ],
            [
                "peak high messages held by workers",
                max(s.held for s in idle.samples),
                max(s.held for s in loaded.samples),
            ],
            ["worker CPU during the high batch", cpu(idle), cpu(loaded)],
            ["worker peak RSS (all processes)", f"{idle.peak_rss_mb:.0f} MB", f"{loaded.peak_rss_mb:.0f} MB"],
        ],
    )
    print_table(
        "The low backlog when the high batch was submitted",
        ["measure", "value"],
        [
            ["warm-up high batch makespan (not counted)", f"{warm.makespan:.2f} s"],
            ["low batch POST → 202", f"{backlog.post_s:.2f} s"],
            [
                "low running / queued (database)",
                f"{backlog.running:,} / {backlog.queued:,}  (slots {in_flight:,})",
            ],
            ["low messages in Redis / held by workers", f"{backlog.redis_depth:,} / {backlog.held:,}"],
            ["provider calls in flight (sim)", f"{backlog.sim_in_flight:,}"],
            ["POST low → saturated", f"{backlog.saturate_s:.1f} s"],
            [
                "low finished when the high batch was done",
                f"{terminal_count(low_counts):,} of {low_counts['total']:,}",
            ],
            [
                "worker CPU while loaded (from low POST to cancel)",
                f"{backlog_cpu:.1f} s over {backlog_wall:.1f} s ({backlog_cpu / backlog_wall:.2f} cores)",
            ],
            ["of which until saturated", f"{saturate_cpu:.1f} s"],
            ["first low query finished after the high POST", milestone(first_low_done)],
            ["low queries finished before every high query had a thread", low_before_claimed],
            ["load average 1 / 5 min (machine)", f"{loadavg[0]:.2f} / {loadavg[1]:.2f}"],
        ],
    )
    if args.timeline:
        print_table(
            "Timeline of the loaded high batch (one row per poll)",
            ["t", "high in Redis", "high held", "high queued", "high running", "high done", "low done"],
            [
                [f"{x.t:.2f}", x.redis_depth, x.held, x.queued, x.running, x.done, f"{x.other_done:,}"]
                for x in loaded.samples
            ],
        )
    print("target held" if ratio <= args.target else f"target missed: {ratio:.2f}× > {args.target:g}×")


if __name__ == "__main__":
    main()
