"""``/v1/keys``: a tenant's admins create, list (never the secret), change and revoke API keys. A
key may carry a ``project`` (a label ``/v1/usage?group_by=project`` groups by) and its own monthly
budget, which holds beside the tenant's (SPEC §17)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes, list_page
from shared import tenants
from shared.budget import budget_changed

router = APIRouter(prefix="/v1/keys", tags=["keys"])

Project = Field(default=None, min_length=1, max_length=64, strict=True)
# null: the key has no budget of its own (the tenant's still holds).
KeyBudget = Field(default=None, ge=0, le=1e12, strict=True)  # strict: `false` is not 0


class KeyIn(BaseModel):
    role: Literal["admin", "user", "viewer"] = "user"
    project: str | None = Project
    budget_usd_monthly: float | None = KeyBudget


class KeyPatch(BaseModel):
    project: str | None = Project
    budget_usd_monthly: float | None = KeyBudget


@router.post("", status_code=201, responses=ERROR_RESPONSES)
def create_key(body: KeyIn, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        api_key, key = tenants.create_key(
            session,
            principal.tenant_id,
            body.role,
            project=body.project,
            budget_usd_monthly=body.budget_usd_monthly,
        )
        return JSONBytes({**tenants.key_object(key), "api_key": api_key}, status_code=201)


@router.get("", responses=ERROR_RESPONSES)
def list_keys(session: SessionDep, principal: AdminDep) -> JSONBytes:
    rows = [tenants.key_object(k) for k in tenants.list_keys(session, principal.tenant_id)]
    return list_page(rows)


@router.patch("/{key_id}", responses=ERROR_RESPONSES)
def patch_key(key_id: str, state: StateDep, principal: AdminDep, body: KeyPatch | None = None) -> JSONBytes:
    """Change a key's project or monthly budget (only the fields sent; null clears). A changed
    budget holds for queries already queued: those waiting for it start within seconds."""
    changes = {name: getattr(body, name) for name in body.model_fields_set} if body else {}
    with state.sessions.begin() as session:
        key, before = tenants.update_key(session, principal.tenant_id, key_id, changes)
        after = key.monthly_budget_usd
        shown = tenants.key_object(key)
    if after != before:
        budget_changed(
            state.broker.client,
            state.broker.namespace,
            state.sessions,
            principal.tenant_id,
            # The counter is kept only while the key has a budget: rebuild it from the ledger
            # when the budget appears or goes (as for a tenant's, shared.budget.budget_changed).
            rebuild=before is None or after is None,
            key_id=key_id,
        )
    return JSONBytes(shown)


@router.delete("/{key_id}", responses=ERROR_RESPONSES)
def revoke_key(key_id: str, state: StateDep, principal: AdminDep) -> JSONBytes:
    with state.sessions.begin() as session:
        return JSONBytes(tenants.key_object(tenants.revoke_key(session, principal.tenant_id, key_id)))
