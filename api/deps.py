"""Dependencies named once: the per-app state, a DB session, the calling principal, role checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from dramatiq.brokers.redis import RedisBroker
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import Forbidden, Unauthorized
from shared.providers.config import Catalog
from shared.settings import Settings
from shared.tenants import Principal, authenticate


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    broker: RedisBroker
    catalog: Catalog


def get_state(request: Request) -> AppState:
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
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


def get_principal(request: Request, state: StateDep) -> Principal:
    with state.sessions() as session:
        return authenticate(session, _bearer(request))


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_writer(principal: PrincipalDep) -> Principal:
    if principal.role not in ("admin", "user"):
        raise Forbidden(f"role {principal.role!r} may only read")
    return principal


WriterDep = Annotated[Principal, Depends(require_writer)]
