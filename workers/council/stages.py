"""The council for one query: answer, review, synthesise (SPEC §5.1).

Owns the order of the stages, who sees which answers under which labels, and what a failure at
each stage does to the result. Model calls go through the injected ``complete`` (the runner
supplies retries, fallbacks, breakers and accounting); nothing here does I/O of its own or logs
prompt text, so the whole council runs in tests against a scripted ``complete``.

Who answered (SPEC §18). ``complete`` returns the text with the model that wrote it: the model
asked or one of its fallbacks. A member's record names both (``model`` is who answered,
``requested_model`` the member), and labels, reviews and rankings are keyed by who answered, so
a ranking credits the model that wrote the answer. A fallback may itself be a member (the
shipped providers.toml has two members falling back to a third), so two rules keep a model from
ever judging its own words:

- One answer per model. A model that answered for two members wrote one opinion twice: the
  council keeps the answer from the model's own seat (or, if it has none, the first in member
  order) and records the other with ``duplicate_of`` (the member whose answer it repeats). The
  duplicate is not reviewed and not shown to the chairman, and ``min_answers`` counts distinct
  models: a second answer from the same model is not a second opinion.
- A review call carries ``avoid``, the authors of the answers it shows; the runner never lets
  one of them stand in for the reviewer, so whoever writes a review (``reviewer``, with the
  member asked as ``requested_reviewer``) has no answer among those it ranks.

Stages 2 and 3 have token budgets of their own (``CouncilSpec.review_max_tokens`` and
``synthesis_max_tokens``): a query's ``max_tokens`` is for its answers, and a small one would cut
off the ``FINAL RANKING`` list of every review.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from shared.lifecycle.statuses import CallStatus, QueryStatus, ReviewStatus
from shared.providers.errors import BadResponse, ProviderError
from workers.council import prompts
from workers.council.prompts import Message
from workers.council.ranking import (
    InvalidRanking,
    RankEntry,
    aggregate_ranking,
    parse_final_ranking,
    strip_final_ranking,
)


@dataclass(frozen=True)
class KnowledgeSnippet:
    id: str
    title: str
    content: str


@dataclass(frozen=True)
class CouncilSpec:
    mode: Literal["council", "single"]  # "auto" is resolved by routing before the council runs
    members: tuple[str, ...]  # model ids like "openai:gpt-4o-mini"
    chairman: str
    chairman_fallbacks: tuple[str, ...] = ()
    min_answers: int | None = None  # None -> 2, or 1 when the council has one member
    # Output budgets of a review and of the synthesis (None: the provider's default), never the
    # query's max_tokens.
    review_max_tokens: int | None = None
    synthesis_max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a council needs at least one member")
        # Model ids key labels and rankings; a repeated member would make them ambiguous.
        if len(set(self.members)) != len(self.members):
            raise ValueError("council members must be distinct")
        if self.min_answers is not None and self.min_answers < 1:
            raise ValueError("min_answers must be at least 1")

    @property
    def required_answers(self) -> int:
        if self.min_answers is not None:
            return self.min_answers
        return 1 if len(self.members) == 1 else 2


@dataclass(frozen=True)
class QueryInput:
    query_id: str
    messages: tuple[Message, ...]  # a plain prompt is already normalised to one user message
    max_tokens: int | None = None
    temperature: float | None = None
    knowledge: tuple[KnowledgeSnippet, ...] = ()


@dataclass(frozen=True)
class CallRequest:
    model: str
    stage: Literal["answer", "review", "synthesis"]
    messages: tuple[Message, ...]
    max_tokens: int | None
    temperature: float | None
    # Models that must not answer in ``model``'s place: the authors of the answers a review shows.
    avoid: frozenset[str] = frozenset()


class Completion(NamedTuple):
    text: str
    model: str  # who wrote ``text``: the model asked or one of its fallbacks


# Returns the answer and who wrote it, or raises ProviderError (retries and fallbacks spent).
CompleteFn = Callable[[CallRequest], Awaitable[Completion]]


@dataclass
class MemberResult:
    model: str  # who answered (the member, or the fallback that answered for it)
    requested_model: str  # the member
    status: CallStatus
    answer: str | None
    error: dict[str, str] | None  # {"type", "message"}
    latency_ms: int
    # Set when ``model`` also answered for this member: that member's answer is the one kept.
    duplicate_of: str | None = None


@dataclass
class ReviewResult:
    reviewer: str  # who wrote the review
    requested_reviewer: str  # the member asked: the author of the one answer left out
    status: ReviewStatus
    text: str | None
    labels: dict[str, str]  # "Response A" -> model, as this reviewer saw them
    ranking: list[str] | None  # models, best first
    error: dict[str, str] | None
    latency_ms: int


@dataclass
class SynthesisAttempt:
    """One chairman call, kept so a failed chairman is visible even when a fallback answered."""

    model: str
    status: CallStatus
    error: dict[str, str] | None
    latency_ms: int


@dataclass
class CouncilResult:
    status: QueryStatus
    answer: str | None
    error: dict[str, str] | None  # {"type", "message"} when failed
    synthesis: Literal["chairman", "fallback_chairman", "top_ranked", "single"] | None
    chairman: str | None  # the model that actually wrote the synthesis
    members: list[MemberResult]
    reviews: list[ReviewResult]
    aggregate_ranking: list[RankEntry]
    answered_by: str | None = None  # the model whose text is `answer`, whatever the synthesis
    synthesis_attempts: list[SynthesisAttempt] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Outcome(NamedTuple):
    text: str | None
    model: str | None  # who answered; None when the call failed
    error: dict[str, str] | None
    latency_ms: int


async def run_council(spec: CouncilSpec, query: QueryInput, complete: CompleteFn) -> CouncilResult:
    stage1 = prompts.answer_messages(query.messages, query.knowledge)
    if spec.mode == "single":
        return _single(await _answer(spec.members[0], stage1, query, complete))

    members = _one_answer_per_model(
        list(await asyncio.gather(*(_answer(m, stage1, query, complete) for m in spec.members)))
    )
    answered = _distinct_answers(members)
    if len(answered) < spec.required_answers:
        return _insufficient(members, spec.required_answers)
    if len(spec.members) == 1:
        return _single(members[0])

    # With one answer there is nothing to compare, so nobody reviews and every model has 0 votes.
    reviews: list[ReviewResult] = []
    if len(answered) >= 2:
        reviews = list(await asyncio.gather(*(_review(r, answered, query, spec, complete) for r in answered)))
    ranking = aggregate_ranking(
        _ranked_models(members),
        [r.ranking for r in reviews if r.status == ReviewStatus.VALID and r.ranking is not None],
    )
    return await _synthesise(spec, query, stage1, members, reviews, ranking, complete)


async def _call(complete: CompleteFn, request: CallRequest) -> _Outcome:
    start = time.perf_counter()
    try:
        text, model = await complete(request)
        if not text or not text.strip():
            # An empty 200 is a failure, never an answer (llm-council returned error strings as answers).
            raise BadResponse(f"{model} returned an empty answer")
    except ProviderError as exc:
        return _Outcome(None, None, exc.to_dict(), _elapsed_ms(start))
    return _Outcome(text, model, None, _elapsed_ms(start))


def _elapsed_ms(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)


async def _answer(
    model: str, messages: tuple[Message, ...], query: QueryInput, complete: CompleteFn
) -> MemberResult:
    request = CallRequest(model, "answer", messages, query.max_tokens, query.temperature)
    outcome = await _call(complete, request)
    status = CallStatus.FAILED if outcome.error else CallStatus.SUCCEEDED
    # A member nobody answered for is named by itself.
    return MemberResult(
        outcome.model or model, model, status, outcome.text, outcome.error, outcome.latency_ms
    )


def _one_answer_per_model(members: list[MemberResult]) -> list[MemberResult]:
    """Mark every answer but one per model as a duplicate: the one kept is from the model's own
    seat if that answered, else the first in member order."""
    kept: dict[str, MemberResult] = {}
    for m in members:
        if m.status != CallStatus.SUCCEEDED:
            continue
        current = kept.get(m.model)
        if current is None or (m.model == m.requested_model != current.requested_model):
            kept[m.model] = m
    return [
        m
        if m.status != CallStatus.SUCCEEDED or kept[m.model] is m
        else dataclasses.replace(m, duplicate_of=kept[m.model].requested_model)
        for m in members
    ]


def _distinct_answers(members: Sequence[MemberResult]) -> list[MemberResult]:
    return [m for m in members if m.status == CallStatus.SUCCEEDED and m.duplicate_of is None]


def _ranked_models(members: Sequence[MemberResult]) -> list[str]:
    # Who answered, once each, in member order; a member nobody answered for under its own name.
    return list(dict.fromkeys(m.model for m in members))


def _single(member: MemberResult) -> CouncilResult:
    ranking = aggregate_ranking([member.model], [])
    if member.status == CallStatus.FAILED:
        return CouncilResult(QueryStatus.FAILED, None, member.error, None, None, [member], [], ranking)
    return CouncilResult(
        QueryStatus.SUCCEEDED,
        member.answer,
        None,
        "single",
        None,
        [member],
        [],
        ranking,
        answered_by=member.model,
    )


def _insufficient(members: list[MemberResult], required: int) -> CouncilResult:
    answered = sum(m.status == CallStatus.SUCCEEDED for m in members)
    distinct = len(_distinct_answers(members))
    message = f"{answered} of {len(members)} members answered"
    if distinct < answered:
        message += f" by {distinct} distinct model{'' if distinct == 1 else 's'}"
    message += f", {required} needed"
    failures = ", ".join(f"{m.requested_model} ({m.error['type']})" for m in members if m.error)
    if failures:
        message += f"; failed: {failures}"
    error = {"type": "insufficient_answers", "message": message}
    ranking = aggregate_ranking(_ranked_models(members), [])
    return CouncilResult(QueryStatus.FAILED, None, error, None, None, members, [], ranking)


async def _review(
    author: MemberResult,
    answered: Sequence[MemberResult],
    query: QueryInput,
    spec: CouncilSpec,
    complete: CompleteFn,
) -> ReviewResult:
    """The author of one answer ranks the others (``answered`` holds one answer per model)."""
    asked = author.model
    others = [m for m in answered if m.model != asked]
    # A different order per reviewer spreads position bias; seeding by (question, reviewer) keeps
    # a rerun of the same query byte-for-byte reproducible, and gives the same question the same
    # review prompts in any batch, so the exact cache (SPEC §14) can answer its reviews too.
    random.Random(f"{prompts.question_text(query.messages)}:{asked}").shuffle(others)
    labels = {prompts.response_label(i): m.model for i, m in enumerate(others)}
    answers = [(label, m.answer or "") for label, m in zip(labels, others, strict=True)]
    messages = prompts.review_messages(prompts.question_text(query.messages), answers)
    request = CallRequest(
        asked, "review", messages, spec.review_max_tokens, None, avoid=frozenset(labels.values())
    )
    outcome = await _call(complete, request)
    reviewer = outcome.model or asked
    if outcome.text is None:
        return ReviewResult(
            reviewer, asked, ReviewStatus.FAILED, None, labels, None, outcome.error, outcome.latency_ms
        )
    try:
        ranked = parse_final_ranking(outcome.text, list(labels))
    except InvalidRanking as exc:
        error = {"type": "invalid_ranking", "message": str(exc)}
        return ReviewResult(
            reviewer, asked, ReviewStatus.INVALID, outcome.text, labels, None, error, outcome.latency_ms
        )
    ranking = [labels[label] for label in ranked]
    return ReviewResult(
        reviewer, asked, ReviewStatus.VALID, outcome.text, labels, ranking, None, outcome.latency_ms
    )


async def _synthesise(
    spec: CouncilSpec,
    query: QueryInput,
    stage1: tuple[Message, ...],
    members: list[MemberResult],
    reviews: list[ReviewResult],
    ranking: list[RankEntry],
    complete: CompleteFn,
) -> CouncilResult:
    answered = _distinct_answers(members)
    # One fixed labelling in member order for the chairman; reviews are translated into it.
    label_of = {m.model: prompts.response_label(i) for i, m in enumerate(answered)}
    valid = [r for r in reviews if r.status == ReviewStatus.VALID and r.text is not None]
    messages = prompts.synthesis_messages(
        question=prompts.question_text(query.messages),
        answers=[(label_of[m.model], m.answer or "") for m in answered],
        ranking=[(label_of[e.model], e.mean_rank, e.votes) for e in ranking if e.model in label_of],
        reviews=[(label_of[r.requested_reviewer], _review_for_chairman(r, label_of)) for r in valid],
        system=stage1[0] if stage1 and stage1[0]["role"] == "system" else None,
    )

    attempts: list[SynthesisAttempt] = []
    chairmen = list(dict.fromkeys((spec.chairman, *spec.chairman_fallbacks)))
    for model in chairmen:
        request = CallRequest(model, "synthesis", messages, spec.synthesis_max_tokens, None)
        outcome = await _call(complete, request)
        status = CallStatus.FAILED if outcome.error else CallStatus.SUCCEEDED
        attempts.append(SynthesisAttempt(outcome.model or model, status, outcome.error, outcome.latency_ms))
        if outcome.text is not None:
            writer = outcome.model or model
            kind: Literal["chairman", "fallback_chairman"] = (
                "chairman" if writer == spec.chairman else "fallback_chairman"
            )
            return CouncilResult(
                QueryStatus.SUCCEEDED,
                outcome.text,
                None,
                kind,
                writer,
                members,
                reviews,
                ranking,
                writer,
                attempts,
            )

    # Every chairman failed: the best-ranked answer stands; ties and no votes keep member order.
    best = next(m for e in ranking for m in answered if m.model == e.model)
    return CouncilResult(
        QueryStatus.SUCCEEDED,
        best.answer,
        None,
        "top_ranked",
        None,
        members,
        reviews,
        ranking,
        best.model,
        attempts,
    )


def _review_for_chairman(review: ReviewResult, label_of: dict[str, str]) -> str:
    # Only the evaluation: the ranking itself reaches the chairman through the aggregate, and
    # leaving the marker out keeps the synthesis prompt from reading as a review prompt.
    mapping = {label: label_of[model] for label, model in review.labels.items()}
    return prompts.relabel(strip_final_ranking(review.text or ""), mapping)
