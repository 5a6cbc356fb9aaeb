"""Shared pieces of the benchmark scripts: a throwaway stack, process CPU/RSS readings, tables."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from rich.console import Console
from rich.table import Table

from shared.stack import Stack, ensure_redis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcSample:
    cpu_s: float
    rss_mb: float


def proc_tree_sample(pid: int) -> ProcSample:
    """CPU seconds (user+system) and RSS of a process and its children, from /proc."""
    pids = [pid, *_children(pid)]
    cpu = 0.0
    rss = 0.0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
            rss += int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return ProcSample(cpu, rss)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return found
    for kid in kids:
        found.append(int(kid))
        found.extend(_children(int(kid)))
    return found


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def stack_parser(
    doc: str | None, *, latency_ms: float, threads: int, processes: int = 2
) -> argparse.ArgumentParser:
    """A benchmark's command line with the options of the stack it starts: the simulated provider's
    latency, the worker pool (processes × threads) and the database (default: SQLite, throwaway)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=latency_ms, help="simulated provider latency")
    parser.add_argument("--processes", type=int, default=processes, help="worker processes")
    parser.add_argument("--threads", type=int, default=threads, help="threads per worker process")
    parser.add_argument("--database-url", default=None, help="e.g. postgresql+psycopg://…")
    return parser


def bench_env(
    redis_url: str, database_url: str | None = None, sim_url: str = "http://127.0.0.1:1"
) -> dict[str, str]:
    workdir = Path(tempfile.mkdtemp(prefix="conclave-bench-"))
    return {
        **os.environ,
        "CONCLAVE_DATABASE_URL": database_url or f"sqlite:///{workdir / 'bench.db'}",
        "CONCLAVE_REDIS_URL": redis_url,
        "CONCLAVE_QUEUE_NAMESPACE": f"bench-{uuid.uuid4().hex[:8]}",
        "CONCLAVE_SIM_PROVIDER_URL": sim_url,
        "CONCLAVE_PROVIDERS_FILE": str(workdir / "absent.toml"),
        "CONCLAVE_LOG_LEVEL": "WARNING",
        "CONCLAVE_MAX_BATCH_QUERIES": "50000",
        "CONCLAVE_IP_REQUESTS_PER_MINUTE": "1000000",
    }


def bench_key(database_url: str) -> str:
    """Bring the schema up to date and return an API key of a new enterprise-tier tenant (no
    tier limit gets in a benchmark's way)."""
    from shared.db import make_engine, make_sessionmaker, upgrade
    from shared.tenants import issue_key

    upgrade(database_url)
    with make_sessionmaker(make_engine(database_url, pool_size=1)).begin() as session:
        return issue_key(
            session, tenant_name=f"bench-{uuid.uuid4().hex[:6]}", role="user", tier="enterprise"
        ).api_key


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    Console().print(table)


__all__ = [
    "ProcSample",
    "Stack",
    "bench_env",
    "bench_key",
    "ensure_redis",
    "median",
    "percentile",
    "print_table",
    "proc_tree_sample",
    "stack_parser",
]


def clear_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every Redis key of the benchmark's namespace (a few hundred at a time)."""
    found = list(client.scan_iter(f"{namespace}:*", count=1000))
    for i in range(0, len(found), 500):
        client.delete(*found[i : i + 500])
