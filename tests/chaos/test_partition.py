"""Chaos across hosts (SPEC §16): two worker hosts, one cut off from the network mid-batch for
longer than the heartbeat timeout, then reconnected.

The hosts are network namespaces (``tests/netns.py``), each with one worker pool; the API, the
scheduler, Redis, PostgreSQL and the simulated provider stay on this machine, reached through
forwarders on each link. Mid-batch, once the far host holds queries, its link goes down; it stays
down until the batch has completed on the near host, which takes reconciliation judging the far
worker dead (no heartbeat for ``DEAD_AFTER_S``) and handing its queries on. Then the link comes
back and the far worker, which never stopped, finishes what it was doing: every write it then
tries (call starts, call completions, outcomes) is refused because its lease is gone, and it
logs each refusal. Checked:

- the batch completed while the far host was cut off, so on the near host alone, and every query
  the far worker held was finished by another worker;
- the far worker's refused writes, counted from its log: an outcome refusal for every query it
  held that was handed on, and no write of it accepted after the cut (no ledger row of it newer
  than the cut, the batch, its results, query rows and totals unchanged after it came back);
- no query has two outcomes (``check_batch``: one result per query, each chairman answer the
  provider gave used once but for queries the far worker held);
- the ledger equals the simulated provider's log, call by call (query, model, stage): every call
  the provider saw is a row, no row claims an answer the provider never gave, and the far
  worker's calls that were in flight at the cut are ``abandoned``.

The database must be across the network from the workers, so this runs on PostgreSQL (the
PostgreSQL pass of ``make test``); it is skipped, saying why, only when this machine cannot
create network namespaces. The workers' database URL sets PostgreSQL's
``idle_in_transaction_session_timeout``: without it a transaction the far worker had open at the
cut would keep its row locks (on the batch's totals, its queries) for as long as the link is down,
and the near host would wait for them.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlmodel import col

from shared.ledger import REFUSED
from shared.lifecycle.statuses import CallStatus
from shared.liveness import DEAD_AFTER_S, alive_workers
from shared.models import ProviderCall, Query
from shared.sim import SimServer
from tests.chaos.conftest import Chaos, Launch, set_sim
from tests.chaos.invariants import check_batch, tag_of
from tests.conftest import DB_KIND
from tests.helpers import poll, sim_log, tagged_queries
from tests.netns import Forwarder, Host, hosts, namespaces_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.chaos,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        DB_KIND != "postgresql",
        reason="runs in the PostgreSQL pass (CONCLAVE_TEST_DB=postgresql): the database must be "
        "across the network from the worker hosts, which a SQLite file cannot be",
    ),
]

QUERIES = 240
PREFIX = "part"
THREADS = 16
# The far host is cut once it holds at least this many queries...
HELD_AT_CUT = 4
# ... and has finished this many (so the ledger and the provider's log hold its calls too).
FINISHED_BEFORE_CUT = 5
# Seconds PostgreSQL keeps a transaction whose client went silent (see the module docstring).
IDLE_IN_TRANSACTION_S = 5
OUTCOME_REFUSED = "outcome write refused (lease lost)"
QUERY_ID = re.compile(r"\bquery_[0-9a-z]{26}\b")


@pytest.fixture
def worker_hosts() -> Iterator[list[Host]]:
    why = namespaces_available()
    if why is not None:
        pytest.skip(f"network namespaces cannot be created on this machine: {why}")
    with hosts(2) as made:
        yield made


@pytest.fixture
def forwarder() -> Iterator[Forwarder]:
    fwd = Forwarder().start()
    yield fwd
    fwd.stop()


def host_env(chaos: Chaos, host: Host, fwd: Forwarder, sim: SimServer) -> dict[str, str]:
    """The stack's environment with Redis, the database and the provider reached over the link."""
    env = chaos.stack.env
    redis = urlsplit(env["CONCLAVE_REDIS_URL"])
    redis_port = fwd.add(host.address, redis.port or 6379)
    db = make_url(env["CONCLAVE_DATABASE_URL"])
    db_port = fwd.add(host.address, db.port or 5432)
    sim_port = fwd.add(host.address, sim.port)
    options = f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S * 1000}"
    return {
        **env,
        "CONCLAVE_REDIS_URL": urlunsplit(redis._replace(netloc=f"{host.address}:{redis_port}")),
        "CONCLAVE_DATABASE_URL": db.set(
            host=host.address, port=db_port, query={"options": options}
        ).render_as_string(hide_password=False),
        "CONCLAVE_SIM_PROVIDER_URL": f"http://{host.address}:{sim_port}",
    }


def start_pool(chaos: Chaos, host: Host, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One worker pool (1 process × ``THREADS``) on ``host``, as ``Stack.start_workers`` starts one."""
    log_path = chaos.stack.logs / f"worker-{host.name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            host.argv(
                sys.executable,
                *("-m", "shared.cli.main", "worker", "--processes", "1", "--threads", str(THREADS)),
                *("--queues", "high,normal,low"),
            ),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    chaos.stack.procs.append(proc)
    return proc


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[-2])


def log_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_bytes().splitlines():
        if raw.startswith(b"{"):
            try:
                lines.append(orjson.loads(raw))
            except orjson.JSONDecodeError:
                continue
    return lines


def refusals(path: Path) -> dict[str, list[str]]:
    """The far worker's refusal lines, by kind: ``outcome`` (query ids), ``start`` and ``finish``
    (messages); and ``failed``: the query ids of messages whose run ended in an error before any
    write (a read on a connection PostgreSQL closed while the link was down)."""
    found: dict[str, list[str]] = {"outcome": [], "start": [], "finish": [], "failed": []}
    for line in log_lines(path):
        message = str(line.get("message", ""))
        if message.startswith(OUTCOME_REFUSED):
            found["outcome"].append(message.split("query ", 1)[1].split()[0])
        elif message.startswith(REFUSED):
            found["start" if "not sent" in message else "finish"].append(message)
        elif message.startswith("Failed to process message") and (match := QUERY_ID.search(message)):
            found["failed"].append(match.group(0))
    return found


def snapshot(chaos: Chaos, batch_id: str) -> dict[str, Any]:
    """What a late write could change: the batch as the API shows it, its results, its query rows
    and its ledger."""
    batch = chaos.client.get(f"/v1/batches/{batch_id}").json()
    results = chaos.client.get(f"/v1/batches/{batch_id}/results").content
    with chaos.sessions() as session:
        queries = session.execute(
            select(
                col(Query.id),
                col(Query.status),
                col(Query.worker_id),
                col(Query.finished_at),
                col(Query.result),
            )
            .where(col(Query.batch_id) == batch_id)
            .order_by(col(Query.id))
        ).all()
        ledger = session.execute(
            select(col(ProviderCall.call_key), col(ProviderCall.status), col(ProviderCall.cost_usd))
            .where(col(ProviderCall.batch_id) == batch_id)
            .order_by(col(ProviderCall.id))
        ).all()
    return {
        "batch": {k: batch[k] for k in ("status", "request_counts", "cost_usd", "usage", "completed_at")},
        "results": hashlib.sha256(results).hexdigest(),
        "queries": [(*r[:4], orjson.dumps(r[4], option=orjson.OPT_SORT_KEYS)) for r in queries],
        "ledger": [tuple(r) for r in ledger],
    }


def waiting_sessions(chaos: Chaos) -> list[tuple[Any, ...]]:
    """The deployment's database sessions that are not idle, with what they wait for and on whom:
    what a stuck batch is stuck on."""
    with chaos.sessions() as session:
        return [
            tuple(r)
            for r in session.execute(
                text(
                    "SELECT pid, state, wait_event_type, wait_event, now() - state_change,"
                    " pg_blocking_pids(pid), left(query, 120) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND state <> 'idle' AND pid <> pg_backend_pid()"
                )
            )
        ]


def stage_of(record: dict[str, Any]) -> str:
    if record["kind"] == "review":
        return "review"
    return "synthesis" if record["model"] == "chairman" else "answer"


def test_a_host_cut_off_mid_batch_loses_nothing_and_its_late_writes_are_refused(
    launch: Launch, sim: SimServer, worker_hosts: list[Host], forwarder: Forwarder
) -> None:
    near, far = worker_hosts
    chaos = launch(pools=0)
    set_sim(sim, latency_ms=150, latency_jitter_ms=50)
    near_pool = start_pool(chaos, near, host_env(chaos, near, forwarder, sim))
    far_pool = start_pool(chaos, far, host_env(chaos, far, forwarder, sim))

    def far_ids(worker_ids: list[str] | set[str]) -> set[str]:
        pids = descendants(far_pool.pid) | {far_pool.pid}
        return {w for w in worker_ids if pid_of(w) in pids}

    def both_beating() -> bool:
        alive = alive_workers(chaos.redis, chaos.namespace)
        assert chaos.broken() is None, chaos.broken()
        return len(alive) >= 2 and bool(far_ids(alive)) and len(far_ids(alive)) < len(alive)

    poll(both_beating, timeout=90, what="a worker on each host to beat")
    assert near_pool.poll() is None

    started = time.monotonic()
    batch_id = chaos.client.post(
        "/v1/batches", json={"queries": tagged_queries(QUERIES, prefix=PREFIX)}
    ).json()["id"]

    def far_running() -> tuple[dict[str, str], int]:
        """The far worker's running queries (custom id → worker id), and how many it finished."""
        with chaos.sessions() as session:
            rows = session.execute(
                select(col(Query.custom_id), col(Query.worker_id), col(Query.status)).where(
                    col(Query.batch_id) == batch_id,
                    col(Query.status).in_(("running", "succeeded")),
                    col(Query.worker_id).is_not(None),
                )
            ).all()
        far = far_ids({str(r.worker_id) for r in rows})
        mine = {r.custom_id: str(r.worker_id) for r in rows if r.status == "running" and r.worker_id in far}
        return mine, sum(1 for r in rows if r.status == "succeeded" and r.worker_id in far)

    def ready_to_cut() -> bool:
        """Once the far worker has finished some queries (its calls are in the ledger and the
        provider's log) and holds enough."""
        held, finished = far_running()
        return len(held) >= HELD_AT_CUT and finished >= FINISHED_BEFORE_CUT

    poll(ready_to_cut, timeout=60, interval=0.05, what=f"the far host to hold {HELD_AT_CUT} queries")
    far.cut()
    cut_at, cut_wall = time.monotonic(), time.time()
    # Read after the cut: the far worker cannot change it any more (but for a commit already on
    # its way, which the refusals below catch).
    held_at_cut = far_running()[0]
    far_workers = set(held_at_cut.values())
    assert held_at_cut and len(far_workers) == 1, held_at_cut
    try:
        # The batch completes on the near host alone: the far host's queries come back once
        # reconciliation finds its heartbeat DEAD_AFTER_S old.
        try:
            poll(
                lambda: chaos.client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed",
                timeout=DEAD_AFTER_S + 60,
                interval=0.25,
                what="the batch to complete while the far host is cut off",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; database sessions: {waiting_sessions(chaos)}") from None
        completed_after = time.monotonic() - cut_at
        assert far_pool.poll() is None, "the far worker pool exited while cut off"
        before = snapshot(chaos, batch_id)
        # The far worker's last beat may have been up to HEARTBEAT_S before the cut: the link
        # stays down for longer than the timeout whatever it was.
        time.sleep(max(0.0, DEAD_AFTER_S + 1 - (time.monotonic() - cut_at)))
    finally:
        far.restore()
    partition_s = time.monotonic() - cut_at
    assert partition_s > DEAD_AFTER_S

    with chaos.sessions() as session:
        final_holder = dict(
            session.execute(
                select(col(Query.custom_id), col(Query.worker_id)).where(col(Query.batch_id) == batch_id)
            ).all()
        )
    # Handed on: held by the far worker at the cut, finished by another (some it may have
    # finished in the instant before the cut).
    handed_on = {cid for cid in held_at_cut if final_holder[cid] not in far_workers}
    assert handed_on, "the far worker finished everything it held before the cut"
    # The far worker wrote nothing while cut off, so whatever it did not finish before the cut
    # was finished on the near host; that it wrote nothing after is checked below.

    # Back on the network, the far worker finishes what it was running: each outcome it then
    # tries to write is refused (a run that reads on a connection PostgreSQL closed meanwhile
    # ends in that error instead, before writing anything).
    far_log = chaos.stack.logs / f"worker-{far.name}.log"
    with chaos.sessions() as session:
        id_of = dict(
            session.execute(
                select(col(Query.custom_id), col(Query.id)).where(col(Query.batch_id) == batch_id)
            ).all()
        )
    handed_ids = {id_of[cid] for cid in handed_on}

    def far_settled() -> bool:
        found = refusals(far_log)
        return handed_ids <= set(found["outcome"]) | set(found["failed"])

    try:
        poll(far_settled, timeout=90, interval=0.25, what="the far worker to end the runs it held")
    except AssertionError as exc:
        found = refusals(far_log)
        missing = handed_ids - set(found["outcome"]) - set(found["failed"])
        raise AssertionError(
            f"{exc}: no end in its log for {sorted(missing)}; logs in {chaos.stack.logs}"
        ) from None
    settled_after = time.monotonic() - cut_at
    refused = refusals(far_log)
    assert refused["outcome"], "no outcome write of the far worker was refused"
    # Each refused outcome is of a query another worker finished.
    holder_by_id = {id_of[cid]: holder for cid, holder in final_holder.items()}
    assert all(holder_by_id[qid] not in far_workers for qid in refused["outcome"]), refused["outcome"]
    # What the far worker was running at the cut (those claimed in its last instant included).
    cid_of = {qid: cid for cid, qid in id_of.items()}
    interrupted = frozenset(held_at_cut) | {cid_of[q] for q in refused["outcome"] + refused["failed"]}
    # Its late writes changed nothing.
    assert snapshot(chaos, batch_id) == before
    with chaos.sessions() as session:
        newest_far_row = session.scalar(
            select(func.max(col(ProviderCall.created_at))).where(
                col(ProviderCall.batch_id) == batch_id, col(ProviderCall.worker_id).in_(far_workers)
            )
        )
    assert newest_far_row is not None and newest_far_row <= int(cut_wall) + 1, (newest_far_row, cut_wall)

    # No query has two outcomes; the invariants of every chaos test.
    figures = check_batch(
        chaos, sim, batch_id, PREFIX, started=started, queries=QUERIES, interrupted=interrupted
    )

    # The ledger equals the provider's log, call by call.
    with chaos.sessions() as session:
        rows = session.execute(
            select(
                col(Query.custom_id),
                col(ProviderCall.model),
                col(ProviderCall.stage),
                col(ProviderCall.status),
                col(ProviderCall.worker_id),
                col(ProviderCall.call_key),
            )
            .join(Query, col(Query.id) == col(ProviderCall.query_id))
            .where(col(ProviderCall.batch_id) == batch_id)
        ).all()
    ledger: Counter[tuple[str, str, str, str]] = Counter()
    for r in rows:
        assert r.call_key is not None, r  # nothing refused before sending in this test
        ledger[(tag_of(r.custom_id), r.model.partition(":")[2], r.stage, r.status)] += 1
        if r.status == CallStatus.ABANDONED:
            assert r.worker_id in far_workers and r.custom_id in interrupted, r
    provider_log = [rec for rec in sim_log(sim.url) if f"[tag:{PREFIX}-" in rec["text"]]
    seen: Counter[tuple[str, str, str]] = Counter()
    answered: Counter[tuple[str, str, str]] = Counter()
    for rec in provider_log:
        tag = rec["text"].split("[tag:", 1)[1].split("]", 1)[0]
        key = (tag, rec["model"], stage_of(rec))
        seen[key] += 1
        answered[key] += rec["outcome"] == "ok"
    keys = {k[:3] for k in ledger} | set(seen)
    off = {}
    for key in keys:
        succeeded = ledger[(*key, CallStatus.SUCCEEDED)]
        failed = ledger[(*key, CallStatus.FAILED)]
        abandoned = ledger[(*key, CallStatus.ABANDONED)]
        if not (
            succeeded <= answered[key] and succeeded + failed <= seen[key] <= succeeded + failed + abandoned
        ):
            off[key] = {"provider": seen[key], "ok": answered[key], "rows": (succeeded, failed, abandoned)}
    assert not off, dict(sorted(off.items())[:10])
    assert set(Counter(k[3] for k in ledger.elements())) <= {CallStatus.SUCCEEDED, CallStatus.ABANDONED}

    assert chaos.broken() is None
    print(
        "\nchaos partition: "
        + figures.line(
            held_at_cut=len(held_at_cut),
            handed_on=len(handed_on),
            refused_outcomes=len(refused["outcome"]),
            refused_call_starts=len(refused["start"]),
            refused_call_finishes=len(refused["finish"]),
            ended_in_error=len(set(refused["failed"]) & handed_ids),
            abandoned=sum(n for k, n in ledger.items() if k[3] == CallStatus.ABANDONED),
            completed_after_cut=f"{completed_after:.1f}s",
            partition=f"{partition_s:.1f}s",
            far_settled_after_cut=f"{settled_after:.1f}s",
            forwarded_connections=forwarder.connections,
        )
    )
