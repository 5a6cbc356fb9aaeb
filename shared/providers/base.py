"""The one small interface every wire format implements.

A provider turns a ``ChatRequest`` into one HTTP call and the answer into a ``ChatResult``,
raising only ``shared.providers.errors`` exceptions. Retries, breakers, rate limits and
accounting are layered above it (``workers/runner.py``), never copied into a wire format.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson

from shared.providers import errors
from shared.providers.config import ProviderConfig
from shared.retry_after import parse_retry_after

Message = dict[str, str]


@dataclass(frozen=True)
class ChatRequest:
    model: str  # the provider's model name (the part after the first colon of a model id)
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class ChatResult:
    text: str
    input_tokens: int
    output_tokens: int


class Provider(ABC):
    """One configured provider (a ``[providers.X]`` table) speaking one wire format."""

    def __init__(self, config: ProviderConfig, api_key: str | None):
        self.config = config
        self._api_key = api_key

    @property
    def name(self) -> str:
        return self.config.name

    @abstractmethod
    def build(self, request: ChatRequest) -> tuple[str, dict[str, str], dict[str, Any]]:
        """URL, headers and JSON body for ``request``."""

    @abstractmethod
    def parse(self, body: Any) -> ChatResult:
        """The answer from a 2xx JSON body; raises ``BadResponse``/``ContentFiltered``."""

    @abstractmethod
    def map_error(self, response: httpx.Response, body: Any) -> errors.ProviderError:
        """The taxonomy error for a non-2xx response."""

    async def complete(self, client: httpx.AsyncClient, request: ChatRequest) -> ChatResult:
        url, headers, payload = self.build(request)
        try:
            # The transport's read timeout is per socket read; this bounds the whole call.
            async with asyncio.timeout(self.config.timeout_s):
                response = await client.post(url, content=orjson.dumps(payload), headers=headers)
                content = await response.aread()
        except TimeoutError as exc:
            raise errors.Timeout(f"no answer within {self.config.timeout_s:g}s") from exc
        except httpx.TimeoutException as exc:
            if _connection_failed(exc):
                raise errors.NetworkError(f"connection failed: {type(exc.__cause__).__name__}") from exc
            raise errors.Timeout(f"timed out: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            # The message of a transport error may carry the URL but never a key (keys are headers).
            raise errors.NetworkError(f"{type(exc).__name__}: {exc}") from exc
        try:
            body: Any = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            body = None
        if not 200 <= response.status_code < 300:
            raise self._redacted(self.map_error(response, body))
        if body is None:
            raise errors.BadResponse("answer is not valid JSON", status=response.status_code)
        return self.parse(body)

    def _redacted(self, error: errors.ProviderError) -> errors.ProviderError:
        """Providers sometimes echo the rejected key in their message; it must go no further."""
        if self._api_key and self._api_key in error.message:
            error.message = error.message.replace(self._api_key, "[redacted]")
            error.args = (error.message,)
        return error


def _connection_failed(exc: httpx.TimeoutException) -> bool:
    """httpx-aiohttp maps every aiohttp connection error (refused, reset, disconnected) to
    ``httpx.ConnectTimeout``; the cause says whether time really ran out."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
        cause, aiohttp.ServerTimeoutError | TimeoutError
    )


def system_and_turns(messages: Iterable[Message]) -> tuple[str, list[tuple[str, str]]]:
    """The system prompt and the user/assistant turns, consecutive same-role messages merged:
    the Anthropic and Gemini APIs take one system text and expect the roles to alternate."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "system":
            system.append(content)
        elif role not in ("user", "assistant"):
            raise errors.InvalidRequest(f"unsupported message role {role!r}")
        elif turns and turns[-1][0] == role:
            turns[-1] = (role, join_texts((turns[-1][1], content)))
        else:
            turns.append((role, content))
    return join_texts(system), turns


def join_texts(texts: Iterable[str]) -> str:
    return "\n\n".join(text for text in texts if text)


def token_count(value: Any) -> int:
    """A usage field as a count: anything but a non-negative integer counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def chat_result(text: str, usage: Any, input_key: str, output_key: str) -> ChatResult:
    """An answer with the token counts its body's usage object gives under the provider's names
    (no usage object, or a malformed count, counts as 0)."""
    usage = usage if isinstance(usage, dict) else {}
    return ChatResult(
        text=text,
        input_tokens=token_count(usage.get(input_key)),
        output_tokens=token_count(usage.get(output_key)),
    )


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The wait hint common to every provider: ``retry-after-ms``, else ``retry-after`` (seconds, a date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))


def error_detail(body: Any) -> dict[str, Any]:
    """A JSON error body's ``error`` object, or ``{}`` when it has none (a proxy's page, an empty 5xx)."""
    detail = body.get("error") if isinstance(body, dict) else None
    return detail if isinstance(detail, dict) else {}


def error_text(status: int, code: str | None, message: Any) -> str:
    """What a mapped error says: ``HTTP 429 rate_limit_error: <the provider's message, cut at 300>``."""
    return f"HTTP {status}" + (f" {code}" if code else "") + (f": {str(message)[:300]}" if message else "")


def typed_error(
    types: Mapping[str, type[errors.ProviderError]],
    code: str | None,
    status: int,
    text: str,
    retry_after: float | None,
) -> errors.ProviderError:
    """The category a body's error ``code`` names in ``types``, else the generic status mapping
    (``status_error``); only a transient category keeps the wait hint."""
    cls = types.get(code) if code else None
    if cls is None:
        return status_error(status, text, retry_after)
    return cls(text, retry_after=retry_after if cls.transient else None, status=status)


def status_error(status: int, message: str, retry_after: float | None) -> errors.ProviderError:
    """The generic status → category mapping; wire formats refine it from their bodies."""
    if status == 429:
        return errors.RateLimited(message, retry_after=retry_after, status=status)
    if status in (503, 529):
        return errors.Overloaded(message, retry_after=retry_after, status=status)
    if status in (401, 403):
        return errors.AuthError(message, status=status)
    if status in (400, 404, 413, 422):
        return errors.InvalidRequest(message, status=status)
    if status == 408:
        return errors.Timeout(message, status=status)
    if status >= 500:
        return errors.ServerError(message, retry_after=retry_after, status=status)
    return errors.InvalidRequest(message, status=status)
