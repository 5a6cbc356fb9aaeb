"""The dashboard's pages (SPEC §12): server-rendered shells whose figures the page's script
fills and keeps live from ``api.dashboard.data`` and the batch event stream.

A page asked for without a session redirects to the sign-in form; another tenant's batch is a
404 page, exactly as a missing one; the operations page is for operator admins only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from api.dashboard.auth import SameOrigin, SignInRequired, end_session, session_principal, start_session
from api.deps import StateDep
from api.ratelimit import AUTH_FAILURES
from shared.batches import read
from shared.errors import NotFound, RateLimited, Unauthorized
from shared.tenants import Principal, authenticate

HERE = Path(__file__).parent
STATIC = HERE / "static"
STATIC_FILES = {p.name: p for p in STATIC.iterdir() if p.is_file()}
templates = Jinja2Templates(directory=HERE / "templates")

# Nothing on a page may load from, post to or be framed by another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    response = templates.TemplateResponse(
        request, name, {**context, "status_code": status}, status_code=status
    )
    response.headers.update(SECURITY_HEADERS)
    return response


async def _signed_in(request: Request, state: Any) -> Principal | None:
    try:
        return await session_principal(request, state)
    except SignInRequired:
        return None


def _to_signin() -> Response:
    return RedirectResponse("/dashboard/signin", status_code=303, headers=SECURITY_HEADERS)


@router.get("")
async def home(request: Request, state: StateDep) -> Response:
    if await _signed_in(request, state) is None:
        return _to_signin()
    return RedirectResponse("/dashboard/batches", status_code=303)


@router.get("/signin")
async def signin_form(request: Request) -> Response:
    return _render(request, "signin.html", page="signin", principal=None)


@router.post("/signin", dependencies=[SameOrigin])
async def signin(
    request: Request, state: StateDep, api_key: Annotated[str, Form(max_length=256)]
) -> Response:
    def check() -> Principal:
        with state.sessions() as session:
            return authenticate(session, api_key.strip())

    try:
        principal = await run_in_threadpool(check)
    except Unauthorized:
        limiter = state.limiter
        if limiter is not None:
            ip = request.scope.get("state", {}).get("client_ip", "unknown")
            limit = state.settings.auth_failures_per_minute
            # Guessing keys through the sign-in form is throttled like guessing them on the API.
            verdict = await run_in_threadpool(lambda: limiter.hit(AUTH_FAILURES, ip, limit))
            if not verdict.admitted:
                raise RateLimited(
                    "too many failed sign-ins from this address", retry_after=max(1, verdict.reset_s)
                ) from None
        return _render(
            request, "signin.html", 401, page="signin", principal=None, error="That key is not valid."
        )
    request.state.principal = principal  # the caller, for the audit log (api/audit.py)
    response = RedirectResponse("/dashboard/batches", status_code=303, headers=SECURITY_HEADERS)
    await run_in_threadpool(start_session, state, request, response, principal.key_id)
    return response


@router.post("/signout", dependencies=[SameOrigin])
async def signout(request: Request, state: StateDep) -> Response:
    response = _to_signin()
    await run_in_threadpool(end_session, state, request, response)
    return response


async def _plain_page(request: Request, state: Any, page: str) -> Response:
    """A page that needs only a signed-in caller: its template ``<page>.html`` renders the rest."""
    principal = await _signed_in(request, state)
    if principal is None:
        return _to_signin()
    return _render(request, f"{page}.html", page=page, principal=principal)


@router.get("/batches")
async def batches_page(request: Request, state: StateDep) -> Response:
    return await _plain_page(request, state, "batches")


@router.get("/batches/{batch_id}")
async def batch_page(batch_id: str, request: Request, state: StateDep) -> Response:
    principal = await _signed_in(request, state)
    if principal is None:
        return _to_signin()

    def check() -> None:
        with state.sessions() as session:
            read.get_batch(session, principal.tenant_id, batch_id)

    try:
        await run_in_threadpool(check)
    except NotFound:
        return _render(
            request, "error.html", 404, page="batches", principal=principal, message="No such batch."
        )
    can_cancel = principal.can_write
    return _render(
        request, "batch.html", page="batches", principal=principal, batch_id=batch_id, can_cancel=can_cancel
    )


@router.get("/models")
async def models_page(request: Request, state: StateDep) -> Response:
    return await _plain_page(request, state, "models")


@router.get("/operations")
async def operations_page(request: Request, state: StateDep) -> Response:
    principal = await _signed_in(request, state)
    if principal is None:
        return _to_signin()
    if not principal.operates:
        return _render(
            request,
            "error.html",
            403,
            page="operations",
            principal=principal,
            message="Operations are for admins of the operator tenant.",
        )
    return _render(request, "operations.html", page="operations", principal=principal)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    path = STATIC_FILES.get(name)
    if path is None:
        raise NotFound(f"no file {name!r}")
    return FileResponse(
        path, headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    )
