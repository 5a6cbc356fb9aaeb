"""The ``openai`` wire format: ``POST {base_url}/chat/completions`` (OpenAI and compatibles)."""

from __future__ import annotations

from typing import Any

import httpx

from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult, Provider, retry_after_seconds, status_error


def _reset_seconds(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``."""
    if not value:
        return None
    try:
        return _parse_duration(value)
    except ValueError:
        return None  # a malformed hint is ignored, never an error of ours


def _parse_duration(value: str) -> float | None:
    total, number = 0.0, ""
    i = 0
    while i < len(value):
        ch = value[i]
        if ch.isdigit() or ch == ".":
            number += ch
        elif value.startswith("ms", i):
            total += float(number or 0) / 1000
            number = ""
            i += 1
        elif ch in "hms":
            total += float(number or 0) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
        else:
            return None
        i += 1
    return total if not number else None


class OpenAIProvider(Provider):
    def build(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        body: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return f"{self.config.base_url}/chat/completions", headers, body

    def parse(self, body: Any) -> ChatResult:
        try:
            choice = body["choices"][0]
            content = choice["message"].get("content")
            usage = body.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise errors.BadResponse("answer has no choices[0].message") from exc
        if choice.get("finish_reason") == "content_filter":
            raise errors.ContentFiltered("the provider filtered the answer")
        if not isinstance(content, str) or not content.strip():
            raise errors.BadResponse("answer is empty")
        return ChatResult(
            text=content,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )

    def map_error(self, response: httpx.Response, body: Any) -> errors.ProviderError:
        status = response.status_code
        detail = body.get("error") if isinstance(body, dict) else None
        code = (detail or {}).get("code") if isinstance(detail, dict) else None
        message = (detail or {}).get("message") if isinstance(detail, dict) else None
        text = f"HTTP {status}" + (f": {str(message)[:300]}" if message else "")
        hint = retry_after_seconds(response.headers)
        if hint is None and status == 429:
            resets = [
                _reset_seconds(response.headers.get(h))
                for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
            ]
            known = [r for r in resets if r is not None]
            hint = max(known) if known else None
        if code == "content_filter":
            return errors.ContentFiltered(text, status=status)
        if code == "insufficient_quota":
            # OpenAI sends 429 for an empty wallet: retrying cannot help.
            return errors.AuthError(text, status=status)
        return status_error(status, text, hint)
