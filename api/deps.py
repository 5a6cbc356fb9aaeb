"""Dependencies named once: the per-app state, a DB session, the calling principal (with its
per-key rate limit), and role checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from dramatiq.brokers.redis import RedisBroker
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from api.ratelimit import AUTH_FAILURES, SlidingWindow
from shared import tenants
from shared.errors import Forbidden, RateLimited, Unauthorized
from shared.metrics import MetricsBuffer
from shared.providers.config import Catalog
from shared.settings import Settings
from shared.tenants import Principal, authenticate


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    broker: RedisBroker
    catalog: Catalog
    limiter: SlidingWindow | None = None
    metrics: MetricsBuffer | None = None


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in its
# thread pool, a thread hop per dependency per request (measurable on a 100-query POST).
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.conclave
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        # What Anthropic's SDK sends (SPEC §11); Authorization wins when both are present.
        return (request.headers.get("x-api-key") or "").strip() or None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


# Declared so the OpenAPI document states how to authenticate; the header is read in _bearer.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")
api_key_scheme = APIKeyHeader(
    name="x-api-key", auto_error=False, description="An API key, as Anthropic's SDK sends it"
)


def get_principal(
    request: Request,
    state: StateDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
    _api_key: Annotated[str | None, Depends(api_key_scheme)] = None,
) -> Principal:
    try:
        with state.sessions() as session:
            principal = authenticate(session, _bearer(request))
        request.state.principal = principal  # the caller, for the audit log (api/audit.py)
    except Unauthorized:
        if state.limiter is not None:
            scope_state = request.scope.setdefault("state", {})
            ip = scope_state.get("client_ip", "unknown")
            try:
                verdict = state.limiter.hit(AUTH_FAILURES, ip, state.settings.auth_failures_per_minute)
            except RedisError:
                raise Unauthorized("invalid API key") from None
            if not verdict.admitted:
                # Guessing keys: this address waits, but only its requests whose key fails.
                if state.metrics is not None:
                    state.metrics.inc("rate_limit_rejections", AUTH_FAILURES)
                scope_state["ratelimit"] = verdict
                raise RateLimited(
                    "too many failed authentications from this address", retry_after=max(1, verdict.reset_s)
                ) from None
        raise
    if state.limiter is not None:
        limit = principal.limits(state.settings).requests_per_minute
        try:
            verdict = state.limiter.hit("key", principal.key_id, limit)
        except RedisError:
            return principal  # Redis down: serve rather than refuse; the queue will say if it matters
        request.scope.setdefault("state", {})["ratelimit"] = verdict
        if not verdict.admitted:
            if state.metrics is not None:
                state.metrics.inc("rate_limit_rejections", "key")
            raise RateLimited(
                f"this key is limited to {limit} requests per minute", retry_after=max(1, verdict.reset_s)
            )
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_writer(principal: PrincipalDep) -> Principal:
    return tenants.require_writer(principal)


async def require_admin(principal: PrincipalDep) -> Principal:
    if principal.role != "admin":
        raise Forbidden("this needs an admin key")
    return principal


async def require_operator(principal: PrincipalDep) -> Principal:
    return tenants.require_operator(principal)


WriterDep = Annotated[Principal, Depends(require_writer)]
AdminDep = Annotated[Principal, Depends(require_admin)]
OperatorDep = Annotated[Principal, Depends(require_operator)]
