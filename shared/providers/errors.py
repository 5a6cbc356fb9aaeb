"""The one error taxonomy for provider calls (SPEC §4.2).

Each wire-format module maps HTTP status, headers and body into exactly one of these at its
boundary (``raise RateLimited(...) from exc``); nothing above a provider module looks at a
status code. The council and the runner only ever see ``ProviderError`` subclasses.

    ProviderError                  root; ``category`` is the SPEC name, ``transient`` says retry
    ├── RateLimited                429; ``retry_after`` from retry-after(-ms), x-ratelimit-reset-*
    ├── Overloaded                 503, Anthropic 529
    ├── ServerError                other 5xx
    ├── Timeout                    no complete answer within the provider's timeout
    ├── NetworkError               connection refused/reset, DNS, TLS
    ├── AuthError                  401/403: bad or missing provider key
    ├── InvalidRequest             400/404/422, context too long, unknown model
    ├── ContentFiltered            the provider refused for safety reasons
    ├── BadResponse                unparseable or empty answer
    └── CircuitOpen                the breaker refused the call before it was made
"""

from __future__ import annotations


class ProviderError(Exception):
    """A provider call failed; ``category`` is the taxonomy name used in records and results."""

    category = "server"
    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        # Seconds the provider asked us to wait before trying again (a hint, never trusted blindly).
        self.retry_after = retry_after
        self.status = status

    def to_dict(self) -> dict[str, str]:
        return {"type": self.category, "message": self.message}


class RateLimited(ProviderError):
    category = "rate_limited"


class Overloaded(ProviderError):
    category = "overloaded"


class ServerError(ProviderError):
    category = "server"


class Timeout(ProviderError):
    category = "timeout"


class NetworkError(ProviderError):
    category = "network"


class AuthError(ProviderError):
    category = "auth"
    transient = False


class InvalidRequest(ProviderError):
    category = "invalid_request"
    transient = False


class ContentFiltered(ProviderError):
    category = "content_filter"
    transient = False


class BadResponse(ProviderError):
    category = "bad_response"


class CircuitOpen(ProviderError):
    category = "circuit_open"


CATEGORIES: dict[str, type[ProviderError]] = {
    cls.category: cls
    for cls in (
        RateLimited,
        Overloaded,
        ServerError,
        Timeout,
        NetworkError,
        AuthError,
        InvalidRequest,
        ContentFiltered,
        BadResponse,
        CircuitOpen,
    )
}
