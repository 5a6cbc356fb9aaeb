"""Dashboard sign-in: an API key, posted once in a form body, becomes a session cookie.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
Secure when the request came over https, and scoped to ``/dashboard``. Every state-changing
request (sign-in, sign-out, cancel) must also come from a page of this origin: a cross-site form
POST carries another ``Origin`` (or none, with no same-origin ``Referer``) and is refused.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from api.deps import StateDep
from shared.dashboard_sessions import (
    SESSION_TTL_S,
    close_session,
    open_session,
    session_key_id,
)
from shared.errors import ConclaveError, Forbidden
from shared.tenants import Principal, principal_for_key, require_operator, require_writer

COOKIE = "conclave_session"
COOKIE_PATH = "/dashboard"


class SignInRequired(ConclaveError):
    """A page asked for without a live session: the page handler redirects to the sign-in form."""

    status = 401
    type = "authentication_error"


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


async def same_origin(request: Request) -> None:
    """Refuse a state-changing request that a page of another origin made the browser send."""
    origin = request.headers.get("origin")
    mine = own_origin(request)
    if origin is not None:
        if origin != mine:
            raise Forbidden("cross-site request refused")
        return
    referer = request.headers.get("referer")
    if referer is None or not (referer == mine or referer.startswith(mine + "/")):
        raise Forbidden("cross-site request refused")


SameOrigin = Depends(same_origin)


def _principal(state: StateDep, token: str | None) -> Principal | None:
    key_id = session_key_id(state.broker.client, state.settings.queue_namespace, token)
    if key_id is None:
        return None
    with state.sessions() as session:
        return principal_for_key(session, key_id)


async def session_principal(request: Request, state: StateDep) -> Principal:
    principal = await run_in_threadpool(_principal, state, request.cookies.get(COOKIE))
    if principal is None:
        raise SignInRequired("sign in to the dashboard first")
    request.state.principal = principal  # the caller, for the audit log (api/audit.py)
    return principal


SessionPrincipal = Annotated[Principal, Depends(session_principal)]


async def require_session_writer(principal: SessionPrincipal) -> Principal:
    return require_writer(principal)


async def require_session_operator(principal: SessionPrincipal) -> Principal:
    return require_operator(principal)


SessionWriter = Annotated[Principal, Depends(require_session_writer)]
SessionOperator = Annotated[Principal, Depends(require_session_operator)]


def start_session(state: StateDep, request: Request, response: Response, key_id: str) -> None:
    token = open_session(state.broker.client, state.settings.queue_namespace, key_id)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def end_session(state: StateDep, request: Request, response: Response) -> None:
    close_session(state.broker.client, state.settings.queue_namespace, request.cookies.get(COOKIE))
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )
