"""Stages × providers: binds the pure council to real provider calls for one query.

For each call the runner picks the provider from the model id and goes through its guard
(shared circuit breaker, shared rate limiter, per-process concurrency cap); it retries
transient errors with exponential backoff and full jitter within the query's retry budget
(honouring the provider's wait hint), falls back along the model's ``fallbacks``, and records
every attempt as a ``CallRecord`` with its cost.

A member's fallback answers in its place, and the runner tells the council which model did
(``Completion.model``): the council reports it and keeps a model from reviewing its own answer
(see ``workers.council.stages``). A fallback the call says to ``avoid`` (the authors of the
answers a review shows) is skipped. Reviews and the synthesis get the runner's token budgets,
not the query's ``max_tokens``.

With a query's ``cache="exact"`` (its batch's, SPEC §14) each model's call asks the shared exact
cache first (``shared/cache.py``): a hit is recorded as a ``cached`` call (never sent, cost 0,
what it saved) and answers; a miss calls the provider as usual and stores a successful answer.
``cache="semantic"`` does the same, and a single-turn stage 1 call first asks the semantic index
(``shared/semantic_cache.py``, once per query for all members) for earlier questions close to
this one, and takes the model's exact-cache answer of the best of them (a ``SemanticHit``);
an answered call's question joins the index. Other modes never touch the index.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import redis.asyncio as aioredis

from shared.cache import Claim, Entry, ExactCache
from shared.ids import new_id
from shared.keys import DEFAULT_NAMESPACE
from shared.ledger import CallOwner, CallRecord, StartedCall
from shared.lifecycle.statuses import CallStatus, QueryStatus
from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult, Provider
from shared.providers.config import Catalog, split_model_id
from shared.providers.guard import ProviderGuard
from shared.semantic_cache import SemanticHit, SemanticIndex, single_turn, with_question
from shared.settings import get_settings
from workers.council import (
    CallRequest,
    Completion,
    CouncilResult,
    CouncilSpec,
    KnowledgeSnippet,
    QueryInput,
    run_council,
)
from workers.journal import CallJournal

# A query that failed behind an open circuit waits for the circuit's cooldown, +0-50% so the herd
# comes back spread out, at least a few seconds; its last run must start this long before the
# batch's window closes, or it fails with the circuit as its error.
CIRCUIT_WAIT_MIN_S = 2.0
CIRCUIT_WAIT_JITTER = 0.5
CIRCUIT_WINDOW_MARGIN_S = 120
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
# A provider's wait hint beyond this is not worth holding a worker slot for: fail over instead.
MAX_HINT_WAIT_S = 60.0
# Output budgets of a review and of the synthesis (CONCLAVE_REVIEW_MAX_TOKENS and
# CONCLAVE_SYNTHESIS_MAX_TOKENS): a review evaluates every answer before its FINAL RANKING list.
REVIEW_MAX_TOKENS = 2048
SYNTHESIS_MAX_TOKENS = 2048


@dataclass
class QueryRun:
    """Per-query state: the shared retry budget, every attempt made, whom the calls are for."""

    retry_budget: int
    calls: list[CallRecord] = field(default_factory=list)
    owner: CallOwner | None = None
    cache: str = "off"  # the batch's cache mode: "exact" asks self.cache before each call
    # "semantic": the index's matches by context, looked up once for every member of the query.
    semantic: dict[str, asyncio.Future[list[tuple[str, float]]]] = field(default_factory=dict)


class Runner:
    def __init__(
        self,
        catalog: Catalog,
        providers: dict[str, Provider],
        client: httpx.AsyncClient,
        *,
        retry_budget: int = 16,
        max_attempts: int = 5,
        min_answers: int = 2,
        review_max_tokens: int = REVIEW_MAX_TOKENS,
        synthesis_max_tokens: int = SYNTHESIS_MAX_TOKENS,
        rng: random.Random | None = None,
        redis_client: aioredis.Redis | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        journal: CallJournal | None = None,
        worker_id: str = "",
        cache: ExactCache | None = None,
    ):
        self.catalog = catalog
        self.providers = providers
        self.client = client
        self.retry_budget = retry_budget
        self.max_attempts = max_attempts
        self.min_answers = min_answers
        self.review_max_tokens = review_max_tokens
        self.synthesis_max_tokens = synthesis_max_tokens
        self._rng = rng or random.Random()
        # With a journal every sent call is in the ledger before it leaves (workers/journal.py).
        self.journal = journal
        self.worker_id = worker_id
        self.cache = cache
        self._semantic: SemanticIndex | None = None  # built at the first "semantic" call
        # Without Redis (unit tests) there is no shared breaker or rate limit, only the local cap.
        self.guards = {
            name: ProviderGuard(p, redis_client=redis_client, namespace=namespace)
            for name, p in providers.items()
        }

    def council_spec(self, council: dict[str, Any], mode: str | None = None) -> CouncilSpec:
        members = tuple(council["members"])
        chairman = council["chairman"]
        return CouncilSpec(
            mode="single" if (mode or council.get("mode")) == "single" else "council",
            members=members,
            chairman=chairman,
            chairman_fallbacks=self.catalog.model(chairman).fallbacks,
            min_answers=None if len(members) == 1 else min(self.min_answers, len(members)),
            review_max_tokens=self.review_max_tokens,
            synthesis_max_tokens=self.synthesis_max_tokens,
        )

    async def run(
        self,
        query_id: str,
        request: dict[str, Any],
        spec: CouncilSpec,
        knowledge: tuple[KnowledgeSnippet, ...] = (),
        calls: list[CallRecord] | None = None,
        owner: CallOwner | None = None,
        cache: str = "off",
    ) -> CouncilResult:
        """Run the council; every attempt is appended to ``calls`` as it happens, so the caller
        keeps the record of calls made (and paid for) even if the run dies half-way."""
        state = QueryRun(
            retry_budget=self.retry_budget,
            calls=calls if calls is not None else [],
            owner=owner,
            cache=cache,
        )
        query = QueryInput(
            query_id=query_id,
            messages=tuple(request["messages"]),
            max_tokens=request.get("max_tokens"),
            temperature=request.get("temperature"),
            knowledge=knowledge,
        )

        async def complete(call: CallRequest) -> Completion:
            return await self._complete(state, call)

        return await run_council(spec, query, complete)

    async def _complete(self, state: QueryRun, call: CallRequest) -> Completion:
        # The chairman's fallbacks are the council's business (it labels the synthesis
        # "fallback_chairman"); a member's fallbacks stand in for it, and the answer says whose it is.
        fallbacks = () if call.stage == "synthesis" else self.catalog.model(call.model).fallbacks
        chain = (call.model, *(m for m in fallbacks if m not in call.avoid and m != call.model))
        last: errors.ProviderError | None = None
        for model in chain:
            try:
                return Completion(await self._with_retries(state, model, call), model)
            except errors.ProviderError as exc:
                last = exc
        assert last is not None
        raise last

    async def _with_retries(self, state: QueryRun, model: str, call: CallRequest) -> str:
        if self.cache is None or state.cache == "off" or state.owner is None:
            return (await self._attempts(state, model, call)).text
        started = time.perf_counter()
        question = None
        if state.cache == "semantic" and call.stage == "answer":
            question = single_turn(call.messages, call.max_tokens, call.temperature)
            if question is not None:
                text = await self._semantic_hit(state, model, call, question, started)
                if text is not None:
                    return text
        found = await self.cache.acquire(
            state.owner.tenant_id, model, call.messages, call.max_tokens, call.temperature
        )
        if isinstance(found, Entry):
            saved = self.catalog.model(model).cost(found.input_tokens, found.output_tokens)
            state.calls.append(_cached(model, call.stage, started, saved))
            return found.text
        try:
            result = await self._attempts(state, model, call)
        except BaseException:
            if isinstance(found, Claim):
                await self.cache.release(found)
            raise
        if isinstance(found, Claim) and result.text.strip():
            await self.cache.store(found, Entry(result.text, result.input_tokens, result.output_tokens))
            if question is not None:
                await self._semantic_index().add(state.owner.tenant_id, *question)
        return result.text

    def _semantic_index(self) -> SemanticIndex:
        assert self.cache is not None
        if self._semantic is None:
            self._semantic = SemanticIndex(
                self.cache.client,
                self.cache.namespace,
                threshold=get_settings().semantic_cache_threshold,
                ttl_s=self.cache.ttl_s,
            )
        return self._semantic

    async def _semantic_hit(
        self, state: QueryRun, model: str, call: CallRequest, question: tuple[str, str], started: float
    ) -> str | None:
        """The model's cached answer to the closest earlier question, or None."""
        assert self.cache is not None and state.owner is not None
        tenant_id = state.owner.tenant_id
        context, text = question
        matches = state.semantic.get(context)
        if matches is None:
            matches = asyncio.ensure_future(self._semantic_index().match(tenant_id, context, text))
            state.semantic[context] = matches
        for matched, similarity in await asyncio.shield(matches):
            if matched == text:
                continue  # the exact lookup that follows finds it (and joins a call in flight)
            messages = with_question(call.messages, matched)
            entry = await self.cache.peek(tenant_id, model, messages, call.max_tokens, call.temperature)
            if entry is not None:
                saved = self.catalog.model(model).cost(entry.input_tokens, entry.output_tokens)
                record = _cached(model, call.stage, started, saved)
                state.calls.append(SemanticHit.of(record, similarity, matched))
                return entry.text
        return None

    async def _attempts(self, state: QueryRun, model: str, call: CallRequest) -> ChatResult:
        provider_name, model_name = split_model_id(model)
        guard = self.guards[provider_name]
        price = self.catalog.model(model)
        request = ChatRequest(model_name, call.messages, call.max_tokens, call.temperature)
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            sent = self._sender(state, model, call.stage, attempt, request)
            try:
                result = await guard.call(self.client, request, on_send=sent.write if sent else None)
            except errors.ProviderError as exc:
                self._note(state, _record(model, call.stage, attempt, started, error=exc), sent)
                # An open circuit is not retried here: the next model in the chain (or the
                # council's own degradation) answers instead of a slot waiting out a cooldown.
                if (
                    not exc.transient
                    or state.retry_budget <= 0
                    or attempt >= self.max_attempts
                    or isinstance(exc, errors.CircuitOpen)
                ):
                    raise
                if exc.retry_after is not None and exc.retry_after > MAX_HINT_WAIT_S:
                    raise  # the provider is out for longer than a slot is worth holding: fall back

                state.retry_budget -= 1
                await asyncio.sleep(self._backoff(attempt, exc.retry_after))
                continue
            except asyncio.CancelledError:
                # The query was stopped mid-call (its time limit): what was sent stays on record.
                if sent is not None and sent.written:
                    self._note(state, _abandoned(model, call.stage, attempt, started, sent), sent)
                raise
            self._note(
                state,
                _record(
                    model,
                    call.stage,
                    attempt,
                    started,
                    tokens=(result.input_tokens, result.output_tokens),
                    cost=price.cost(result.input_tokens, result.output_tokens),
                ),
                sent,
            )
            return result

    def _sender(
        self, state: QueryRun, model: str, stage: str, attempt: int, request: ChatRequest
    ) -> _Sent | None:
        if self.journal is None or state.owner is None:
            return None
        estimate = estimate_input_tokens(request.messages)
        started = StartedCall(
            call_key=new_id("call"),
            owner=state.owner,
            worker_id=self.worker_id,
            model=model,
            stage=stage,
            attempt=attempt,
            input_tokens=estimate,
            cost_usd=self.catalog.model(model).cost(estimate, 0),
            created_at=int(time.time()),
        )
        return _Sent(self.journal, started)

    def _note(self, state: QueryRun, record: CallRecord, sent: _Sent | None) -> None:
        """Keep the attempt with the query, and hand a sent one's completion to the journal."""
        if sent is not None and sent.written:
            record = replace(record, call_key=sent.call.call_key)
            sent.journal.finished(record)
        state.calls.append(record)

    async def healthy(self, models: Sequence[str]) -> set[str]:
        """The ``models`` whose provider's circuit is closed, as this process last read the shared
        breakers (all of them without Redis). Half-open counts as down: one probe goes through."""
        up = set()
        for model in models:
            guard = self.guards.get(split_model_id(model)[0])
            if guard is None or guard.breaker is None or (await guard.breaker.state())[0] == "closed":
                up.add(model)
        return up

    async def circuit_cooldown_s(self, calls: Sequence[CallRecord]) -> float:
        """Seconds until every circuit that refused one of ``calls`` lets a probe through: what
        is left of its cooldown while open, its base cooldown while a probe is out (half-open),
        0 once it has closed. The longest one counts: a query run earlier pays for its healthy
        members' answers again without an answer from the member it lacked."""
        waits = [0.0]
        for provider in _refused_providers(calls):
            guard = self.guards.get(provider)
            if guard is None or guard.breaker is None:
                continue
            state, remaining = await guard.breaker.state()
            if state == "open":
                waits.append(remaining)
            elif state == "half_open":
                waits.append(guard.breaker.config.cooldown_s)
        return max(waits)

    def _backoff(self, attempt: int, hint: float | None) -> float:
        # Full jitter (AWS architecture blog): spreads retries of many workers apart.
        delay = self._rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
        if hint is not None:
            delay = max(delay, min(hint, MAX_HINT_WAIT_S))
        return delay


@dataclass(frozen=True)
class CircuitWait:
    """What a finished run means for its query, from ``circuit_wait``: record it as it is
    (nothing set), hand it back to the queue (``requeue_in_s``), or record it failed with
    ``error``, the circuit that outlasted the batch's window."""

    requeue_in_s: int = 0
    error: dict[str, str] | None = None


def circuit_wait(
    status: str,
    error: dict[str, str] | None,
    calls: Sequence[CallRecord],
    *,
    cooldown_s: float,
    now: float,
    expires_at: int,
    rng: random.Random | None = None,
) -> CircuitWait:
    """Does a query that ended ``status`` wait for an open circuit, and for how long?

    A query that failed while some of its calls were refused by an open circuit failed for want
    of a provider that is resting, not for anything about the query. It waits (in the queue,
    outside any thread) for the circuit's cooldown ``cooldown_s`` (``Runner.circuit_cooldown_s``)
    plus 0-50% jitter, and runs again, for as long as its batch's window allows: once the
    circuit would still be resting ``CIRCUIT_WINDOW_MARGIN_S`` before ``expires_at``, it fails
    with the circuit as its error. Calls stay fail-fast on an open circuit (a fallback or the
    council's degradation answers), so only queries that would otherwise fail wait.
    """
    if status != QueryStatus.FAILED:
        return CircuitWait()
    refused = _refused_providers(calls)
    if not refused:
        return CircuitWait()
    rest = max(cooldown_s, CIRCUIT_WAIT_MIN_S)
    last_start = expires_at - CIRCUIT_WINDOW_MARGIN_S - now  # seconds left to start a last run in
    if rest > last_start:
        message = (
            f"circuit open for {', '.join(refused)}: it rests {math.ceil(rest)} s more and the "
            f"batch's window closes in {max(0, math.floor(expires_at - now))} s"
        )
        if error:
            message += f" (last run: {error['message']})"
        return CircuitWait(error={"type": "circuit_open", "message": message})
    wait = min(rest * (rng or random).uniform(1.0, 1.0 + CIRCUIT_WAIT_JITTER), last_start)
    return CircuitWait(requeue_in_s=max(1, math.ceil(wait)))


def _refused_providers(calls: Sequence[CallRecord]) -> list[str]:
    return sorted({c.model.partition(":")[0] for c in calls if c.error_category == "circuit_open"})


@dataclass
class _Sent:
    """A call's in-flight row: written by ``write`` once the guard lets the call out."""

    journal: CallJournal
    call: StartedCall
    written: bool = False

    async def write(self) -> None:
        await self.journal.started(self.call)
        self.written = True


def estimate_input_tokens(messages: Sequence[dict[str, str]]) -> int:
    """Characters / 4, as the rate limiter guesses: what an abandoned call is charged."""
    return sum(len(m.get("content", "")) for m in messages) // 4 + 4 * len(messages)


def _abandoned(model: str, stage: str, attempt: int, started: float, sent: _Sent) -> CallRecord:
    return CallRecord(
        model=model,
        stage=stage,
        attempt=attempt,
        status=CallStatus.ABANDONED,
        error_category=None,
        latency_ms=int((time.perf_counter() - started) * 1000),
        input_tokens=sent.call.input_tokens,
        output_tokens=0,
        cost_usd=sent.call.cost_usd,
        created_at=sent.call.created_at,
        ended_ns=time.time_ns(),
    )


def _cached(model: str, stage: str, started: float, saved_usd: float) -> CallRecord:
    return CallRecord(
        model=model,
        stage=stage,
        attempt=0,
        status=CallStatus.CACHED,
        error_category=None,
        latency_ms=int((time.perf_counter() - started) * 1000),
        input_tokens=0,
        output_tokens=0,
        cost_usd=0.0,
        created_at=int(time.time()),
        ended_ns=time.time_ns(),
        saved_usd=saved_usd,
    )


def _record(
    model: str,
    stage: str,
    attempt: int,
    started: float,
    *,
    error: errors.ProviderError | None = None,
    tokens: tuple[int, int] = (0, 0),
    cost: float = 0.0,
) -> CallRecord:
    return CallRecord(
        model=model,
        stage=stage,
        attempt=attempt,
        status=CallStatus.FAILED if error else CallStatus.SUCCEEDED,
        error_category=error.category if error else None,
        latency_ms=int((time.perf_counter() - started) * 1000),
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost_usd=cost,
        created_at=int(time.time()),
        ended_ns=time.time_ns(),
    )
