"""``GET /v1/usage``: tokens and cost for the tenant, from the provider-call ledger, in total and
by day, provider, model, key or project."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import PrincipalDep, SessionDep
from api.responses import ERROR_RESPONSES, JSONBytes
from shared.errors import InvalidField
from shared.usage import month_start, usage_report

router = APIRouter(tags=["usage"])
# Unix seconds, or an ISO 8601 date with an optional time and zone.
INSTANT = r"^(\d{1,12}|\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?)$"
# A time range's query parameters (``?from=&to=``), each an INSTANT read by parse_instant.
From = Annotated[str | None, Query(alias="from", max_length=40, pattern=INSTANT)]
To = Annotated[str | None, Query(max_length=40, pattern=INSTANT)]
# The ledger's timestamps are 32-bit integer columns in PostgreSQL, which refuses a larger bound
# outright; every stored row lies inside this range, so clamping an instant changes no answer.
INSTANT_MIN, INSTANT_MAX = 0, 2**31 - 1


def parse_instant(value: str | None, param: str, default: int) -> int:
    """Unix seconds, or an ISO 8601 date/time (UTC when no zone is given)."""
    if value is None:
        return default
    if value.isdigit():
        return min(max(int(value), INSTANT_MIN), INSTANT_MAX)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidField(f"{param} must be Unix seconds or an ISO 8601 date", param=param) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return min(max(int(parsed.timestamp()), INSTANT_MIN), INSTANT_MAX)


@router.get("/v1/usage", responses=ERROR_RESPONSES)
def usage(
    session: SessionDep,
    principal: PrincipalDep,
    from_: From = None,
    to: To = None,
    group_by: Literal["day", "provider", "model", "key", "project"] | None = None,
) -> JSONBytes:
    now = int(time.time())
    start = parse_instant(from_, "from", month_start(now))
    end = parse_instant(to, "to", now + 1)
    # An empty or reversed range is simply empty, not an error.
    end = max(end, start)
    return JSONBytes(usage_report(session, principal.tenant_id, start, end, group_by))
