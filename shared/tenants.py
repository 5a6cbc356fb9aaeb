"""Tenants and their API keys: creation, hashing, authentication.

Keys are 256 bits of randomness shown once; only their SHA-256 is stored, so a leaked
database does not leak usable keys. Roles, tiers and rate limits build on this.

The tiers are the keys of ``settings.tiers`` (``CONCLAVE_TIERS``): :func:`tier_names` is the one
list of valid tier names, for the CLI as for :func:`issue_key`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session
from sqlmodel import col

from shared.errors import Forbidden, NotFound, Unauthorized
from shared.ids import new_id
from shared.models import ApiKey, Tenant
from shared.settings import Settings, TierLimits, get_settings
from shared.usage import effective_budget

ROLES = ("admin", "user", "viewer")
# The default tier names only; what a deployment accepts is tier_names(settings). Kept while
# shared/cli/ops.py still imports it.
KEY_PREFIX = "cnk_"


def tier_names(settings: Settings) -> tuple[str, ...]:
    """The tiers a tenant may have in this deployment, in ``CONCLAVE_TIERS`` order."""
    return tuple(settings.tiers)


def check_tier(settings: Settings, tier: str) -> str | None:
    """Why ``tier`` cannot be given to a tenant, or None when it can."""
    if tier in settings.tiers:
        return None
    return f"tier must be one of {', '.join(tier_names(settings))}, not {tier!r}"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class IssuedKey:
    api_key: str
    tenant_id: str
    key_id: str
    webhook_secret: str
    created_tenant: bool


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and the key's role."""

    tenant_id: str
    key_id: str
    role: str
    is_operator: bool
    tier: str = "free"
    limit_overrides: dict[str, Any] | None = None
    monthly_budget_usd: float | None = None  # the tenant's own; None = its tier's

    @property
    def can_write(self) -> bool:
        """Admins and users create and cancel; viewers only read."""
        return self.role in ("admin", "user")

    @property
    def operates(self) -> bool:
        """An admin key of the operator tenant: the one who sees every tenant and the system."""
        return self.role == "admin" and self.is_operator

    def budget(self, settings: Settings) -> float | None:
        """The monthly budget that applies (as ``shared.usage.budget_for``), without a query."""
        return effective_budget(self.monthly_budget_usd, self.tier, settings)

    def limits(self, settings: Settings) -> TierLimits:
        """The tier's limits with this tenant's overrides applied."""
        base = settings.tiers.get(self.tier) or settings.tiers["free"]
        if not self.limit_overrides:
            return base
        return base.model_copy(update=self.limit_overrides)


def issue_key(
    session: Session,
    *,
    tenant_name: str,
    role: str,
    tier: str,
    operator: bool = False,
    settings: Settings | None = None,
) -> IssuedKey:
    """Create the tenant if needed (with ``tier``), then a new key for it. Caller commits.

    ``tier`` must be one of ``settings.tiers``; without ``settings``, those of the environment,
    as every process reads them.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    problem = check_tier(settings or get_settings(), tier)
    if problem:
        raise ValueError(problem)
    now = int(time.time())
    tenant = session.scalars(select(Tenant).where(col(Tenant.name) == tenant_name)).first()
    created = tenant is None
    if tenant is None:
        tenant = Tenant(
            id=new_id("tenant"),
            name=tenant_name,
            tier=tier,
            is_operator=operator,
            webhook_secret=new_webhook_secret(),
            created_at=now,
        )
        session.add(tenant)
        session.flush()
    api_key, key = create_key(session, tenant.id, role)
    return IssuedKey(api_key, tenant.id, key.id, tenant.webhook_secret, created)


def authenticate(session: Session, api_key: str | None) -> Principal:
    if not api_key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    principal = _live_principal(session, col(ApiKey.key_hash) == hash_key(api_key))
    if principal is None:
        raise Unauthorized("invalid API key")
    return principal


def principal_for_key(session: Session, key_id: str) -> Principal | None:
    """The principal of a live (unrevoked) key by its id, as :func:`authenticate` builds it (a
    dashboard session holds the key's id, not the key)."""
    return _live_principal(session, col(ApiKey.id) == key_id)


def _live_principal(session: Session, which_key: ColumnElement[bool]) -> Principal | None:
    """The principal of the one key ``which_key`` selects, with its tenant's tier, limits and
    budget; ``None`` for no such key or a revoked one."""
    row = session.execute(
        select(
            col(ApiKey.id),
            col(ApiKey.tenant_id),
            col(ApiKey.role),
            col(ApiKey.revoked_at),
            col(Tenant.is_operator),
            col(Tenant.tier),
            col(Tenant.limits),
            col(Tenant.monthly_budget_usd),
        )
        .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
        .where(which_key)
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(
        tenant_id=row.tenant_id,
        key_id=row.id,
        role=row.role,
        is_operator=row.is_operator,
        tier=row.tier,
        limit_overrides=row.limits,
        monthly_budget_usd=row.monthly_budget_usd,
    )


def require_writer(principal: Principal) -> Principal:
    """``principal``, if it may create and cancel (the API's and the dashboard's write routes)."""
    if not principal.can_write:
        raise Forbidden(f"role {principal.role!r} may only read")
    return principal


def require_operator(principal: Principal) -> Principal:
    """``principal``, if it is an admin key of the operator tenant (``/v1/admin/*``, operations)."""
    if not principal.operates:
        raise Forbidden("this needs an admin key of the operator tenant")
    return principal


def key_object(key: ApiKey) -> dict[str, Any]:
    """A key as listed: never the key itself (only its first characters, to recognise it)."""
    return {
        "id": key.id,
        "object": "api_key",
        "role": key.role,
        "prefix": key.prefix,
        "project": key.project,
        "budget_usd_monthly": key.monthly_budget_usd,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


def create_key(
    session: Session,
    tenant_id: str,
    role: str,
    *,
    project: str | None = None,
    budget_usd_monthly: float | None = None,
) -> tuple[str, ApiKey]:
    """A new key for an existing tenant. Returns (the key, shown once; its row). ``project`` and
    ``budget_usd_monthly`` (SPEC §17; None = no budget of its own) are the key's."""
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        role=role,
        key_hash=hash_key(api_key),
        prefix=api_key[:12],
        created_at=int(time.time()),
        project=project,
        monthly_budget_usd=budget_usd_monthly,
    )
    session.add(key)
    session.flush()
    return api_key, key


def update_key(
    session: Session, tenant_id: str, key_id: str, changes: dict[str, Any]
) -> tuple[ApiKey, float | None]:
    """Change a key's ``project`` and/or ``budget_usd_monthly`` (only the fields in ``changes``;
    None clears). Returns (the key, its budget before)."""
    key = session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    before = key.monthly_budget_usd
    if "project" in changes:
        key.project = changes["project"]
    if "budget_usd_monthly" in changes:
        key.monthly_budget_usd = changes["budget_usd_monthly"]
    session.flush()
    return key, before


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    return list(
        session.scalars(select(ApiKey).where(col(ApiKey.tenant_id) == tenant_id).order_by(col(ApiKey.id)))
    )


def revoke_key(session: Session, tenant_id: str, key_id: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if key.revoked_at is None:
        key.revoked_at = int(time.time())
        session.flush()
    return key
