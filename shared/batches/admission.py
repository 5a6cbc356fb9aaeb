"""Admission: whether a batch may be accepted, decided before anything is stored.

Field rules pydantic cannot express (unique ``custom_id``s, exactly one of prompt/messages,
sizes), the tier's limits, metadata, the monthly budget, and the request fingerprint behind
``Idempotency-Key``; the council against the configured models is ``shared.councils`` (shared
with experiment variants). Every refusal is an error of ``shared/errors.py`` naming the culprit
in ``param``; nothing here writes.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal, NamedTuple

import orjson
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import Forbidden, InvalidField, PayloadTooLarge, PaymentRequired
from shared.models import Tenant
from shared.schemas import BatchCreate
from shared.settings import PRIORITY_RANK, Priority, Settings, TierLimits, parse_window
from shared.usage import budget_for, month_to_date_cost
from shared.webhooks.endpoints import check_webhook_url

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512


def check_queries(payload: BatchCreate, settings: Settings) -> None:
    if not payload.queries:
        raise InvalidField("queries must hold at least one query", param="queries")
    if len(payload.queries) > settings.max_batch_queries:
        raise PayloadTooLarge(
            f"a batch holds at most {settings.max_batch_queries} queries, got {len(payload.queries)}",
            param="queries",
        )
    seen: dict[str, int] = {}
    for i, q in enumerate(payload.queries):
        if (q.prompt is None) == (q.messages is None):
            raise InvalidField(
                "exactly one of 'prompt' or 'messages' is required", param=f"queries[{i}].prompt"
            )
        if q.custom_id in seen:
            raise InvalidField(
                f"custom_id {q.custom_id!r} is used by queries[{seen[q.custom_id]}] too",
                param=f"queries[{i}].custom_id",
            )
        seen[q.custom_id] = i
        size = len(q.prompt) if q.prompt is not None else sum(len(m.content) for m in q.messages or ())
        if size > settings.max_prompt_chars:
            raise InvalidField(
                f"query text is {size} characters; the limit is {settings.max_prompt_chars}",
                param=f"queries[{i}].{'prompt' if q.prompt is not None else 'messages'}",
            )
        if q.messages is not None and not any(m.role == "user" for m in q.messages):
            raise InvalidField("messages need at least one 'user' message", param=f"queries[{i}].messages")


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = metadata or {}
    if len(metadata) > METADATA_MAX_KEYS:
        raise InvalidField(f"metadata holds at most {METADATA_MAX_KEYS} keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_MAX_KEY:
            raise InvalidField(
                f"metadata keys are at most {METADATA_MAX_KEY} characters", param=f"metadata.{key[:64]}"
            )
        if len(value) > METADATA_MAX_VALUE:
            raise InvalidField(
                f"metadata values are at most {METADATA_MAX_VALUE} characters", param=f"metadata.{key}"
            )
    return metadata


def request_fingerprint(payload: BatchCreate) -> str:
    return hashlib.sha256(
        orjson.dumps(payload.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def check_tier(limits: TierLimits, payload: BatchCreate) -> None:
    if len(payload.queries) > limits.max_batch_queries:
        raise PayloadTooLarge(
            f"your tier allows batches of at most {limits.max_batch_queries} queries, "
            f"got {len(payload.queries)}",
            param="queries",
        )
    check_priority(limits, payload.priority)


def check_priority(limits: TierLimits, priority: Priority) -> None:
    if PRIORITY_RANK[priority] > PRIORITY_RANK[limits.max_priority]:
        raise Forbidden(
            f"your tier allows priority up to {limits.max_priority!r}, not {priority!r}", param="priority"
        )


class Terms(NamedTuple):
    metadata: dict[str, str]
    window: str
    window_s: int


def check_terms(
    settings: Settings,
    *,
    metadata: dict[str, str] | None,
    webhook_url: str | None,
    completion_window: str | None,
) -> Terms:
    """What every kind of batch is checked for besides its work: metadata, the webhook URL (SSRF
    rules) and the completion window (the default when none is given), in that order."""
    checked = check_metadata(metadata)
    if webhook_url is not None:
        check_webhook_url(webhook_url, allow_private=settings.webhook_allow_private, param="webhook_url")
    window = completion_window or settings.default_completion_window
    try:
        window_s = parse_window(window)
    except ValueError as exc:
        raise InvalidField(str(exc), param="completion_window") from exc
    return Terms(checked, window, window_s)


def check_budget(
    sessions: sessionmaker[Session],
    settings: Settings,
    tenant_id: str,
    budget: float | Literal["lookup"] | None = "lookup",
) -> None:
    """``budget``: the tenant's monthly budget when the caller knows it (the API's principal
    carries it), saving a read per request; ``"lookup"`` reads it from the tenant."""
    if budget is None:
        return  # no budget: nothing to read
    with sessions() as session:
        if budget == "lookup":
            tenant = session.get(Tenant, tenant_id)
            budget = budget_for(tenant, settings) if tenant else None
            if budget is None:
                return
        spent = month_to_date_cost(session, tenant_id, int(time.time()))
    if spent >= budget:
        raise PaymentRequired(
            f"this month's budget of ${budget:,.2f} is spent (${spent:,.2f}); new batches are refused"
        )
