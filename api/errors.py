"""The one place errors become HTTP responses in SPEC's shape:
``{"error": {"type", "message", "param"}}`` with the matching status code.

Nothing else in the API builds an error body; a stack trace never reaches a client.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONBytes
from shared.errors import ConclaveError, RateLimited

log = logging.getLogger("conclave.api")

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    status: int, type_: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONBytes:
    return JSONBytes(
        {"error": {"type": type_, "message": message, "param": param}}, status_code=status, headers=headers
    )


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """``("body", "queries", 3, "custom_id")`` → ``"queries[3].custom_id"``."""
    # Only the first element says where the value came from; later ones are field names
    # (a metadata key may well be called "path").
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "header", "path") else list(loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


async def _conclave_error(request: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, ConclaveError)
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
        verdict = request.scope.get("state", {}).get("ratelimit")
        if verdict is not None and exc.type == "rate_limit_error":
            headers.update(verdict.headers())
    return error_response(exc.status, exc.type, exc.message, exc.param, headers)


async def _validation_error(_: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = tuple(first.get("loc", ()))
    # A body that is not JSON, or not an object at all, is malformed (400), not an invalid field.
    if first.get("type") == "json_invalid" or (loc == ("body",) and first.get("type") != "missing"):
        return error_response(400, "invalid_request_error", f"malformed body: {first.get('msg')}")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return error_response(400, "invalid_request_error", "a JSON body is required")
    param = param_from_loc(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "invalid_request_error", f"{param}: {message}" if param else message, param)


async def _http_error(request: Request, exc: Exception) -> JSONBytes:
    assert isinstance(exc, StarletteHTTPException)
    type_ = _HTTP_TYPES.get(
        exc.status_code, "invalid_request_error" if exc.status_code < 500 else "api_error"
    )
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        # Starlette names only the first route that matched the path; Allow must list them all.
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    return error_response(exc.status_code, type_, str(exc.detail), headers=headers or None)


def _allowed_methods(request: Request) -> set[str]:
    """The methods the OpenAPI document lists for this path (the router nests included routers)."""
    path = request.url.path
    paths = request.app.openapi().get("paths", {})
    if path in paths:  # a literal path wins over templates it also fits (/v1/webhooks/deliveries)
        return {m.upper() for m in paths[path]}
    methods: set[str] = set()
    for template, operations in paths.items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), path):
            methods |= {m.upper() for m in operations}
    return methods


async def _database_down(_: Request, exc: Exception) -> JSONBytes:
    log.error("database error: %s", type(exc).__name__)
    return error_response(503, "service_unavailable", "the database is unavailable; retry later")


async def _unexpected(_: Request, exc: Exception) -> JSONBytes:
    log.exception("unhandled error")
    return error_response(500, "api_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ConclaveError, _conclave_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
