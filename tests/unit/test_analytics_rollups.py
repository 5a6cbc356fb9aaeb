"""The analytics fold on a real database (SQLite, or PostgreSQL with CONCLAVE_TEST_DB): what two
known councils add to the leaderboard and the batch report, folded once however often it runs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from shared.analytics.feedback import record_feedback
from shared.analytics.reports import batch_report, leaderboard
from shared.analytics.rollups import fold_finished
from shared.errors import Conflict, NotFound
from shared.models import Batch, ProviderCall, Query, Tenant

T0 = 1_764_547_200  # 2025-12-01 00:00 UTC


def member(model: str, ok: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "requested_model": model,
        "status": "succeeded" if ok else "failed",
        "answer": "…" if ok else None,
        "error": None if ok else {"type": "server", "message": "500"},
        "latency_ms": 10,
        "duplicate_of": None,
    }


def review(
    reviewer: str, shown: list[str], ranking: list[str] | None, status: str = "valid"
) -> dict[str, Any]:
    labels = {f"Response {chr(65 + i)}": m for i, m in enumerate(shown)}
    return {
        "reviewer": reviewer,
        "requested_reviewer": reviewer,
        "status": status,
        "labels": labels,
        "ranking": ranking,
    }


# Query 1: a is ranked first by both of its peers; b's review put the first-shown answer first.
RESULT_1 = {
    "synthesis": "chairman",
    "answered_by": "chair",
    "members": [member("a"), member("b"), member("c")],
    "reviews": [
        review("a", ["c", "b"], ["b", "c"]),  # first shown: c, ranked first: b
        review("b", ["a", "c"], ["a", "c"]),  # first shown ranked first
        review("c", ["b", "a"], ["a", "b"]),
    ],
}
# Query 2: c failed to answer; one review is invalid, so no agreement for this query.
RESULT_2 = {
    "synthesis": "top_ranked",
    "answered_by": "a",
    "members": [member("a"), member("b"), member("c", ok=False)],
    "reviews": [review("a", ["b"], None, "invalid"), review("b", ["a"], ["a"])],
}


def seed(sessions: Any) -> tuple[str, str]:
    with sessions.begin() as s:
        s.add(Tenant(id="ten_1", name="one", webhook_secret="x", created_at=T0))
        s.flush()
        s.add(
            Batch(
                id="batch_1",
                tenant_id="ten_1",
                status="completed",
                priority="normal",
                completion_window="24h",
                total=2,
                created_at=T0,
                expires_at=T0 + 86400,
            )
        )
        s.flush()
        for i, (result, latency) in enumerate(((RESULT_1, 900), (RESULT_2, 300)), start=1):
            s.add(
                Query(
                    id=f"q_{i}",
                    batch_id="batch_1",
                    tenant_id="ten_1",
                    seq=i,
                    custom_id=f"c{i}",
                    status="succeeded",
                    priority="normal",
                    request={},
                    result=result,
                    finished_at=T0 + 100 * i,
                    latency_ms=latency,
                )
            )
        s.flush()
        calls = [
            ("q_1", "a", "answer", "succeeded", None, 100, 0.01),
            ("q_1", "b", "answer", "failed", "timeout", 1000, 0.0),
            ("q_1", "b", "answer", "succeeded", None, 200, 0.02),
            ("q_1", "c", "answer", "succeeded", None, 400, 0.03),
            ("q_1", "a", "review", "succeeded", None, 100, 0.01),
            ("q_1", "chair", "synthesis", "succeeded", None, 800, 0.05),
            ("q_2", "c", "answer", "failed", "server", 5, 0.0),
            ("q_2", "a", "answer", "in_flight", None, 0, 0.01),  # never ended: not a call outcome
        ]
        for qid, model, stage, status, category, latency, cost in calls:
            s.add(
                ProviderCall(
                    query_id=qid,
                    batch_id="batch_1",
                    tenant_id="ten_1",
                    model=model,
                    stage=stage,
                    attempt=1,
                    status=status,
                    error_category=category,
                    latency_ms=latency,
                    cost_usd=cost,
                    created_at=T0,
                )
            )
    return "ten_1", "batch_1"


def test_a_fold_adds_each_query_once_and_waits_for_fresh_ones(own_sessions: Any) -> None:
    seed(own_sessions)
    # Query 2 ended 30 s before "now": not settled yet.
    assert fold_finished(own_sessions, now=T0 + 200 + 29, settle_s=30) == 1
    assert fold_finished(own_sessions, now=T0 + 200 + 29, settle_s=30) == 0
    assert fold_finished(own_sessions, now=T0 + 10_000, settle_s=30) == 1
    assert fold_finished(own_sessions, now=T0 + 20_000, settle_s=30) == 0

    with own_sessions() as s:
        board = {r["model"]: r for r in leaderboard(s, "ten_1", T0, T0 + 86400)}
        other = leaderboard(s, "ten_other", T0, T0 + 86400)
        report = batch_report(s, "ten_1", "batch_1")
    assert other == []
    a, b, c = board["a"], board["b"], board["c"]
    assert (a["answers"], b["answers"], c["answers"], c["answer_failures"]) == (2, 2, 1, 1)
    assert (b["calls"], b["failures"], b["timeouts"], b["error_rate"], b["timeout_rate"]) == (
        2,
        1,
        1,
        0.5,
        0.5,
    )
    assert (c["calls"], c["failures"], c["timeouts"]) == (2, 1, 0)
    assert (a["calls"], a["cost_usd"]) == (2, 0.02)  # the in-flight row is not an outcome
    # Valid rankings: [b, c], [a, c], [a, b], [a] → a first 3 of 3 votes, b 1 of 2, c 0 of 2.
    assert (a["votes"], a["win_rate"], a["mean_rank"]) == (3, 1.0, 1.0)
    assert (b["votes"], b["win_rate"], b["mean_rank"]) == (2, 0.5, 1.5)
    assert (c["votes"], c["win_rate"], c["mean_rank"]) == (2, 0.0, 2.0)
    assert a["cost_per_win_usd"] == pytest.approx(0.02 / 3, abs=1e-8)
    assert c["cost_per_win_usd"] is None
    assert [r["model"] for r in leaderboard_order(own_sessions)] == ["a", "b", "c", "chair"]
    assert board["chair"]["strength"] is None and board["chair"]["latency_p50_ms"] == pytest.approx(
        800, rel=0.05
    )

    assert report["queries_folded"] == 2
    assert report["reviews"] == {"total": 5, "valid": 4, "invalid": 1, "failed": 0}
    assert report["invalid_review_rate"] == 0.2
    assert report["agreement"] == {"kendall_w": 1.0, "chance": 0.75, "queries": 1}
    assert report["synthesis"] == {"chairman": 1, "fallback_chairman": 0, "top_ranked": 1, "single": 0}
    bias = report["position_bias"]
    # Reviews shown 2 answers: 3, of which 1 ranked the first shown first; shown 1: 1 of 1.
    assert [(r["shown"], r["reviews"], r["first_ranked_first"]) for r in bias["by_shown"]] == [
        (1, 1, 1),
        (2, 3, 1),
    ]
    assert bias["chance"] == pytest.approx((1 + 3 / 2) / 4)
    stages = {s["stage"]: s for s in report["stages"]}
    assert (stages["answer"]["calls"], stages["answer"]["failures"]) == (5, 2)
    assert stages["synthesis"]["latency_p50_ms"] == pytest.approx(800, rel=0.05)
    assert [q["query_id"] for q in report["slowest_queries"]] == ["q_1", "q_2"]


def leaderboard_order(sessions: Any) -> list[dict[str, Any]]:
    with sessions() as s:
        return leaderboard(s, None, T0, T0 + 86400)


def test_feedback_is_one_rating_per_key_credited_to_the_answering_model(own_sessions: Any) -> None:
    seed(own_sessions)
    with own_sessions.begin() as s:
        record_feedback(s, "ten_1", "key_1", "q_1", 2, None, T0)
        stored = record_feedback(s, "ten_1", "key_1", "q_1", 5, "better on reread", T0 + 5)
        record_feedback(s, "ten_1", "key_2", "q_1", 4, None, T0 + 6)
    assert (stored["rating"], stored["comment"], stored["model"]) == (5, "better on reread", "chair")
    with own_sessions() as s:
        board = {r["model"]: r for r in leaderboard(s, "ten_1", T0, T0 + 86400)}
    # No fold yet: feedback is read from its own rows.
    assert board == {}
    fold_finished(own_sessions, now=T0 + 10_000)
    with own_sessions() as s:
        board = {r["model"]: r for r in leaderboard(s, "ten_1", T0, T0 + 86400)}
    assert board["chair"]["feedback"] == {"count": 2, "mean": 4.5}
    with own_sessions.begin() as s, pytest.raises(NotFound):
        record_feedback(s, "ten_other", "key_1", "q_1", 3, None, T0)
    with own_sessions.begin() as s:
        s.get(Query, "q_2").status = "failed"
    with own_sessions.begin() as s, pytest.raises(Conflict):
        record_feedback(s, "ten_1", "key_1", "q_2", 3, None, T0)


def test_folds_running_at_once_add_each_query_once(own_sessions: Any) -> None:
    # Two schedulers in a leadership handover: the cursor row is locked by the page being folded.
    seed(own_sessions)
    with ThreadPoolExecutor(max_workers=2) as pool:
        folded = list(pool.map(lambda _: fold_finished(own_sessions, now=T0 + 10_000, page=1), range(2)))
    assert sum(folded) == 2
    with own_sessions() as s:
        assert batch_report(s, "ten_1", "batch_1")["queries_folded"] == 2
        assert {r["model"]: r["answers"] for r in leaderboard(s, "ten_1", T0, T0 + 86400)}["a"] == 2


def test_the_operator_view_sums_every_tenant_and_a_range_counts_whole_days(own_sessions: Any) -> None:
    seed(own_sessions)
    with own_sessions.begin() as s:
        s.add(Tenant(id="ten_2", name="two", webhook_secret="x", created_at=T0))
        s.flush()
        s.add(
            Batch(
                id="batch_2",
                tenant_id="ten_2",
                status="completed",
                priority="normal",
                completion_window="24h",
                total=1,
                created_at=T0,
                expires_at=T0 + 86400,
            )
        )
        s.flush()
        # Finished the next UTC day.
        s.add(
            Query(
                id="q_9",
                batch_id="batch_2",
                tenant_id="ten_2",
                seq=1,
                custom_id="c9",
                status="succeeded",
                priority="normal",
                request={},
                result=RESULT_1,
                finished_at=T0 + 86400 + 50,
                latency_ms=10,
            )
        )
    fold_finished(own_sessions, now=T0 + 3 * 86400)
    with own_sessions() as s:
        everyone = {r["model"]: r["answers"] for r in leaderboard(s, None, T0, T0 + 2 * 86400)}
        first_day = {r["model"]: r["answers"] for r in leaderboard(s, None, T0 + 3600, T0 + 7200)}
        second_tenant = {r["model"]: r["answers"] for r in leaderboard(s, "ten_2", T0, T0 + 2 * 86400)}
    assert everyone == {"a": 3, "b": 3, "c": 2, "chair": 0}
    assert first_day == {"a": 2, "b": 2, "c": 1, "chair": 0}
    assert second_tenant == {"a": 1, "b": 1, "c": 1}
