"""``/v1/webhooks``, ``/v1/webhook-secret``, ``/v1/webhooks/deliveries`` (SPEC §3.2)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.deps import AdminDep, PrincipalDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared.lifecycle.statuses import DeliveryStatus
from shared.webhooks import endpoints
from shared.webhooks.events import EventType

router = APIRouter(tags=["webhooks"])


# An endpoint subscribes to event types by name, or to all of them with "*".
Subscription = Literal[EventType, "*"]


class EndpointIn(BaseModel):
    url: str = Field(max_length=2048, pattern=r"^https?://[^/?#\s]+")
    events: list[Subscription] = Field(min_length=1, max_length=16)


@router.post("/v1/webhooks", status_code=201, responses=ERROR_RESPONSES)
def register_webhook(body: EndpointIn, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        endpoint = endpoints.register_endpoint(
            session,
            principal.tenant_id,
            body.url,
            [str(e) for e in body.events],
            allow_private=state.settings.webhook_allow_private,
        )
        return JSONBytes(endpoints.endpoint_object(endpoint), status_code=201)


@router.get("/v1/webhooks", responses=ERROR_RESPONSES)
def list_webhooks(session: SessionDep, principal: PrincipalDep) -> JSONBytes:
    rows = [endpoints.endpoint_object(e) for e in endpoints.list_endpoints(session, principal.tenant_id)]
    return list_page(rows)


@router.get("/v1/webhook-secret", responses=ERROR_RESPONSES)
def get_secret(session: SessionDep, principal: AdminDep) -> JSONBytes:
    return JSONBytes({"secret": endpoints.current_secret(session, principal.tenant_id)})


@router.post("/v1/webhook-secret/rotate", responses=ERROR_RESPONSES)
def rotate_secret(state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        secret, old_expires_at = endpoints.rotate_secret(session, principal.tenant_id)
    return JSONBytes({"secret": secret, "previous_secret_expires_at": old_expires_at})


@router.get("/v1/webhooks/deliveries", responses=ERROR_RESPONSES)
def list_deliveries(
    session: SessionDep,
    principal: PrincipalDep,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> JSONBytes:
    rows, has_more = endpoints.list_deliveries(
        session, principal.tenant_id, status=status, limit=limit, after=after
    )
    return list_page([endpoints.delivery_object(d) for d in rows], has_more)


@router.post("/v1/webhooks/deliveries/{delivery_id}/redeliver", responses=ERROR_RESPONSES)
def redeliver(delivery_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        delivery = endpoints.redeliver(session, principal.tenant_id, delivery_id)
        return JSONBytes(endpoints.delivery_object(delivery))


# Declared last: a path parameter would otherwise also match /v1/webhooks/deliveries.
@router.delete("/v1/webhooks/{webhook_id}", responses=ERROR_RESPONSES)
def delete_webhook(webhook_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        endpoints.delete_endpoint(session, principal.tenant_id, webhook_id)
    return JSONBytes({"id": webhook_id, "object": "webhook_endpoint", "deleted": True})
