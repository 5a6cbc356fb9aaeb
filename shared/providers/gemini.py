"""The ``gemini`` wire format: ``POST {base_url}/v1beta/models/{model}:generateContent`` (Google AI).

Owns turning a chat into a generateContent request (``user``/``model`` contents, the system prompt
as ``systemInstruction``, limits in ``generationConfig``), reading the first candidate's text and
the usage metadata, and mapping Google's ``error.status`` values, safety blocks and ``RetryInfo``
wait hints into the taxonomy. Retries, breakers and rate limits are layered above it (``base.py``).
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

import httpx

from shared.providers import base, errors

# google.rpc.Code names say more than the HTTP status (a bad key is a 400 INVALID_ARGUMENT).
_ERROR_STATUSES: dict[str, type[errors.ProviderError]] = {
    "RESOURCE_EXHAUSTED": errors.RateLimited,
    "UNAVAILABLE": errors.Overloaded,
    "INTERNAL": errors.ServerError,
    "DEADLINE_EXCEEDED": errors.Timeout,
    "UNAUTHENTICATED": errors.AuthError,
    "PERMISSION_DENIED": errors.AuthError,
    "INVALID_ARGUMENT": errors.InvalidRequest,
    "FAILED_PRECONDITION": errors.InvalidRequest,
    "NOT_FOUND": errors.InvalidRequest,
}
# Finish reasons that mean a filter withheld the answer, not that the model finished or ran out.
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_ROLES = {"user": "user", "assistant": "model"}


class GeminiProvider(base.Provider):
    def build(self, request: base.ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        system, turns = base.system_and_turns(request.messages)
        if not turns:
            raise errors.InvalidRequest("generateContent needs at least one user or assistant message")
        body: dict[str, Any] = {
            "contents": [{"role": _ROLES[role], "parts": [{"text": text}]} for role, text in turns],
        }
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        if request.max_tokens is not None:
            config["maxOutputTokens"] = request.max_tokens
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if config:
            body["generationConfig"] = config
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["x-goog-api-key"] = self._api_key
        # The model name is a path segment: anything but a segment's own characters is escaped.
        model = quote(request.model, safe=":@")
        return f"{self.config.base_url}/v1beta/models/{model}:generateContent", headers, body

    def parse(self, body: Any) -> base.ChatResult:
        if not isinstance(body, dict):
            raise errors.BadResponse("answer is not a JSON object")
        feedback = body.get("promptFeedback")
        blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if blocked and blocked != "BLOCK_REASON_UNSPECIFIED":
            raise errors.ContentFiltered(f"the provider blocked the prompt (blockReason: {blocked})")
        candidates = body.get("candidates")
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            raise errors.BadResponse("answer has no candidates")
        candidate = candidates[0]
        reason = candidate.get("finishReason")
        if reason in _FILTERED:
            raise errors.ContentFiltered(f"the provider filtered the answer (finishReason: {reason})")
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        text = "".join(
            part["text"]
            for part in (parts if isinstance(parts, list) else ())
            # Thought summaries (only sent when asked for) are not the answer.
            if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
        )
        if not text.strip():
            raise errors.BadResponse(f"answer has no text (finishReason: {reason})")
        return base.chat_result(text, body.get("usageMetadata"), "promptTokenCount", "candidatesTokenCount")

    def map_error(self, response: httpx.Response, body: Any) -> errors.ProviderError:
        status = response.status_code
        detail = base.error_detail(body)
        code = detail.get("status") if isinstance(detail.get("status"), str) else None
        details = detail.get("details")
        details = details if isinstance(details, list) else []
        text = base.error_text(status, code, detail.get("message"))
        hint = base.retry_after_seconds(response.headers)
        if hint is None:
            hint = retry_info_delay(details)
        if any(str(reason).startswith("API_KEY_") for reason in _error_info_reasons(details)):
            # Google reports a bad, expired or blocked key as 400 INVALID_ARGUMENT or 403.
            return errors.AuthError(text, status=status)
        return base.typed_error(_ERROR_STATUSES, code, status, text, hint)


def retry_info_delay(details: list[Any]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail: its ``retryDelay`` is a protobuf Duration
    in JSON ("7s", "1.5s", "57.238747106s")."""
    for item in details:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("/google.rpc.RetryInfo"):
            return _duration_seconds(item.get("retryDelay"))
    return None


def _duration_seconds(value: Any) -> float | None:
    if not isinstance(value, str) or not value.endswith("s"):
        return None
    try:
        seconds = float(value[:-1])
    except ValueError:
        return None  # a malformed hint is ignored, never an error of ours
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _error_info_reasons(details: list[Any]) -> list[Any]:
    return [
        item.get("reason")
        for item in details
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("/google.rpc.ErrorInfo")
    ]
