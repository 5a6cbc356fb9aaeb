"""Batches from an OpenAI input file or an Anthropic ``requests`` list (SPEC §11).

Both are checked here — every line, against the configured models and presets — and then handed
to the same batch service inline batches go through (``shared.batches.service.submit``): the
same budget and quota checks, the same bulk insert and pipelined enqueue, the same workers. Each
query's request doc carries its own work (``council``: mode, members, chairman), so one batch may
mix councils, presets and single models.

An invalid file is not refused at the HTTP level, as OpenAI does not refuse it: the batch is
stored ``failed`` with every problem in ``errors`` and no query, so nothing is enqueued and no
provider is called. Invalid Anthropic requests are refused with a 422, as Anthropic refuses them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from dramatiq.brokers.redis import RedisBroker
from sqlalchemy.orm import Session, sessionmaker

from shared.batches import admission, service
from shared.batches.read import Counts
from shared.errors import InvalidField, NotFound, PayloadTooLarge
from shared.files import anthropic
from shared.files.lines import CHAT_URL, FileCheck, FileReport, InvalidFile, LineRules, too_many
from shared.files.store import get_file, iter_chunks, iter_lines
from shared.models import Batch
from shared.providers.config import Catalog
from shared.schemas import BatchCreate, MessageBatchCreate
from shared.settings import Priority, Settings, TierLimits

MESSAGES_URL = "/v1/messages"


def _fingerprint(payload: BatchCreate | MessageBatchCreate) -> str:
    # The standard library's encoder: a request's free-form parts may hold what orjson refuses
    # (integers beyond 64 bits, lone surrogates), and a fingerprint must never fail.
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _admit(
    catalog: Catalog,
    settings: Settings,
    limits: TierLimits | None,
    *,
    priority: Priority,
    metadata: dict[str, str] | None,
    webhook_url: str | None,
    knowledge: dict[str, Any] | None = None,
    completion_window: str | None,
    endpoint: str,
    input_file_id: str | None = None,
) -> service.Admitted:
    """The batch-level checks inline batches get too (metadata, webhook, window, tier priority)."""
    if limits is not None:
        admission.check_priority(limits, priority)
    terms = admission.check_terms(
        settings, metadata=metadata, webhook_url=webhook_url, completion_window=completion_window
    )
    return service.Admitted(
        priority=priority,
        # The configured council, for display: each query carries the work its line asked for.
        council={"mode": "council", "members": list(catalog.members), "chairman": catalog.chairman},
        metadata=terms.metadata,
        window=terms.window,
        window_s=terms.window_s,
        webhook_url=webhook_url,
        knowledge=knowledge,
        endpoint=endpoint,
        input_file_id=input_file_id,
    )


def _max_requests(settings: Settings, limits: TierLimits | None) -> int:
    most = settings.max_batch_queries
    return min(most, limits.max_batch_queries) if limits is not None else most


def create_file_batch(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    catalog: Catalog,
    settings: Settings,
    *,
    tenant_id: str,
    payload: BatchCreate,
    idempotency_key: str | None = None,
    limits: TierLimits | None = None,
    budget: float | Literal["lookup"] | None = "lookup",
    trace: dict[str, str] | None = None,
) -> tuple[Batch, Counts, bool]:
    """OpenAI's ``POST /v1/batches {input_file_id, endpoint, completion_window, metadata}``."""
    assert payload.input_file_id is not None
    if payload.queries:
        raise InvalidField("a batch takes 'queries' or an 'input_file_id', not both", param="queries")
    if payload.council is not None:
        raise InvalidField("in a file batch each line's body.model picks its work", param="council")
    if payload.endpoint != CHAT_URL:
        raise InvalidField(f"endpoint must be {CHAT_URL!r}, got {payload.endpoint!r}", param="endpoint")
    fingerprint = _fingerprint(payload) if idempotency_key else None
    if idempotency_key:
        replay = service.replay(sessions, tenant_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
    with sessions() as session:
        try:
            stored = get_file(session, tenant_id, payload.input_file_id)
        except NotFound:
            raise NotFound(f"no file {payload.input_file_id!r}", param="input_file_id") from None
    if stored.purpose != "batch":
        raise InvalidField(
            f"file {stored.id!r} is not an input file (purpose 'batch')", param="input_file_id"
        )
    admitted = _admit(
        catalog,
        settings,
        limits,
        priority=payload.priority,
        metadata=payload.metadata,
        webhook_url=payload.webhook_url,
        knowledge=payload.knowledge.model_dump() if payload.knowledge else None,
        completion_window=payload.completion_window,
        endpoint=CHAT_URL,
        input_file_id=stored.id,
    )
    rules = LineRules(max_prompt_chars=settings.max_prompt_chars)
    most = _max_requests(settings, limits)
    if stored.lines > most:
        return service.store_failed(
            sessions,
            tenant_id=tenant_id,
            admitted=admitted,
            errors=FileReport(errors=[too_many(stored.lines, most)]).errors_object(),
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
    # One pass over the stored file: each valid line streams into the batch's insert; the first
    # problem stops the rows, the pass goes on to report every problem, and InvalidFile at the
    # end rolls the transaction back. ``stored.lines`` (its non-blank lines) is the batch's size.
    check = FileCheck(catalog, rules)
    try:
        return service.submit(
            sessions,
            broker,
            settings,
            tenant_id=tenant_id,
            admitted=admitted,
            requests=(
                (p.custom_id, p.request) for p in check.rows(iter_lines(iter_chunks(sessions, stored.id)))
            ),
            total=stored.lines,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
            limits=limits,
            budget=budget,
            trace=trace,
        )
    except InvalidFile as invalid:
        return service.store_failed(
            sessions,
            tenant_id=tenant_id,
            admitted=admitted,
            errors=invalid.report.errors_object(),
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )


def create_message_batch(
    sessions: sessionmaker[Session],
    broker: RedisBroker,
    catalog: Catalog,
    settings: Settings,
    *,
    tenant_id: str,
    payload: MessageBatchCreate,
    idempotency_key: str | None = None,
    limits: TierLimits | None = None,
    budget: float | Literal["lookup"] | None = "lookup",
    trace: dict[str, str] | None = None,
) -> tuple[Batch, Counts, bool]:
    """Anthropic's ``POST /v1/messages/batches {requests: [{custom_id, params}]}``."""
    fingerprint = _fingerprint(payload) if idempotency_key else None
    if idempotency_key:
        replay = service.replay(sessions, tenant_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
    most = _max_requests(settings, limits)
    if len(payload.requests) > most:
        raise PayloadTooLarge(
            f"a batch holds at most {most} requests, got {len(payload.requests)}", param="requests"
        )
    rules = LineRules(max_prompt_chars=settings.max_prompt_chars)
    parsed, problems = anthropic.parse_requests(payload.requests, catalog, rules)
    if problems:
        param, why = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InvalidField(f"{param} {why}{more}", param=param)
    admitted = _admit(
        catalog,
        settings,
        limits,
        priority=payload.priority,
        metadata=payload.metadata,
        webhook_url=payload.webhook_url,
        completion_window=None,
        endpoint=MESSAGES_URL,
    )
    return service.submit(
        sessions,
        broker,
        settings,
        tenant_id=tenant_id,
        admitted=admitted,
        requests=((p.custom_id, p.request) for p in parsed),
        total=len(parsed),
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        limits=limits,
        budget=budget,
        trace=trace,
    )
