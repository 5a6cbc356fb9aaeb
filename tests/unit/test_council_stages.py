"""The council end to end against a scripted ``complete``: no network, no sleeping."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence

import orjson
import pytest

from shared.providers.errors import ProviderError, RateLimited, ServerError, Timeout
from workers.council import (
    CallRequest,
    Completion,
    CouncilResult,
    CouncilSpec,
    KnowledgeSnippet,
    QueryInput,
    RankEntry,
    run_council,
)

# A Completion names who wrote it (a fallback answering in the model's place); a str is the model's own.
Reply = str | Completion | ProviderError | Callable[[CallRequest], str | Completion]
MEMBERS = ("m1", "m2", "m3")
_BLOCK = re.compile(r"^=== (Response [A-Z]+) ===\nanswer from (\S+)$", re.MULTILINE)


class FakeComplete:
    """Answers by (model, stage); a review ranks the answers by ``preference`` unless scripted.

    A fallback is scripted as a ``Completion`` naming it: ``{("m1", "answer"): answered_by("m2")}``.
    """

    def __init__(self, script: dict[tuple[str, str], Reply] | None = None, preference: Sequence[str] = ()):
        self.script = script or {}
        self.preference = list(preference)
        self.requests: list[CallRequest] = []

    async def __call__(self, request: CallRequest) -> Completion:
        self.requests.append(request)
        reply = self.script.get((request.model, request.stage))
        if isinstance(reply, ProviderError):
            raise reply
        if callable(reply):
            reply = reply(request)
        if reply is None:
            if request.stage == "answer":
                reply = f"answer from {request.model}"
            elif request.stage == "review":
                reply = rank_by(self.preference)(request)
            else:
                reply = f"synthesis by {request.model}"
        return reply if isinstance(reply, Completion) else Completion(reply, request.model)

    def calls(self, stage: str) -> list[CallRequest]:
        return [r for r in self.requests if r.stage == stage]


def seen_labels(request: CallRequest) -> dict[str, str]:
    """label -> model, read back from the answers shown in a review prompt."""
    return dict(_BLOCK.findall(request.messages[-1]["content"]))


def rank_by(preference: Sequence[str]) -> Callable[[CallRequest], str]:
    def review(request: CallRequest) -> str:
        labels = seen_labels(request)
        rank = {model: n for n, model in enumerate(preference)}
        order = sorted(labels, key=lambda label: (rank.get(labels[label], len(rank)), labels[label]))
        lines = "\n".join(f"{n}. {label}" for n, label in enumerate(order, start=1))
        return f"All fine.\n\nFINAL RANKING:\n{lines}"

    return review


def answered_by(model: str) -> Completion:
    return Completion(f"answer from {model}", model)


def run(spec: CouncilSpec, complete: FakeComplete, query: QueryInput | None = None) -> CouncilResult:
    query = query or QueryInput("q-1", ({"role": "user", "content": "Why is the sky blue?"},), 300, 0.7)
    return asyncio.run(run_council(spec, query, complete))


def council(
    members: Sequence[str] = MEMBERS,
    chairman_fallbacks: tuple[str, ...] = (),
    min_answers: int | None = None,
    review_max_tokens: int | None = 2048,
    synthesis_max_tokens: int | None = 4096,
) -> CouncilSpec:
    return CouncilSpec(
        "council",
        tuple(members),
        "chair",
        chairman_fallbacks,
        min_answers,
        review_max_tokens,
        synthesis_max_tokens,
    )


def test_full_council() -> None:
    fake = FakeComplete(preference=["m3", "m1", "m2"])
    result = run(council(), fake)

    assert (result.status, result.synthesis, result.chairman) == ("succeeded", "chairman", "chair")
    assert result.answer == "synthesis by chair"
    assert result.answered_by == "chair"
    assert [m.status for m in result.members] == ["succeeded"] * 3
    assert [r.status for r in result.reviews] == ["valid"] * 3
    # m3 is ranked by m1 and m2 (1st both times); m1 by m2 (2nd) and m3 (1st); m2 by m1 and m3 (2nd).
    assert result.aggregate_ranking == [
        RankEntry("m3", 1.0, 2),
        RankEntry("m1", 1.5, 2),
        RankEntry("m2", 2.0, 2),
    ]
    assert all(isinstance(m.latency_ms, int) and m.latency_ms >= 0 for m in result.members)
    assert [r.model for r in fake.requests[:3]] == list(MEMBERS)


def test_call_parameters_per_stage() -> None:
    fake = FakeComplete()
    run(council(), fake)
    # The query's max_tokens is for its answers; reviews and the synthesis have budgets of their own.
    assert {(r.max_tokens, r.temperature) for r in fake.calls("answer")} == {(300, 0.7)}
    assert {(r.max_tokens, r.temperature) for r in fake.calls("review")} == {(2048, None)}
    assert {(r.max_tokens, r.temperature) for r in fake.calls("synthesis")} == {(4096, None)}


def test_reviewers_never_see_their_own_answer() -> None:
    fake = FakeComplete()
    result = run(council(["m1", "m2", "m3", "m4", "m5"]), fake)
    for request in fake.calls("review"):
        shown = seen_labels(request)
        assert request.model not in shown.values()
        assert sorted(shown.values()) == sorted({"m1", "m2", "m3", "m4", "m5"} - {request.model})
    for review in result.reviews:
        assert review.reviewer not in review.labels.values()
        assert review.ranking is not None and review.reviewer not in review.ranking


def test_label_order_is_shuffled_per_reviewer_and_reproducible() -> None:
    members = ["m1", "m2", "m3", "m4", "m5"]

    def orders() -> dict[str, list[str]]:
        result = run(council(members), FakeComplete())
        return {r.reviewer: list(r.labels.values()) for r in result.reviews}

    first, second = orders(), orders()
    assert first == second
    in_member_order = {r: [m for m in members if m != r] for r in members}
    assert first != in_member_order
    # Where a model sits among the labels varies between reviewers, so position bias is spread.
    assert len({order.index("m5") for reviewer, order in first.items() if reviewer != "m5"}) > 1

    other_question = QueryInput("q-2", ({"role": "user", "content": "Why is the sea salty?"},))
    result = asyncio.run(run_council(council(members), other_question, FakeComplete()))
    assert {r.reviewer: list(r.labels.values()) for r in result.reviews} != first
    # The same question in another query (another batch) is shown in the same order: its review
    # prompts are the same, so the exact cache can answer them (SPEC §14).
    same_question = QueryInput("q-3", ({"role": "user", "content": "Why is the sky blue?"},), 300, 0.7)
    result = asyncio.run(run_council(council(members), same_question, FakeComplete()))
    assert {r.reviewer: list(r.labels.values()) for r in result.reviews} == first


def test_a_failed_member_is_recorded_and_the_council_goes_on() -> None:
    fake = FakeComplete({("m2", "answer"): Timeout("no answer within 60 s")})
    result = run(council(), fake)

    assert result.status == "succeeded"
    m2 = result.members[1]
    assert (m2.status, m2.answer, m2.error) == (
        "failed",
        None,
        {"type": "timeout", "message": "no answer within 60 s"},
    )
    assert sorted(r.reviewer for r in result.reviews) == ["m1", "m3"]
    assert RankEntry("m2", None, 0) in result.aggregate_ranking
    assert "answer from m2" not in fake.calls("synthesis")[0].messages[-1]["content"]


def test_empty_answer_is_a_bad_response() -> None:
    result = run(council(), FakeComplete({("m1", "answer"): "  \n"}))
    assert result.members[0].status == "failed"
    assert result.members[0].error is not None and result.members[0].error["type"] == "bad_response"


def test_too_few_answers_fails_the_query_with_the_causes() -> None:
    fake = FakeComplete(
        {("m1", "answer"): RateLimited("slow down"), ("m2", "answer"): ServerError("HTTP 502")}
    )
    result = run(council(), fake)

    assert (result.status, result.answer, result.synthesis) == ("failed", None, None)
    assert result.error is not None and result.error["type"] == "insufficient_answers"
    assert result.error["message"].startswith("1 of 3 members answered, 2 needed")
    assert "m1 (rate_limited)" in result.error["message"]
    assert "m2 (server)" in result.error["message"]
    assert fake.calls("review") == [] and fake.calls("synthesis") == []
    assert [m.status for m in result.members] == ["failed", "failed", "succeeded"]


def test_min_answers_one_with_a_single_answer_skips_review_but_synthesises() -> None:
    fake = FakeComplete({("m1", "answer"): Timeout("t"), ("m2", "answer"): Timeout("t")})
    result = run(council(min_answers=1), fake)

    assert (result.status, result.synthesis) == ("succeeded", "chairman")
    assert fake.calls("review") == [] and result.reviews == []
    assert all(e.votes == 0 and e.mean_rank is None for e in result.aggregate_ranking)


def test_an_invalid_review_is_recorded_and_excluded() -> None:
    fake = FakeComplete({("m1", "review"): "FINAL RANKING:\n1. Response A\n2. Response A"}, preference=["m1"])
    result = run(council(), fake)

    m1 = result.reviews[0]
    assert (m1.reviewer, m1.status, m1.ranking) == ("m1", "invalid", None)
    assert m1.error == {"type": "invalid_ranking", "message": "duplicate label 'Response A'"}
    assert m1.text is not None
    assert sum(e.votes for e in result.aggregate_ranking) == 4  # two valid reviews of two answers each
    assert result.status == "succeeded"


def test_a_failed_review_is_recorded() -> None:
    result = run(council(), FakeComplete({("m3", "review"): Timeout("t")}))
    m3 = result.reviews[2]
    assert (m3.status, m3.text, m3.error) == ("failed", None, {"type": "timeout", "message": "t"})
    assert sum(e.votes for e in result.aggregate_ranking) == 4


def test_chairman_sees_anonymous_answers_ranking_and_relabelled_reviews() -> None:
    def praise_m3(request: CallRequest) -> str:
        label = next(lbl for lbl, model in seen_labels(request).items() if model == "m3")
        return rank_by(["m3"])(request).replace("All fine.", f"{label} is the clearest.")

    fake = FakeComplete({("m1", "review"): praise_m3})
    run(council(), fake)
    (request,) = fake.calls("synthesis")
    content = request.messages[-1]["content"]

    # The chairman labels answers in member order: m3 is Response C whatever m1 saw.
    assert "=== Response C ===\nanswer from m3" in content
    assert "=== Review by the author of Response A ===\nResponse C is the clearest." in content
    assert "FINAL RANKING" not in content
    assert "m1" not in content.replace("answer from m1", "")


def test_chairman_failure_falls_back_in_order() -> None:
    fake = FakeComplete({("chair", "synthesis"): Timeout("t"), ("backup1", "synthesis"): ServerError("boom")})
    result = run(council(chairman_fallbacks=("backup1", "backup2")), fake)

    assert (result.synthesis, result.chairman, result.answer) == (
        "fallback_chairman",
        "backup2",
        "synthesis by backup2",
    )
    assert [(a.model, a.status) for a in result.synthesis_attempts] == [
        ("chair", "failed"),
        ("backup1", "failed"),
        ("backup2", "succeeded"),
    ]
    assert result.synthesis_attempts[0].error == {"type": "timeout", "message": "t"}


def test_empty_chairman_answer_is_not_an_answer() -> None:
    fake = FakeComplete({("chair", "synthesis"): ""})
    result = run(council(chairman_fallbacks=("backup",)), fake)
    assert (result.synthesis, result.chairman) == ("fallback_chairman", "backup")
    assert result.synthesis_attempts[0].error is not None
    assert result.synthesis_attempts[0].error["type"] == "bad_response"


def test_all_chairmen_failing_returns_the_top_ranked_answer() -> None:
    fake = FakeComplete(
        {("chair", "synthesis"): Timeout("t"), ("backup", "synthesis"): "   "}, preference=["m2", "m3"]
    )
    result = run(council(chairman_fallbacks=("backup",)), fake)

    assert (result.status, result.synthesis, result.chairman) == ("succeeded", "top_ranked", None)
    assert (result.answer, result.answered_by) == ("answer from m2", "m2")
    assert result.error is None
    assert "Error" not in (result.answer or "")


def test_top_ranked_without_votes_is_the_first_member_that_answered() -> None:
    fake = FakeComplete(
        {
            ("m1", "answer"): Timeout("t"),
            ("m2", "review"): "no ranking",
            ("m3", "review"): "no ranking",
            ("chair", "synthesis"): Timeout("t"),
        }
    )
    result = run(council(), fake)
    assert (result.synthesis, result.answer) == ("top_ranked", "answer from m2")


def test_single_mode_asks_only_the_first_member() -> None:
    fake = FakeComplete()
    result = run(CouncilSpec("single", MEMBERS, chairman="chair"), fake)

    assert [r.model for r in fake.requests] == ["m1"]
    assert (result.status, result.synthesis, result.answer, result.chairman) == (
        "succeeded",
        "single",
        "answer from m1",
        None,
    )
    assert result.reviews == []


def test_single_mode_failure_carries_the_member_error() -> None:
    fake = FakeComplete({("m1", "answer"): RateLimited("slow down")})
    result = run(CouncilSpec("single", MEMBERS, chairman="chair"), fake)
    assert (result.status, result.answer) == ("failed", None)
    assert result.error == {"type": "rate_limited", "message": "slow down"}


def test_one_member_council_skips_review_and_synthesis() -> None:
    fake = FakeComplete()
    result = run(council(["m1"]), fake)
    assert [r.stage for r in fake.requests] == ["answer"]
    assert (result.status, result.synthesis, result.answer) == ("succeeded", "single", "answer from m1")


def test_knowledge_reaches_stage_one_and_the_chairman() -> None:
    query = QueryInput(
        "q-1",
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rates?"}),
        knowledge=(KnowledgeSnippet("k1", "Rates rise", "Up 0.25."), KnowledgeSnippet("k2", "Jobs", "Flat.")),
    )
    fake = FakeComplete()
    run(council(), fake, query)

    for request in fake.calls("answer"):
        assert [m["role"] for m in request.messages] == ["system", "user"]
        assert "[1] Rates rise\nUp 0.25." in request.messages[0]["content"]
        assert "[2] Jobs\nFlat." in request.messages[0]["content"]
        assert all("FINAL RANKING" not in m["content"] for m in request.messages)
    assert "[1] Rates rise" in fake.calls("synthesis")[0].messages[0]["content"]
    assert all("[1] Rates rise" not in r.messages[-1]["content"] for r in fake.calls("review"))


@pytest.mark.parametrize(
    "script",
    [{}, {("m1", "review"): "bad"}, {("chair", "synthesis"): Timeout("t")}, {("m1", "answer"): Timeout("t")}],
)
def test_to_dict_is_json_ready(script: dict[tuple[str, str], Reply]) -> None:
    result = run(council(), FakeComplete(script))
    data = orjson.loads(orjson.dumps(result.to_dict()))
    assert data["status"] == "succeeded"
    assert data["aggregate_ranking"][0].keys() == {"model", "mean_rank", "votes"}
    assert set(data["members"][0]) == {
        "model",
        "requested_model",
        "status",
        "answer",
        "error",
        "latency_ms",
        "duplicate_of",
    }


def test_failed_result_to_dict() -> None:
    result = run(council(), FakeComplete({(m, "answer"): Timeout("t") for m in MEMBERS}))
    data = orjson.loads(orjson.dumps(result.to_dict()))
    assert data["error"]["type"] == "insufficient_answers"


@pytest.mark.parametrize("members", [(), ("m1", "m1")])
def test_spec_refuses_empty_or_repeated_members(members: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        CouncilSpec("council", members, chairman="chair")


# -- a fallback answering for a member (SPEC §18) ------------------------------------------------


def test_a_member_answered_by_a_fellow_member_counts_once_and_never_judges_itself() -> None:
    fake = FakeComplete({("m1", "answer"): answered_by("m2")}, preference=["m3", "m2"])
    result = run(council(), fake)

    assert [(m.model, m.requested_model, m.status, m.duplicate_of) for m in result.members] == [
        ("m2", "m1", "succeeded", "m2"),
        ("m2", "m2", "succeeded", None),
        ("m3", "m3", "succeeded", None),
    ]
    # m2 wrote two answers: it reviews neither, and nobody is shown m2's words twice.
    assert [(r.model, sorted(seen_labels(r).values())) for r in fake.calls("review")] == [
        ("m2", ["m3"]),
        ("m3", ["m2"]),
    ]
    assert [(r.reviewer, r.requested_reviewer, r.status) for r in result.reviews] == [
        ("m2", "m2", "valid"),
        ("m3", "m3", "valid"),
    ]
    # One vote each, ranked first of one; a tie keeps member order.
    assert result.aggregate_ranking == [RankEntry("m2", 1.0, 1), RankEntry("m3", 1.0, 1)]
    synthesis = fake.calls("synthesis")[0].messages[-1]["content"]
    assert synthesis.count("answer from m2") == 1
    assert "Response C" not in synthesis


def test_the_answer_from_a_models_own_seat_is_the_one_kept() -> None:
    fake = FakeComplete({("m1", "answer"): Completion("m3 for m1", "m3")})
    result = run(council(), fake)

    assert [(m.model, m.requested_model, m.duplicate_of) for m in result.members] == [
        ("m3", "m1", "m3"),
        ("m2", "m2", None),
        ("m3", "m3", None),
    ]
    assert all("m3 for m1" not in r.messages[-1]["content"] for r in fake.calls("review"))
    assert "m3 for m1" not in fake.calls("synthesis")[0].messages[-1]["content"]
    assert sorted((e.model, e.votes) for e in result.aggregate_ranking) == [("m2", 1), ("m3", 1)]


def test_a_fallback_answer_stands_when_the_models_own_seat_failed() -> None:
    fake = FakeComplete({("m1", "answer"): answered_by("m2"), ("m2", "answer"): Timeout("t")})
    result = run(council(), fake)

    assert [(m.model, m.requested_model, m.status, m.duplicate_of) for m in result.members] == [
        ("m2", "m1", "succeeded", None),
        ("m2", "m2", "failed", None),
        ("m3", "m3", "succeeded", None),
    ]
    assert result.status == "succeeded"
    assert sorted(r.reviewer for r in result.reviews) == ["m2", "m3"]
    assert sorted(e.model for e in result.aggregate_ranking) == ["m2", "m3"]


def test_answers_by_one_model_are_too_few_for_a_council() -> None:
    fake = FakeComplete({("m1", "answer"): answered_by("m2"), ("m3", "answer"): answered_by("m2")})
    result = run(council(), fake)

    assert result.status == "failed"
    assert result.error is not None
    assert result.error["message"] == "3 of 3 members answered by 1 distinct model, 2 needed"
    assert fake.calls("review") == [] and fake.calls("synthesis") == []


def test_a_review_call_names_the_authors_it_shows_so_none_of_them_stands_in() -> None:
    fake = FakeComplete()
    run(council(), fake)

    assert {r.model: r.avoid for r in fake.calls("review")} == {
        "m1": frozenset({"m2", "m3"}),
        "m2": frozenset({"m1", "m3"}),
        "m3": frozenset({"m1", "m2"}),
    }
    assert all(r.avoid == frozenset() for r in fake.calls("answer") + fake.calls("synthesis"))


def test_a_review_written_by_a_fallback_names_it_and_the_chairman_reads_it_for_its_seat() -> None:
    def by_x9(request: CallRequest) -> Completion:
        return Completion(rank_by(["m3"])(request).replace("All fine.", "x9 reviewed."), "x9")

    fake = FakeComplete({("m1", "review"): by_x9})
    result = run(council(), fake)

    m1 = result.reviews[0]
    assert (m1.reviewer, m1.requested_reviewer, m1.status) == ("x9", "m1", "valid")
    assert m1.ranking == ["m3", "m2"]
    content = fake.calls("synthesis")[0].messages[-1]["content"]
    assert "=== Review by the author of Response A ===\nx9 reviewed." in content


def test_single_mode_names_the_fallback_that_answered() -> None:
    fake = FakeComplete({("m1", "answer"): answered_by("backup")})
    result = run(CouncilSpec("single", MEMBERS, chairman="chair"), fake)

    assert (result.members[0].model, result.members[0].requested_model) == ("backup", "m1")
    assert result.answered_by == "backup"
    assert result.aggregate_ranking == [RankEntry("backup", None, 0)]
