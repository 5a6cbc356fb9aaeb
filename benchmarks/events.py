"""Event streams under load (SPEC §12, issue 16): N clients follow one running batch through
``GET /v1/batches/{id}/events``; what does that cost the API, and how long after a change does
each client see it?

The script plays the workers: it creates a batch through the API (no worker runs, so nothing
else moves), then marks queries as past the answer stage with ``shared.progress.ProgressBuffer``
— exactly what a worker's flush writes — and notes the time of each change. Every client
records when the first ``progress`` event showing that count arrives. Two rhythms: a change every
2 s (each change can go out at once) and a change every 100 ms (the once-a-second cap decides).

CPU is the API process's (user + system, from /proc) over the measured window, as % of one core.

    python -m benchmarks.events [--streams 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import httpx
import orjson
import redis

from benchmarks.common import (
    Stack,
    bench_env,
    bench_key,
    ensure_redis,
    percentile,
    print_table,
    proc_tree_sample,
)
from shared.progress import ProgressBuffer


@dataclass
class Follower:
    seen: list[tuple[float, int]] = field(default_factory=list)  # (arrival, answer done)
    events: int = 0
    keepalives: int = 0


async def follow(host: str, port: int, path: str, key: str, out: Follower) -> None:
    """One stream over a raw socket; each chunk is stamped when it arrives, before parsing, so
    the client's own parsing (on the same machine as the API) is not counted as latency."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    pending = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            arrived = time.time()
            pending += chunk
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                if frame.startswith(b":"):
                    out.keepalives += 1
                elif b"event: progress" in frame:
                    out.events += 1
                    data = orjson.loads(frame.rsplit(b"data: ", 1)[1])
                    out.seen.append((arrived, data["stages"]["answer"]["done"]))
    finally:
        writer.close()


async def run_scenario(
    url: str,
    key: str,
    batch_id: str,
    buf: ProgressBuffer,
    streams: int,
    seconds: float,
    every_s: float,
    start_at: int,
    api_pid: int,
) -> dict[str, float]:
    host, port = url.removeprefix("http://").split(":")
    followers = [Follower() for _ in range(streams)]
    tasks = [
        asyncio.create_task(follow(host, int(port), f"/v1/batches/{batch_id}/events", key, f))
        for f in followers
    ]
    await asyncio.sleep(3.0)  # every stream connected and past its first event
    changes: list[tuple[float, int]] = []
    done = start_at
    before = proc_tree_sample(api_pid)
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        done += 1
        buf.passed(batch_id, f"bench-{done}", "answer")
        changes.append((time.time(), done))
        buf.flush()
        await asyncio.sleep(every_s)
    await asyncio.sleep(2.5)  # the last change reaches everyone
    elapsed = time.monotonic() - began
    after = proc_tree_sample(api_pid)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

    latencies: list[float] = []
    missed = 0
    for f in followers:
        for changed_at, count in changes:
            arrival = next((t for t, n in f.seen if n >= count), None)
            if arrival is None:
                missed += 1
            else:
                latencies.append(max(0.0, arrival - changed_at))
    cpu_pct = 100 * (after.cpu_s - before.cpu_s) / elapsed
    events = sum(f.events for f in followers)
    return {
        "changes": len(changes),
        "events": events,
        "events_per_stream_s": events / streams / elapsed if streams else 0.0,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies) if latencies else float("nan"),
        "missed": missed,
        "cpu_pct": cpu_pct,
        "rss_mb": after.rss_mb,
        "last": done,
    }


async def idle_cpu(api_pid: int, seconds: float) -> float:
    before = proc_tree_sample(api_pid)
    began = time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (proc_tree_sample(api_pid).cpu_s - before.cpu_s) / (time.monotonic() - began)


async def main_async(args: argparse.Namespace) -> None:
    embedded = ensure_redis("redis://127.0.0.1:6379/0")
    env = bench_env(embedded.url)
    key = bench_key(env["CONCLAVE_DATABASE_URL"])
    stack = Stack(env=env)
    try:
        url = stack.start_api(workers=1)
        api_pid = stack.procs[-1].pid
        queries = [{"custom_id": f"e-{i}", "prompt": f"q {i}"} for i in range(args.queries)]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as api:
            created = api.post("/v1/batches", json={"queries": queries})
            created.raise_for_status()
            batch_id = created.json()["id"]
        client = redis.Redis.from_url(embedded.url)
        buf = ProgressBuffer(client, env["CONCLAVE_QUEUE_NAMESPACE"])
        rows = [
            ["no stream (idle API)", 0, "-", "-", "-", "-", "-", "-", f"{await idle_cpu(api_pid, 5):.1f}"]
        ]
        done = 0
        for label, every in (("a change every 2 s", 2.0), ("a change every 100 ms", 0.1)):
            r = await run_scenario(url, key, batch_id, buf, args.streams, args.seconds, every, done, api_pid)
            done = int(r["last"])
            rows.append(
                [
                    label,
                    args.streams,
                    int(r["changes"]),
                    f"{r['events_per_stream_s']:.2f}",
                    f"{r['p50'] * 1000:.0f}",
                    f"{r['p95'] * 1000:.0f}",
                    f"{r['max'] * 1000:.0f}",
                    int(r["missed"]),
                    f"{r['cpu_pct']:.1f}",
                ]
            )
        print_table(
            f"{args.streams} event streams on one batch of {args.queries} queries, "
            f"{args.seconds:.0f} s per rhythm",
            [
                "rhythm",
                "streams",
                "changes",
                "events/stream/s",
                "p50 ms",
                "p95 ms",
                "max ms",
                "missed",
                "API CPU % of a core",
            ],
            rows,
        )
    finally:
        stack.stop()
        embedded.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--queries", type=int, default=2000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
