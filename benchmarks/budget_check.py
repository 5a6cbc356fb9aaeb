"""The budget check's worker CPU per query (SPEC §17): ``Budgets.admit`` at claim and
``Budgets.settle`` at the end, as the pipeline calls them, against a real Redis: for a tenant with
a budget (two script runs), a tenant and its key both with budgets (still two runs, each covering
both counters) and a tenant without (none).

    python -m benchmarks.budget_check --queries 5000

``benchmarks/council.py`` measures the whole pipeline; on a busy machine its per-call CPU varies
by more than this check costs, so the check is timed here on its own (``time.process_time``: the
CPU of this process, Redis's own work excluded).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import redis

from benchmarks.common import clear_namespace, ensure_redis, print_table
from shared.budget import Budgets
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.models import ApiKey, Batch, Tenant
from shared.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=5000)
    args = parser.parse_args()

    redis_ = ensure_redis(os.environ.get("CONCLAVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='conclave-bench-budget-')) / 'bench.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url, pool_size=2))
    with sessions.begin() as session:
        for tenant_id, budget in (("tenant_budget", 1e9), ("tenant_free", None)):
            session.add(
                Tenant(
                    id=tenant_id,
                    name=tenant_id,
                    tier="enterprise",
                    webhook_secret="unused",
                    monthly_budget_usd=budget,
                    created_at=0,
                )
            )
        session.flush()  # the tenants before the rows naming them
        session.add(
            ApiKey(
                id="key_bench",
                tenant_id="tenant_budget",
                role="user",
                key_hash="unused",
                prefix="unused",
                created_at=0,
                monthly_budget_usd=1e9,
            )
        )
        session.flush()
        for batch_id, key_id in (("batch", None), ("batch_keyed", "key_bench")):
            session.add(
                Batch(
                    id=batch_id,
                    tenant_id="tenant_budget",
                    status="in_progress",
                    priority="normal",
                    completion_window="24h",
                    total=1,
                    created_at=0,
                    expires_at=2**31 - 1,
                    key_id=key_id,
                )
            )
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_.url)
    budgets = Budgets(client, namespace, sessions, Settings(_env_file=None))  # type: ignore[call-arg]
    rows = []
    try:
        for label, tenant_id, batch_id in (
            ("with a budget", "tenant_budget", "batch"),
            ("and its key one", "tenant_budget", "batch_keyed"),
            ("without a budget", "tenant_free", "batch"),
        ):
            budgets.admit(tenant_id, batch_id, "warm-up", 0.01, int(time.time()) + 900, time.time())
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(args.queries):
                now = time.time()
                admission = budgets.admit(tenant_id, batch_id, f"q{i}", 0.01, int(now) + 900, now)
                budgets.settle(tenant_id, f"q{i}", admission, 0.009)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rows.append(
                [label, f"{cpu / args.queries * 1000:.3f} ms", f"{wall / args.queries * 1000:.3f} ms"]
            )
    finally:
        budgets.close()
        clear_namespace(client, namespace)
        redis_.stop()
    print_table(
        f"Budget check (admit + settle), {args.queries:,} queries, one thread",
        ["tenant", "CPU per query", "wall per query"],
        rows,
    )


if __name__ == "__main__":
    main()
