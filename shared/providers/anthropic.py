"""The ``anthropic`` wire format: ``POST {base_url}/v1/messages`` (the Anthropic Messages API).

Owns turning a chat into a Messages request (system prompt at the top level, strictly alternating
turns, the required ``max_tokens``), reading the text blocks and usage of an answer, and mapping
Anthropic's typed errors and rate-limit headers into the taxonomy. Retries, breakers and rate
limits are layered above it (``base.py``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx

from shared.providers import base, errors

API_VERSION = "2023-06-01"
# The Messages API refuses a request without max_tokens; council answers are a few paragraphs.
DEFAULT_MAX_TOKENS = 1024

# ``error.type`` says more than the status (a 429 may be a spend cap, a 400 a gateway's 4xx).
_ERROR_TYPES: dict[str, type[errors.ProviderError]] = {
    "invalid_request_error": errors.InvalidRequest,
    "authentication_error": errors.AuthError,
    "permission_error": errors.AuthError,
    "billing_error": errors.AuthError,
    "not_found_error": errors.InvalidRequest,
    "request_too_large": errors.InvalidRequest,
    "rate_limit_error": errors.RateLimited,
    "api_error": errors.ServerError,
    "timeout_error": errors.Timeout,
    "overloaded_error": errors.Overloaded,
}
_RATELIMIT_PREFIX = "anthropic-ratelimit-"


class AnthropicProvider(base.Provider):
    def build(self, request: base.ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        system, turns = base.system_and_turns(request.messages)
        if not turns or turns[0][0] != "user":
            # Anthropic answers this with a 400 after a round trip; it can be known here.
            raise errors.InvalidRequest("the Messages API needs a user message before any assistant one")
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
            "messages": [{"role": role, "content": text} for role, text in turns],
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return f"{self.config.base_url}/v1/messages", headers, body

    def parse(self, body: Any) -> base.ChatResult:
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, list):
            raise errors.BadResponse("answer has no content[]")
        # Checked before the text: a refusal may come with the start of an answer it cut off.
        if body.get("stop_reason") == "refusal":
            raise errors.ContentFiltered("the provider refused to answer (stop_reason: refusal)")
        text = "".join(
            block["text"]
            for block in content
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )
        if not text.strip():
            raise errors.BadResponse("answer has no text")
        return base.chat_result(text, body.get("usage"), "input_tokens", "output_tokens")

    def map_error(self, response: httpx.Response, body: Any) -> errors.ProviderError:
        status = response.status_code
        detail = base.error_detail(body)
        kind = detail.get("type") if isinstance(detail.get("type"), str) else None
        text = base.error_text(status, kind, detail.get("message"))
        hint = base.retry_after_seconds(response.headers)
        if hint is None and (status == 429 or kind == "rate_limit_error"):
            hint = ratelimit_reset_wait(response.headers, time.time())
        details = detail.get("details")
        if isinstance(details, dict) and details.get("error_code") == "enforced_spend_limit_reached":
            # A 429 "rate_limit_error" that lasts until next month's spend cap: retrying cannot help.
            return errors.AuthError(text, status=status)
        # No Anthropic error type (a Cloudflare page (413), a proxy, an empty 5xx): the status decides.
        return base.typed_error(_ERROR_TYPES, kind, status, text, hint)


def ratelimit_reset_wait(headers: httpx.Headers, now: float) -> float | None:
    """Seconds from ``now`` until Anthropic's limits reset, from ``anthropic-ratelimit-*-reset``.

    Each limit (requests, tokens, input-tokens, output-tokens) sends an RFC 3339 reset time. When
    some say ``-remaining: 0``, those refused us and all must refill, so the latest of them counts;
    otherwise the earliest reset is the first moment a retry can succeed. Never negative.
    """
    resets: dict[str, float] = {}
    for name, value in headers.items():
        if name.startswith(_RATELIMIT_PREFIX) and name.endswith("-reset"):
            at = _rfc3339_timestamp(value)
            if at is not None:
                resets[name.removesuffix("-reset")] = at
    if not resets:
        return None
    exhausted = [at for limit, at in resets.items() if headers.get(f"{limit}-remaining", "").strip() == "0"]
    at = max(exhausted) if exhausted else min(resets.values())
    return max(0.0, at - now)


def _rfc3339_timestamp(value: str) -> float | None:
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None  # a malformed hint is ignored, never an error of ours
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
