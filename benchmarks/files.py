"""File batch benchmark (SPEC §11): a 50,000-line (~100 MB) OpenAI batch file, through the
official ``openai`` SDK, against the real stack (API, dramatiq workers, Redis, simulated provider).

    python -m benchmarks.files [--lines 50000] [--line-bytes 2000] [--postgres | --database-url URL]

Measures: upload time, time from the start of the upload to the batch's ``in_progress`` (the
create call validates every line and stores and enqueues every query), the API process's RSS
growth during the upload (sampled every 20 ms), and, once every line has run (single-model lines,
one provider call each), the output file's first ``retrieve`` (its size is measured once) and its
download.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import httpx
import openai
import orjson
import redis

from benchmarks.common import Stack, bench_env, bench_key, ensure_redis, print_table, proc_tree_sample
from benchmarks.intake import add_database_args, database_arg
from shared.liveness import alive_workers
from shared.sim import SimConfig, SimServer
from shared.stack import wait_until


def input_file(lines: int, line_bytes: int) -> bytes:
    """Single-model lines of about ``line_bytes`` each: the question is padded to the size."""
    out = []
    for i in range(lines):
        head = f"Benchmark question {i}: what is {i} squared? "
        doc = {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim:alpha", "messages": [{"role": "user", "content": head}], "max_tokens": 64},
        }
        pad = max(0, line_bytes - len(orjson.dumps(doc)) - 1)
        doc["body"]["messages"][0]["content"] = head + "x" * pad  # type: ignore[index]
        out.append(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(out)


class RssSampler(threading.Thread):
    """The peak RSS of a process tree while running."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = proc_tree_sample(pid).rss_mb
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, proc_tree_sample(self.pid).rss_mb)
            self._done.wait(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--line-bytes", type=int, default=2_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=64)
    add_database_args(parser)
    args = parser.parse_args()
    for database_url in database_arg(args, "files"):
        run(args, database_url)


def run(args: argparse.Namespace, database_url: str | None) -> None:
    data = input_file(args.lines, args.line_bytes)
    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    sim = SimServer(SimConfig(log_limit=1000)).start()
    env = bench_env(redis_.url, database_url, sim.url)
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    try:
        url = stack.start_api(workers=1)
        api_pid = stack.procs[0].pid
        stack.start_workers(processes=args.processes, threads=args.threads)
        # Timing starts once every worker process is up: their start-up (imports, threads) would
        # otherwise share the two cores with the upload and be counted as the API's.
        wait_until(
            lambda: (
                len(alive_workers(redis.Redis.from_url(redis_.url), env["CONCLAVE_QUEUE_NAMESPACE"]))
                >= args.processes
            ),
            120,
            "the worker processes",
        )
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
        # Warm the API process (imports, pools) so the RSS baseline is a running server's.
        warm = client.files.create(file=("warm.jsonl", data[: data.index(b"\n") + 1]), purpose="batch")
        client.files.delete(warm.id)

        before = proc_tree_sample(api_pid)
        load_before = os.getloadavg()[0]
        rss_before = before.rss_mb
        sampler = RssSampler(api_pid)
        sampler.start()
        started = time.perf_counter()
        uploaded = client.files.create(file=("bench.jsonl", data), purpose="batch")
        uploaded_s = time.perf_counter() - started
        rss_peak = sampler.stop()
        upload_cpu = proc_tree_sample(api_pid).cpu_s - before.cpu_s
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        in_progress_s = time.perf_counter() - started
        assert batch.status == "in_progress", batch.status
        create_s = in_progress_s - uploaded_s
        create_cpu = proc_tree_sample(api_pid).cpu_s - before.cpu_s - upload_cpu
        load = os.getloadavg()[0]

        run_started = time.perf_counter()
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(1)
            batch = client.batches.retrieve(batch.id)
        run_s = time.perf_counter() - run_started
        ended_at = time.perf_counter()
        assert batch.output_file_id, "no output file"
        output = client.files.retrieve(batch.output_file_id)
        ready_s = time.perf_counter() - ended_at
        started = time.perf_counter()
        with httpx.Client(timeout=600) as http:
            body = http.get(
                f"{url}/v1/files/{batch.output_file_id}/content", headers={"Authorization": f"Bearer {key}"}
            ).content
        download_s = time.perf_counter() - started
        lines = body.count(b"\n")
        assert lines == batch.request_counts.completed if batch.request_counts else True
        assert len(body) == output.bytes, (len(body), output.bytes)
        db = env["CONCLAVE_DATABASE_URL"]
    finally:
        stack.stop()
        sim.stop()
        redis_.stop()

    print_table(
        f"File batch: {args.lines:,} lines ({len(data) / 1e6:.0f} MB) through the openai SDK; "
        f"DB {'SQLite' if db.startswith('sqlite') else 'PostgreSQL'}, 1 API process, "
        f"{args.processes} worker processes × {args.threads} threads",
        ["measure", "value"],
        [
            ["upload (files.create)", f"{uploaded_s:.2f} s"],
            ["API CPU for the upload", f"{upload_cpu:.2f} s"],
            ["batches.create (validate, store, enqueue)", f"{create_s:.2f} s"],
            ["API CPU for batches.create", f"{create_cpu:.2f} s"],
            ["upload start → batch in_progress", f"{in_progress_s:.2f} s"],
            ["load average (1 min) before upload / at create", f"{load_before:.1f} / {load:.1f}"],
            ["API RSS before upload", f"{rss_before:.0f} MB"],
            ["API RSS growth during upload (peak)", f"{rss_peak - rss_before:.0f} MB"],
            ["batch run (all lines, 1 call each)", f"{run_s:.1f} s"],
            ["succeeded", f"{batch.request_counts.completed if batch.request_counts else 0:,}"],
            ["output file retrieve after end (size measured)", f"{ready_s:.2f} s"],
            ["output file download", f"{download_s:.2f} s"],
            ["output file", f"{lines:,} lines, {len(body) / 1e6:.0f} MB"],
        ],
    )


if __name__ == "__main__":
    main()
