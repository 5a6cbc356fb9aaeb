"""``DELETE /v1/cache``: a tenant's admins forget its cached answers (SPEC §14), all or one model's.

Operators' admins may name another tenant (``tenant_id``). Invalidation bumps a generation the
cache keys are built from (``shared/cache.py``), so it costs one Redis command however many
answers are cached: the old entries are unreachable at once and expire with their TTL.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Query

from api.deps import AdminDep, SessionDep, StateDep
from api.responses import ERROR_RESPONSES, JSONBytes
from shared.cache import invalidate
from shared.errors import DependencyDown, Forbidden, NotFound
from shared.models import Tenant

router = APIRouter(prefix="/v1/cache", tags=["cache"])


@router.delete("", responses=ERROR_RESPONSES)
def invalidate_cache(
    state: StateDep,
    session: SessionDep,
    principal: AdminDep,
    model: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
    tenant_id: Annotated[str | None, Query(min_length=1, max_length=40)] = None,
) -> JSONBytes:
    target = principal.tenant_id
    if tenant_id is not None and tenant_id != principal.tenant_id:
        if not principal.is_operator:
            raise Forbidden("only the operator's admins may name another tenant", param="tenant_id")
        if session.get(Tenant, tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}", param="tenant_id")
        target = tenant_id
    try:
        generation = invalidate(state.broker.client, state.broker.namespace, target, model)
    except redis.RedisError as exc:
        raise DependencyDown("the cache is unavailable; nothing was invalidated") from exc
    return JSONBytes(
        {"object": "cache.invalidation", "tenant_id": target, "model": model, "generation": generation}
    )
