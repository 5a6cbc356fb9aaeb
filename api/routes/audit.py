"""``GET /v1/audit`` (SPEC §17): a tenant's admins read its audit log, newest first.

A tenant sees only its own rows, operators included: the log is who did what to a tenant, not
an operations view. The rows are written by ``api.audit`` and ``shared.audit``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminDep, SessionDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared import audit

router = APIRouter(prefix="/v1/audit", tags=["audit"])

# Patterns, not just lengths: a cursor is an id and an action a route's "METHOD /path", so
# anything else is a 422 rather than a string (a NUL, say) for the database to refuse.
After = Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
Action = Annotated[
    str | None,
    Query(
        max_length=200,
        pattern=r"^(POST|PUT|PATCH|DELETE) /[\x21-\x7e]*$",
        description='A route\'s method and path template, e.g. "POST /v1/batches/{batch_id}/cancel"',
    ),
]


@router.get("", responses=ERROR_RESPONSES)
def list_audit_events(
    session: SessionDep,
    principal: AdminDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: After = None,
    action: Action = None,
) -> JSONBytes:
    rows, has_more = audit.list_events(session, principal.tenant_id, limit=limit, after=after, action=action)
    return list_page([audit.event_object(r) for r in rows], has_more)
