"""``/v1/keys``: a tenant's admins create, list (never the secret) and revoke API keys."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import AdminDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared import tenants

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class KeyIn(BaseModel):
    role: Literal["admin", "user", "viewer"] = "user"


@router.post("", status_code=201, responses=ERROR_RESPONSES)
def create_key(body: KeyIn, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        api_key, key = tenants.create_key(session, principal.tenant_id, body.role)
        return JSONBytes({**tenants.key_object(key), "api_key": api_key}, status_code=201)


@router.get("", responses=ERROR_RESPONSES)
def list_keys(session: SessionDep, principal: AdminDep) -> JSONBytes:
    rows = [tenants.key_object(k) for k in tenants.list_keys(session, principal.tenant_id)]
    return list_page(rows)


@router.delete("/{key_id}", responses=ERROR_RESPONSES)
def revoke_key(key_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        return JSONBytes(tenants.key_object(tenants.revoke_key(session, principal.tenant_id, key_id)))
