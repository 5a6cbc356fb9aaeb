"""The audit log's side in the API (SPEC §17): which requests are audited, and how one is described.

``AuditTrail`` is a pure ASGI middleware (a request it does not audit costs a method check). For
a POST, PUT, PATCH or DELETE it sets ``shared.audit.CURRENT`` for the request; the row itself is
written by ``shared.audit``'s listeners inside the request's first transaction that writes, or,
when no transaction wrote, by this middleware after the response (``shared.audit`` says why).

What a row says is read from the ASGI scope when it is written, not when the request arrives:
the route (its method and path template are the action, its path parameters the target) is known
only once the router matched, and the caller only once the route's authentication dependency ran
and left it in ``request.state.principal`` (``api/deps.py``, the dashboard's session and sign-in).
The client IP is ``Guards``' (``api/middleware.py``, which trusts the configured proxies only), so
this middleware must sit inside it.

Every audited response carries ``X-Request-Id``: the client's own when it sent a plausible one
(so its logs and ours share the id), otherwise a new ``req_…`` id; the row has the same.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.ratelimit import Verdict
from shared import audit
from shared.ids import new_id

log = logging.getLogger("conclave.audit")

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REQUEST_ID_HEADER = b"x-request-id"
_PLAUSIBLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            given = value.decode("latin-1")
            if _PLAUSIBLE_ID.fullmatch(given):
                return given
            break
    return new_id("req")


def describe(scope: Scope, request_id: str) -> audit.Fields | None:
    """The row's columns for this request, or None when it is not audited: no route took it (or
    not with this method), or no caller was authenticated."""
    route = scope.get("route")
    state: dict[str, Any] = scope.get("state") or {}
    principal = state.get("principal")
    path = getattr(route, "path", None)
    methods = getattr(route, "methods", None)
    if principal is None or not path or (methods is not None and scope["method"] not in methods):
        return None
    peer = (scope.get("client") or (None,))[0]
    return {
        "tenant_id": principal.tenant_id,
        "key_id": principal.key_id,
        "role": principal.role,
        "action": f"{scope['method']} {path}",
        "target": dict(scope.get("path_params") or {}) or None,
        "client_ip": str(state.get("client_ip") or peer or "unknown")[:64],
        "request_id": request_id,
    }


def _limited(scope: Scope, status: int) -> bool:
    """A rate limiter's refusal: the route never ran (``api/deps.py`` leaves its verdict)."""
    verdict = (scope.get("state") or {}).get("ratelimit")
    return status == 429 and isinstance(verdict, Verdict) and not verdict.admitted


class AuditTrail:
    def __init__(self, app: ASGIApp):
        self.app = app
        audit.install()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        ctx = audit.AuditContext(lambda: describe(scope, request_id))
        status = 500  # what the client gets if the app raises before it responds

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        token = audit.CURRENT.set(ctx)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            audit.CURRENT.reset(token)
            if ctx.close():
                fields = ctx.fields()
                if fields is not None and not _limited(scope, status):
                    # Shielded: a client that hung up still had its request audited.
                    with anyio.CancelScope(shield=True):
                        await self._record(scope, fields, status)

    @staticmethod
    async def _record(scope: Scope, fields: audit.Fields, status: int) -> None:
        try:
            await run_in_threadpool(audit.record, scope["app"].state.conclave.sessions, fields, status)
        except Exception:
            # The database is what failed the request, most likely; the response stands.
            log.exception("audit row of %s (status %d) not written", fields["action"], status)
