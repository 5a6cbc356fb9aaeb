"""Data lifecycle benchmark (SPEC §17): re-running and deleting a 50,000-query batch.

    python -m benchmarks.lifecycle [--queries 50000] [--postgres]

In-process, on a throwaway database (SQLite, or a PostgreSQL database created and dropped on
the local server) and a throwaway Redis namespace. The batch is stored through the batch service
and finished through the real transitions (``claim_queries``, ``record_outcomes``): half
succeeded with a council result of about 9 KB, half failed, two ledger rows each. Then, timed:
``rerun_batch`` of the failed half (the call behind ``POST /v1/batches/{id}/rerun``) and
``purge_batch`` of the original (behind ``DELETE /v1/batches/{id}`` and the retention job), with
the longest single transaction of the deletion: how long it holds the write lock at most.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text

from benchmarks.common import ensure_redis, print_table
from shared.batches import deletion, rerun, service
from shared.db import make_engine, make_sessionmaker, upgrade
from shared.ledger import CallRecord
from shared.lifecycle.transitions import Outcome, claim_queries, finalize_if_done, record_outcomes
from shared.providers.config import load_catalog
from shared.queue.broker import make_broker
from shared.settings import Settings
from shared.tenants import issue_key

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
COUNCIL = {"mode": "council", "members": ["sim:alpha", "sim:beta", "sim:gamma"], "chairman": "sim:chairman"}
PAGE = 1000


def council_result(i: int) -> dict[str, Any]:
    answer = f"Answer {i}: " + "lorem ipsum dolor sit amet " * 40
    return {
        "answer": answer,
        "synthesis": "chairman",
        "members": [{"model": m, "status": "succeeded", "answer": answer} for m in COUNCIL["members"]],
        "reviews": [
            {"model": m, "status": "valid", "ranking": COUNCIL["members"], "text": answer[:600]}
            for m in COUNCIL["members"]
        ],
    }


@contextmanager
def database(postgres: bool, tmp: str) -> Iterator[str]:
    if not postgres:
        yield f"sqlite:///{tmp}/lifecycle.db"
        return
    name = f"conclave_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def finish_all(sessions: Any, batch_id: str, query_ids: list[str]) -> None:
    now = int(time.time())
    for start in range(0, len(query_ids), PAGE):
        with sessions.begin() as s:
            claimed = claim_queries(s, query_ids[start : start + PAGE], "bench", 600, now)
            outcomes = []
            for i, qid in enumerate(query_ids[start : start + PAGE], start):
                ok = i % 2 == 0
                calls = [
                    CallRecord(
                        m,
                        "answer",
                        1,
                        "succeeded" if ok else "failed",
                        None if ok else "server",
                        5,
                        100,
                        50 if ok else 0,
                        0.001,
                        now,
                    )
                    for m in COUNCIL["members"][:2]
                ]
                result = council_result(i) if ok else None
                error = None if ok else {"type": "server", "message": "failed"}
                outcomes.append(
                    Outcome(claimed[qid], "succeeded" if ok else "failed", result, error, None, calls, 5, now)
                )
            record_outcomes(s, outcomes, "bench")
    with sessions.begin() as s:
        finalize_if_done(s, batch_id, now)


def run(queries: int, postgres: bool) -> list[object]:
    import tempfile

    redis_server = ensure_redis("redis://127.0.0.1:6379/0")
    namespace = f"bench-life-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp, database(postgres, tmp) as url:
        upgrade(url)
        engine = make_engine(url, pool_size=4)
        sessions = make_sessionmaker(engine)
        settings = Settings(
            database_url=url,
            redis_url=redis_server.url,
            queue_namespace=namespace,
            max_batch_queries=max(queries, 50_000),
            _env_file=None,  # type: ignore[call-arg]
        )
        broker = make_broker(redis_server.url, namespace)
        with sessions.begin() as s:
            tenant_id = issue_key(
                s, tenant_name=f"bench-{namespace}", role="admin", tier="enterprise"
            ).tenant_id
        admitted = service.Admitted(
            priority="normal", council=COUNCIL, metadata={}, window="24h", window_s=86400
        )
        requests = (
            (
                f"q-{i}",
                {
                    "messages": [{"role": "user", "content": f"question {i}? " * 20}],
                    "max_tokens": None,
                    "temperature": None,
                },
            )
            for i in range(queries)
        )
        batch, _, _ = service.submit(
            sessions,
            broker,
            settings,
            tenant_id=tenant_id,
            admitted=admitted,
            requests=requests,
            total=queries,
            budget=None,
        )
        with sessions() as s:
            ids = list(
                s.scalars(text("SELECT id FROM queries WHERE batch_id = :b ORDER BY seq"), {"b": batch.id})
            )
        finish_all(sessions, batch.id, ids)

        started = time.perf_counter()
        _, counts, _ = rerun.rerun_batch(
            sessions,
            broker,
            load_catalog(settings.providers_file, settings.sim_provider_url),
            settings,
            tenant_id=tenant_id,
            batch_id=batch.id,
            statuses=["failed"],
            budget=None,
        )
        rerun_s = time.perf_counter() - started

        spans: list[float] = []
        opened: dict[int, float] = {}
        event.listen(engine, "begin", lambda conn: opened.__setitem__(id(conn), time.perf_counter()))
        event.listen(engine, "commit", lambda conn: spans.append(time.perf_counter() - opened.pop(id(conn))))
        started = time.perf_counter()
        deleted = deletion.purge_batch(sessions, broker, batch.id)
        delete_s = time.perf_counter() - started
        broker.client.delete(*broker.client.keys(f"{namespace}:*") or ["-"])
        engine.dispose()
    return [
        "PostgreSQL" if postgres else "SQLite",
        f"{queries:,}",
        f"{counts.total:,}",
        f"{rerun_s:.2f}",
        f"{deleted:,}",
        f"{delete_s:.2f}",
        len(spans),
        f"{max(spans) * 1000:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument(
        "--postgres", action="store_true", help="a throwaway database on the local PostgreSQL"
    )
    args = parser.parse_args()
    row = run(args.queries, args.postgres)
    print_table(
        "Rerun and delete of one batch",
        ["database", "queries", "rerun of", "rerun s", "deleted", "delete s", "transactions", "longest ms"],
        [row],
    )


if __name__ == "__main__":
    main()
