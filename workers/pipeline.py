"""One query through a worker: claim → prepare → run → settle, over a ``WorkerContext``.

- **claim**: take the query's lease (coalesced with the process's other claims); a query that is
  done, cancelled or held elsewhere ends here. A database error sends the message again later.
- **prepare**: the batch's council and knowledge, grounding snippets, routing for ``mode: auto``,
  the batch's cache mode (SPEC §14; the runner asks the exact cache when it is ``exact``).
- **admit** (SPEC §17): a query of a tenant with a budget reserves its estimated cost, or, when it
  does not fit what is left, goes back to the queue with a delay and its batch says it waits
  (``shared/budget.py``); the reservation is settled to the actual cost once the query ends.
- **run**: the council on the process's event loop (the AsyncIO middleware owns it), through
  one pooled HTTP client; every provider attempt is recorded.
- **settle**: the outcome and its calls in one coalesced write; a query that failed behind an
  open circuit goes back to the queue instead; metrics and spans.

Each thread carries one query. Why a thread per query and not one asyncio consumer: measured
with ``benchmarks/council.py`` (5,000 queries, 2 s simulated latency, 2 processes × 256 threads)
the threads cost little — they sleep on a future while the event loop works — and the batch
finished within 1.12× of the ideal makespan at about 155 MB per process. Replacing dramatiq's
worker would also mean re-doing its prefetch, acks, heartbeats and shutdown; what cost CPU was
the per-query database round trips, which the coalescers remove.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import dramatiq
import redis
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.broker import Broker
from dramatiq.message import Message
from dramatiq.middleware import CurrentMessage
from dramatiq.middleware.time_limit import TimeLimitExceeded
from sqlalchemy.exc import OperationalError

from shared.budget import Admission, clear_waiting, mark_waiting
from shared.knowledge.grounding import ground
from shared.ledger import CallRecord, LeaseLost
from shared.lifecycle.statuses import CallStatus, QueryStatus
from shared.lifecycle.transitions import ClaimedQuery, Outcome
from shared.logs import query_context
from shared.progress import StageCalls
from shared.queue.contract import ACTOR_NAMES, ACTOR_PRIORITY
from shared.semantic_cache import SemanticHit
from shared.settings import PRIORITIES
from shared.tracing import query_parent, request_links, tracer
from workers.context import WorkerContext
from workers.council import CouncilSpec, KnowledgeSnippet
from workers.routing import route
from workers.runner import CircuitWait, circuit_wait, estimate_input_tokens
from workers.spans import record_call_spans

log = logging.getLogger("conclave.worker")

# A query whose claim met a database error is sent again after this long (the database may be
# restarting); reconciliation would find it too, but later.
DB_RETRY_DELAY_MS = 5_000
INTERNAL_ERROR = {"type": "internal_error", "message": "the worker failed"}
TIME_LIMIT_ERROR = {"type": "timeout", "message": "the query ran past its time limit"}
EXHAUSTED_ERROR = {
    "type": "attempts_exhausted",
    "message": "the query's runs were cut off too often (CONCLAVE_QUERY_MAX_RUNS)",
}
# A query waiting for budget is tried again after 2 s, doubling per wait up to
# CONCLAVE_BUDGET_RECHECK_MAX_S, ±25%.
BUDGET_WAIT_BASE_S = 2
# Tokens out per call assumed by a tenant's first estimate (then its queries' running average).
OUTPUT_GUESS = 300
T = TypeVar("T")


@dataclass(frozen=True)
class Prepared:
    spec: CouncilSpec
    grounding: tuple[KnowledgeSnippet, ...]
    routing: dict[str, Any] | None
    expires_at: int  # the end of the batch's window: how long a query may wait for a circuit
    cache: str = "off"  # the batch's cache mode


@dataclass
class Ran:
    status: str
    record: dict[str, Any] | None
    error: dict[str, Any] | None
    calls: list[CallRecord]
    latency_ms: int


def declare_actors(
    broker: Broker, context: Callable[[], WorkerContext]
) -> dict[str, dramatiq.Actor[Any, Any]]:
    """One actor per priority queue on ``broker``, each running ``process_query`` over the
    context ``context()`` returns (built on first use, after the worker process has forked)."""

    def run_query(query_id: str) -> None:
        process_query(context(), query_id)

    return {
        priority: dramatiq.actor(
            broker=broker,
            actor_name=ACTOR_NAMES[priority],
            queue_name=priority,
            priority=ACTOR_PRIORITY[priority],
        )(run_query)
        for priority in PRIORITIES
    }


def process_query(ctx: WorkerContext, query_id: str) -> None:
    message = CurrentMessage.get_current_message()
    # Every run is a span in the query's own trace, the same on every run (shared.tracing),
    # linked to the request that created the query: the message names it, or, for a message
    # re-sent without it (reconciliation), the batch does once the claim has named the batch.
    request = request_links(message.options.get("trace") if message else None)
    with (
        query_context(query_id),
        tracer().start_as_current_span(
            "query",
            context=query_parent(query_id, request),
            links=request,
            attributes={"conclave.query_id": query_id},
        ) as span,
    ):
        claimed = claim(ctx, query_id, message)
        if claimed is None:
            return  # finished, cancelled, or held by a live worker: nothing to do
        if not request:
            with ctx.sessions() as session:  # read once per process per batch (prepare needs it too)
                *_, batch_trace = ctx.batch(session, claimed.batch_id)
            for link in request_links(batch_trace):
                span.add_link(link.context)
        if claimed.runs > ctx.settings.query_max_runs:
            exhaust(ctx, claimed)
            return
        with query_context(query_id, claimed.batch_id):
            span.set_attribute("conclave.batch_id", claimed.batch_id)
            prepared = prepare(ctx, claimed)
            admission = admit(ctx, claimed, prepared, message)
            if not admission.admitted:
                return  # back in the queue until its tenant's budget can take it
            ran = run(ctx, claimed, prepared)
            settle(ctx, claimed, prepared, ran, message, span)
            settle_budget(ctx, claimed, admission, ran)


def claim(ctx: WorkerContext, query_id: str, message: Message[Any] | None) -> ClaimedQuery | None:
    try:
        return ctx.claims.submit(query_id)
    except OperationalError as exc:
        log.warning("claiming query %s failed (%s); sending it again", query_id, type(exc).__name__)
        if message is not None:
            ctx.broker.enqueue(message.copy(), delay=DB_RETRY_DELAY_MS)
        return None


def exhaust(ctx: WorkerContext, claimed: ClaimedQuery) -> None:
    """A query whose earlier runs all died with their workers (or were cut off) ends ``failed``
    instead of running again: a query that kills its worker must not take the fleet down with it."""
    log.warning("query %s failed after %d runs", claimed.id, claimed.runs - 1)
    now = int(time.time())
    ctx.outcomes.submit(Outcome(claimed, QueryStatus.FAILED, None, EXHAUSTED_ERROR, None, (), 0, now))
    record_metrics(ctx, [], QueryStatus.FAILED)


def prepare(ctx: WorkerContext, claimed: ClaimedQuery) -> Prepared:
    with ctx.sessions() as session:
        council, knowledge, expires_at, _ = ctx.batch(session, claimed.batch_id)
        snippets = (
            ground(session, claimed.tenant_id, claimed.request["messages"], knowledge) if knowledge else []
        )
    cache = council.get("cache", "off")  # the batch's, whatever council a file line names
    # A file batch's line carries its own work (a council, a preset or one model: SPEC §11).
    council = claimed.request.get("council") or council
    routing = None
    members = council["members"]
    mode = council.get("mode", "council")
    if mode == "auto":
        # Members behind an open circuit are left out (SPEC §5.4), as this process sees the breakers.
        domain_members = [m for rule in ctx.catalog.domains for m in rule.members if m not in members]
        healthy = on_loop(ctx.runner.healthy([*members, *dict.fromkeys(domain_members)]))
        decision = route(
            claimed.request["messages"],
            members,
            ctx.price,
            healthy=healthy.__contains__,
            domains=ctx.catalog.domains,
        )
        routing, mode, members = decision.to_dict(), decision.mode, list(decision.members)
    spec = ctx.runner.council_spec({**council, "members": members}, mode)
    grounding = tuple(KnowledgeSnippet(s["id"], s["title"], s["content"]) for s in snippets)
    return Prepared(spec, grounding, routing, expires_at, cache)


def admit(
    ctx: WorkerContext, claimed: ClaimedQuery, prepared: Prepared, message: Message[Any] | None
) -> Admission:
    """Reserve the query's estimated cost against its tenant's budget (SPEC §17), or hand it back
    to the queue to wait; a key with a budget of its own is held to it too. A query with no budget
    at all costs a few dictionary lookups here."""
    budgets = ctx.budgets
    if budgets is None:
        return Admission(admitted=True)
    now = time.time()
    try:
        admission = budgets.admit(
            claimed.tenant_id,
            claimed.batch_id,
            claimed.id,
            first_estimate(ctx, claimed, prepared),
            int(now) + ctx.settings.query_lease_seconds,
            now,
        )
    except redis.RedisError as exc:
        # No counter to check against: the query runs (the ledger still records every call).
        log.warning("budget check failed (%s); query %s runs unchecked", type(exc).__name__, claimed.id)
        return Admission(admitted=True)
    if admission.resumed_batches:
        clear_waiting(ctx.sessions, admission.resumed_batches)
    if admission.admitted:
        return admission
    assert admission.budget is not None
    delay = min(BUDGET_WAIT_BASE_S * 2 ** min(claimed.circuit_waits, 10), ctx.settings.budget_recheck_max_s)
    delay = max(1, round(delay * random.uniform(0.75, 1.25)))
    finished = int(now)
    written = ctx.outcomes.submit(
        Outcome(claimed, QueryStatus.QUEUED, None, None, None, (), 0, finished, requeue_at=finished + delay)
    )
    if admission.newly_waiting:
        whose = "the API key's" if admission.key_id else "the"
        waiting = {
            "reason": "budget",
            "message": f"{whose} monthly budget cannot take another query: raise it or wait for next month",
            "scope": "key" if admission.key_id else "tenant",
            "key_id": admission.key_id,
            "budget_usd": admission.budget,
            "spent_usd": round(admission.spent, 8),
            "reserved_usd": round(admission.reserved, 8),
            "query_estimate_usd": round(admission.estimate, 8),
            "since": finished,
        }
        mark_waiting(ctx.sessions, claimed.batch_id, waiting)
        log.warning("batch %s waits for its tenant's budget", claimed.batch_id)
    budgets.notify(
        claimed.tenant_id,
        admission.budget,
        admission.spent + admission.reserved,
        finished,
        reached=True,
        key_id=admission.key_id,
    )
    if written and message is not None:
        # If this send is lost, reconciliation finds the query queued and sends it again.
        with contextlib.suppress(redis.RedisError):
            ctx.broker.enqueue(message.copy(), delay=delay * 1000)
    return admission


def first_estimate(ctx: WorkerContext, claimed: ClaimedQuery, prepared: Prepared) -> float:
    """A query's cost before its tenant has a running average: every call of the council at the
    query's input size (reviews and the synthesis also read the answers) and ``OUTPUT_GUESS``
    tokens out."""
    spec = prepared.spec
    question = estimate_input_tokens(claimed.request.get("messages") or ())
    if spec.mode == "single":
        return ctx.catalog.model(spec.members[0]).cost(question, OUTPUT_GUESS)
    n = len(spec.members)
    answers = n * OUTPUT_GUESS
    cost = sum(ctx.catalog.model(m).cost(question, OUTPUT_GUESS) for m in spec.members)
    cost += sum(ctx.catalog.model(m).cost(question + answers, OUTPUT_GUESS) for m in spec.members)
    return cost + ctx.catalog.model(spec.chairman).cost(question + 2 * answers, OUTPUT_GUESS)


def settle_budget(ctx: WorkerContext, claimed: ClaimedQuery, admission: Admission, ran: Ran) -> None:
    """The reservation becomes the actual cost of the query's calls; crossing 80% or 100% of a
    budget (the tenant's or the key's) sends its event (once per month, from ``settle``)."""
    if ctx.budgets is None or admission.budget is None:
        return
    actual = sum(c.cost_usd for c in ran.calls)
    try:
        ctx.budgets.settle(claimed.tenant_id, claimed.id, admission, actual)
    except redis.RedisError as exc:  # the reservation lapses with the query's lease
        log.warning("settling the budget of query %s failed (%s)", claimed.id, type(exc).__name__)


def run(ctx: WorkerContext, claimed: ClaimedQuery, prepared: Prepared) -> Ran:
    started = time.perf_counter()
    calls: list[CallRecord] = (
        StageCalls(ctx.progress, claimed.batch_id, claimed.id) if ctx.progress is not None else []
    )
    status: str
    record: dict[str, Any] | None
    try:
        result = on_loop(
            ctx.runner.run(
                claimed.id,
                claimed.request,
                prepared.spec,
                knowledge=prepared.grounding,
                calls=calls,
                owner=claimed.owner,
                cache=prepared.cache,
            )
        )
        status, error = result.status, result.error
        record = result.to_dict()
        if prepared.cache != "off":
            mark_cached(record, calls)
        record["citations"] = [s.id for s in prepared.grounding]
        if ctx.catalog.simulated:
            record["simulated"] = True
    except TimeLimitExceeded:
        # dramatiq interrupts the thread; the run's coroutine is cancelled and its sent calls are
        # already with the journal. The query ends here rather than running again to the same end.
        log.warning("query %s ran past its time limit", claimed.id)
        status, error, record = QueryStatus.FAILED, TIME_LIMIT_ERROR, None
    except LeaseLost:
        # Its lease went to another worker (this one was cut off or too slow): the journal refused
        # to start a call for it, and its outcome will be refused too. Nothing crashed.
        log.warning("query %s stops: its lease was handed on (call write refused)", claimed.id)
        status, error, record = QueryStatus.FAILED, INTERNAL_ERROR, None
    except Exception:
        log.exception("query %s crashed", claimed.id)
        status, error, record = QueryStatus.FAILED, INTERNAL_ERROR, None
    return Ran(status, record, error, calls, int((time.perf_counter() - started) * 1000))


def settle(
    ctx: WorkerContext,
    claimed: ClaimedQuery,
    prepared: Prepared,
    ran: Ran,
    message: Message[Any] | None,
    span: Any,
) -> None:
    now = time.time()
    finished = int(now)
    verdict = CircuitWait()
    if ran.status == QueryStatus.FAILED:
        # A query that failed behind an open circuit waits for it while its window allows.
        cooldown_s = on_loop(ctx.runner.circuit_cooldown_s(ran.calls))
        verdict = circuit_wait(
            ran.status, ran.error, ran.calls, cooldown_s=cooldown_s, now=now, expires_at=prepared.expires_at
        )
        if verdict.error:
            log.warning("query %s fails behind an open circuit: %s", claimed.id, verdict.error["message"])
    requeue_in = verdict.requeue_in_s
    written = ctx.outcomes.submit(
        Outcome(
            claimed,
            ran.status,
            ran.record,
            verdict.error or ran.error,
            prepared.routing,
            ran.calls,
            ran.latency_ms,
            finished,
            requeue_at=finished + requeue_in if requeue_in else None,
        )
    )
    if requeue_in and written:
        record_metrics(ctx, ran.calls, None)
        log.warning("query %s waits %d s for an open circuit", claimed.id, requeue_in)
        if message is not None:
            # If this send is lost, reconciliation finds the query queued and sends it again.
            with contextlib.suppress(redis.RedisError):
                ctx.broker.enqueue(message.copy(), delay=requeue_in * 1000)
        return
    record_metrics(ctx, ran.calls, ran.status)
    if written and ctx.progress is not None:
        ctx.progress.finished(claimed.batch_id, claimed.id)
    span.set_attribute("conclave.status", ran.status)
    record_call_spans(span, ran.calls)
    if not written:
        log.warning("outcome write refused (lease lost): query %s was taken over", claimed.id)


def on_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the process's event loop (the AsyncIO middleware owns it) and wait."""
    loop = get_event_loop_thread()
    if loop is None:
        coroutine.close()
        raise RuntimeError("the AsyncIO middleware starts the event loop at worker boot")
    return loop.run_coroutine(coroutine)


def mark_cached(record: dict[str, Any], calls: list[CallRecord]) -> None:
    """Say in the result what the cache answered (SPEC §14): ``cached: "exact"`` on each member,
    review and the synthesis answered from it (``"semantic"`` on a member answered for a close
    question, with its ``similarity`` and the ``cached_question``), and the query's hits and saving."""
    hits = [c for c in calls if c.status == CallStatus.CACHED]
    by_stage = {(c.stage, c.model) for c in hits}
    semantic = {c.model: c for c in hits if isinstance(c, SemanticHit) and c.stage == "answer"}
    for member in record["members"]:
        member["cached"] = "exact" if ("answer", member["model"]) in by_stage else None
        hit = semantic.get(member["model"])
        if hit is not None:
            member.update(cached="semantic", similarity=hit.similarity, cached_question=hit.matched)
    for review in record["reviews"]:
        review["cached"] = "exact" if ("review", review["reviewer"]) in by_stage else None
    record["synthesis_cached"] = "exact" if ("synthesis", record["chairman"]) in by_stage else None
    record["cache_hits"] = len(hits)
    record["cost_saved_usd"] = round(sum(c.saved_usd for c in hits), 8)


def record_metrics(ctx: WorkerContext, calls: list[CallRecord], status: str | None) -> None:
    metrics = ctx.metrics
    for call in calls:
        provider = call.model.partition(":")[0]
        if call.status == CallStatus.CACHED:  # never sent: a hit, not a provider latency
            metrics.inc("cache_hits", provider, call.model, call.stage)
            continue
        metrics.observe_latency(provider, call.model, call.latency_ms / 1000)
        if call.status == CallStatus.FAILED:
            metrics.inc("provider_call_errors", provider, call.error_category or "unknown")
        if call.input_tokens or call.output_tokens:
            metrics.inc("tokens", provider, call.model, "input", value=call.input_tokens)
            metrics.inc("tokens", provider, call.model, "output", value=call.output_tokens)
        if call.cost_usd:
            metrics.inc("cost_usd", provider, call.model, value=call.cost_usd)
    if status is not None:  # None: handed back to the queue, not finished
        metrics.inc("queries_finished", status)
        metrics.count_minute("finished")
