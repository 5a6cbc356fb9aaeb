"""The domain error tree, mapped to SPEC §3's error shape by one handler in ``api/errors.py``.

    ConclaveError                 root; ``status`` and ``type`` are what the API renders
    ├── BadRequest        400     malformed body (not JSON, wrong top-level shape)
    ├── Unauthorized      401     no key, unknown or revoked key
    ├── PaymentRequired   402     the tenant's monthly budget is spent
    ├── Forbidden         403     the key's role does not allow this
    ├── NotFound          404     unknown id, or another tenant's
    ├── Conflict          409     idempotency key reused with another body; illegal state change
    ├── PayloadTooLarge   413     body or batch larger than allowed
    ├── InvalidField      422     one field is invalid; ``param`` points at it (``queries[3].custom_id``)
    ├── RateLimited       429     too many requests; carries ``retry_after``
    └── DependencyDown    503     database or Redis unreachable

Provider failures have their own taxonomy (``shared.providers.errors``); they never reach a client
as an HTTP error, they are recorded on the query.
"""

from __future__ import annotations


class ConclaveError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ConclaveError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ConclaveError):
    status = 401
    type = "authentication_error"


class PaymentRequired(ConclaveError):
    status = 402
    type = "budget_exceeded"


class Forbidden(ConclaveError):
    status = 403
    type = "permission_error"


class NotFound(ConclaveError):
    status = 404
    type = "not_found_error"


class Conflict(ConclaveError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(ConclaveError):
    status = 413
    type = "request_too_large"


class InvalidField(ConclaveError):
    status = 422
    type = "invalid_request_error"


class RateLimited(ConclaveError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None, type_: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after
        if type_:
            self.type = type_


class DependencyDown(ConclaveError):
    status = 503
    type = "service_unavailable"
