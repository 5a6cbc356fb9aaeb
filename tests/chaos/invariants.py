"""What must hold after any chaos, checked in one place for every chaos test.

``check_batch`` waits for the batch to end, then checks, from the API, the database and the
simulated provider's own request log:

- every accepted query is terminal exactly once: one result record per custom id, no more, no
  fewer, none duplicated; every row in the database terminal, with no lease left;
- ``request_counts`` add up to ``total`` at every poll while the batch runs (and the number of
  terminal queries never goes down), and at the end agree with the results and the database;
- each succeeded query carries a real answer, each failed one an error;
- the ledger holds exactly one succeeded synthesis call per query whose answer came from a
  chairman, and none for the others;
- the provider answered each query's chairman call once, except for queries a killed worker held
  (``interrupted``): its call may have reached the provider before it died;
- the batch's terminal event was emitted once per webhook target;
- the ledger (SPEC §17): every call the provider saw is a ledger row (succeeded, failed, or
  abandoned when its worker died: none left in flight), and no row is a call that was never sent
  but for abandoned ones; the batch's cost and tokens equal the sum of its rows; and no query
  ran more than ``CONCLAVE_QUERY_MAX_RUNS`` times (runs that only waited
  out an open circuit aside).

It returns the figures the test prints.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlmodel import col

from shared.lifecycle.statuses import CallStatus
from shared.models import ProviderCall, Query, WebhookDelivery
from shared.settings import Settings
from shared.sim import SimServer
from tests.chaos.conftest import QUERIES, Chaos
from tests.helpers import counts_add_up, jsonl, sim_log, wait_for_batch

CHAIRED = ("chairman", "fallback_chairman")
SYNTHESES = (*CHAIRED, "top_ranked")
_TAG = re.compile(r"\[tag:([A-Za-z0-9_-]+-\d{6})\]")


def tag_of(custom_id: str) -> str:
    """The tag ``tagged_queries`` put in a query's prompt, from its custom id."""
    prefix, _, number = custom_id.rpartition("-")
    return f"{prefix}-{int(number):06d}"


@dataclass
class Figures:
    batch: dict[str, Any]
    records: list[dict[str, Any]]
    seconds: float
    attempts: dict[int, int]
    synthesis: Counter[str]
    # Queries that succeeded with less than the full council: a member failed, or no chairman.
    degraded: int
    repeated_at_provider: set[str] = field(default_factory=set)
    ledger: dict[str, int] = field(default_factory=dict)  # ledger rows by status

    def line(self, **extra: object) -> str:
        counts = self.batch["request_counts"]
        parts = {
            "queries": counts["total"],
            "time": f"{self.seconds:.1f}s",
            "succeeded": counts["completed"],
            "degraded": self.degraded,
            "failed": counts["failed"],
            "attempts": dict(sorted(self.attempts.items())),
            "synthesis": dict(sorted(self.synthesis.items())),
            "chairman_answered_twice": len(self.repeated_at_provider),
            "ledger": dict(sorted(self.ledger.items())),
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())


def check_batch(
    chaos: Chaos,
    sim: SimServer,
    batch_id: str,
    prefix: str,
    *,
    started: float,
    queries: int = QUERIES,
    interrupted: frozenset[str] = frozenset(),
    all_succeed: bool = True,
    webhook_targets: int = 0,
    timeout: float = 600,
) -> Figures:
    """``started``: ``time.monotonic()`` at submission; ``interrupted``: custom ids held by a
    worker killed mid-call (their result still counts once)."""
    done_so_far = [0]

    def consistent(batch: dict[str, Any]) -> None:
        # While it runs too: the parts add up, and a terminal query never leaves its state.
        counts = batch["request_counts"]
        assert counts_add_up(batch) and counts["total"] == queries, counts
        done = counts["completed"] + counts["failed"]
        assert done >= done_so_far[0], (done, done_so_far)
        done_so_far[0] = done

    final = wait_for_batch(chaos.client, batch_id, timeout=timeout, on_poll=consistent)
    seconds = time.monotonic() - started
    counts = final["request_counts"]
    assert final["status"] == "completed", final
    assert counts_add_up(final) and counts["total"] == queries, counts
    assert counts["queued"] == counts["running"] == counts["cancelled"] == counts["expired"] == 0, counts
    if all_succeed:
        assert counts["completed"] == queries, counts

    # One result per accepted query, none missing, none twice.
    records = jsonl(chaos.client.get(f"/v1/batches/{batch_id}/results"))
    custom_ids = [r["custom_id"] for r in records]
    duplicated = [cid for cid, n in Counter(custom_ids).items() if n > 1]
    assert not duplicated, f"{len(duplicated)} custom ids with several results, e.g. {duplicated[:5]}"
    assert set(custom_ids) == {f"{prefix}-{i}" for i in range(queries)}
    assert len({r["query_id"] for r in records}) == queries
    by_status = Counter(r["status"] for r in records)
    assert by_status == Counter(
        {k: v for k, v in (("succeeded", counts["completed"]), ("failed", counts["failed"])) if v}
    ), (by_status, counts)
    for r in records:
        if r["status"] == "succeeded":
            assert isinstance(r["answer"], str) and r["answer"].strip(), r
            assert r["error"] is None and r["synthesis"] in SYNTHESES, r
            assert not r["answer"].lower().startswith("error"), r
        else:
            assert r["answer"] is None and r["error"]["type"] and r["error"]["message"], r
    if all_succeed:
        assert all(r["synthesis"] == "chairman" for r in records)
    degraded = sum(
        1
        for r in records
        if r["status"] == "succeeded"
        and (r["synthesis"] != "chairman" or any(m["status"] != "succeeded" for m in r["members"]))
    )

    with chaos.sessions() as session:
        rows = session.execute(
            select(
                col(Query.id),
                col(Query.custom_id),
                col(Query.status),
                col(Query.attempts),
                col(Query.lease_expires_at),
                col(Query.finished_at),
                col(Query.circuit_waits),
                col(Query.error),
            ).where(col(Query.batch_id) == batch_id)
        ).all()
        ledger = session.execute(
            select(
                col(ProviderCall.status),
                col(ProviderCall.call_key),
                col(ProviderCall.input_tokens),
                col(ProviderCall.output_tokens),
                col(ProviderCall.cost_usd),
            ).where(col(ProviderCall.batch_id) == batch_id)
        ).all()
        synthesised = dict(
            session.execute(
                select(col(ProviderCall.query_id), func.count())
                .where(
                    col(ProviderCall.batch_id) == batch_id,
                    col(ProviderCall.stage) == "synthesis",
                    col(ProviderCall.status) == "succeeded",
                )
                .group_by(col(ProviderCall.query_id))
            ).all()
        )
        events = session.scalar(
            select(func.count()).where(
                col(WebhookDelivery.batch_id) == batch_id,
                col(WebhookDelivery.event_type) == "batch.completed",
            )
        )

    # The database agrees: every row terminal once, nothing still leased.
    assert len(rows) == queries
    assert Counter(r.status for r in rows) == by_status
    assert all(r.lease_expires_at is None and r.finished_at is not None and r.attempts >= 1 for r in rows)
    attempts = Counter(r.attempts for r in rows)

    # The ledger: one succeeded synthesis for each query answered by a chairman, none for the others.
    synthesis_of = {r["query_id"]: r["synthesis"] if r["status"] == "succeeded" else None for r in records}
    # A query a killed worker held may have paid for a synthesis in the run that died too.
    interrupted_ids = {r["query_id"] for r in records if r["custom_id"] in interrupted}
    wrong = {
        qid: (s, synthesised.get(qid, 0))
        for qid, s in synthesis_of.items()
        if synthesised.get(qid, 0) != (1 if s in CHAIRED else 0)
        and not (qid in interrupted_ids and synthesised.get(qid, 0) >= (1 if s in CHAIRED else 0))
    }
    assert not wrong, f"{len(wrong)} queries with a wrong number of syntheses, e.g. {list(wrong.items())[:5]}"

    # The ledger equals what the provider saw, and the batch's totals equal the ledger.
    provider_log = [rec for rec in sim_log(sim.url) if f"[tag:{prefix}-" in rec["text"]]
    ledger_status = Counter(c.status for c in ledger)
    assert ledger_status[CallStatus.IN_FLIGHT] == 0, ledger_status
    # Every call the provider answered is a row with its real figures; a call a dying worker had
    # in flight is an abandoned row. A worker killed between writing a call's row and its bytes
    # leaving leaves a row for a call the provider never saw: which of its abandoned calls got
    # through cannot be known from the worker's side, so the ledger errs toward the larger bill.
    finished = sum(1 for c in ledger if c.call_key is not None and c.status != CallStatus.ABANDONED)
    abandoned = ledger_status[CallStatus.ABANDONED]
    assert finished <= len(provider_log) <= finished + abandoned, (finished, abandoned, len(provider_log))
    assert final["cost_usd"] == round(sum(c.cost_usd for c in ledger), 8)
    assert final["usage"]["input_tokens"] == sum(c.input_tokens for c in ledger)
    assert final["usage"]["output_tokens"] == sum(c.output_tokens for c in ledger)
    max_runs = Settings().query_max_runs
    overrun = [
        r.id
        for r in rows
        if r.attempts - r.circuit_waits > max_runs
        and not (
            r.attempts - r.circuit_waits == max_runs + 1
            and (r.error or {}).get("type") == "attempts_exhausted"
        )
    ]
    assert not overrun, f"{len(overrun)} queries ran more than {max_runs} times"

    # The provider: each chairman answer it gave went to a query that used it, once, unless a killed
    # worker held that query.
    answered = Counter(
        match.group(1)
        for rec in provider_log
        if rec["model"] == "chairman" and rec["outcome"] == "ok" and (match := _TAG.search(rec["text"]))
    )
    chaired = [r for r in records if r["status"] == "succeeded" and r["synthesis"] == "chairman"]
    expected = Counter(tag_of(r["custom_id"]) for r in chaired)
    allowed = {tag_of(cid) for cid in interrupted}
    off = {tag for tag in set(answered) | set(expected) if answered[tag] != expected[tag]}
    assert off <= allowed, {tag: (answered[tag], expected[tag]) for tag in sorted(off - allowed)[:10]}
    missing = {tag for tag in expected if answered[tag] == 0}
    assert not missing, f"chairman answers the provider never gave: {sorted(missing)[:10]}"

    assert events == webhook_targets, f"batch.completed emitted {events} times for {webhook_targets} targets"
    return Figures(
        batch=final,
        records=records,
        seconds=seconds,
        attempts=dict(attempts),
        synthesis=Counter(r["synthesis"] or r["status"] for r in records),
        degraded=degraded,
        repeated_at_provider={tag for tag, n in answered.items() if n > 1},
        ledger={**ledger_status, "provider_saw": len(provider_log)},
    )
