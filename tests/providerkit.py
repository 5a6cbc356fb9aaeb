"""The kit of the wire-format tests (``tests/unit/test_{openai,anthropic,gemini}_provider.py``).

Each file describes its format (config, key, a default request, the body of a plain answer) as a
``WireKit`` and keeps only what is particular to it: its answer and error bodies, and the tests.
Calls go through ``httpx.MockTransport``: no network. Every provider key a kit holds is
registered with the secrets-in-logs check.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson
import pytest

from shared.providers import errors
from shared.providers.base import ChatRequest, ChatResult, Provider
from shared.providers.config import ProviderConfig
from tests.leaks import remember_secret

MESSAGES = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
)

Handler = (
    Callable[[httpx.Request], httpx.Response] | Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
)


class _Default(enum.Enum):
    KEY = "the kit's key"


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    """Answer every request with ``body`` as JSON."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return handler


def page(status: int, text: str | None = None) -> Handler:
    """Answer with a body that is not the provider's JSON (a proxy's HTML page, a cut-off body)
    or, without ``text``, with no body at all."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status) if text is None else httpx.Response(status, text=text)

    return handler


def raising(error: type[httpx.TransportError], message: str) -> Handler:
    """Fail every request in the transport, as a refused connection or a reset socket does."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise error(message, request=request)

    return handler


@dataclass(frozen=True)
class WireKit:
    provider: type[Provider]
    config: ProviderConfig
    key: str
    request: ChatRequest  # sent when a test names none
    answer: Callable[[], Any]  # the body of a plain successful answer

    def __post_init__(self) -> None:
        remember_secret(self.key)

    def call(
        self,
        handler: Handler,
        request: ChatRequest | None = None,
        *,
        key: str | Literal[_Default.KEY] | None = _Default.KEY,
        config: ProviderConfig | None = None,
    ) -> ChatResult:
        provider = self.provider(config or self.config, self.key if key is _Default.KEY else key)

        async def go() -> ChatResult:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                return await provider.complete(client, request or self.request)

        return asyncio.run(go())

    def fail(
        self, handler: Handler, request: ChatRequest | None = None, **kwargs: Any
    ) -> errors.ProviderError:
        """The taxonomy error ``handler`` provokes; the provider key is never part of it (SPEC §9)."""
        with pytest.raises(errors.ProviderError) as info:
            self.call(handler, request, **kwargs)
        exc = info.value
        for rendered in (str(exc), exc.message, repr(exc), orjson.dumps(exc.to_dict()).decode()):
            assert self.key not in rendered
        return exc

    def recorder(self) -> tuple[Handler, list[httpx.Request]]:
        """A handler that keeps each request it is sent and gives the plain answer, and its list."""
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200, json=self.answer())

        return handler, seen

    def sent(
        self, request: ChatRequest | None = None, *, key: str | Literal[_Default.KEY] | None = _Default.KEY
    ) -> list[httpx.Request]:
        """The HTTP requests one call makes."""
        handler, seen = self.recorder()
        self.call(handler, request, key=key)
        return seen

    def sent_bodies(self, request: ChatRequest | None = None) -> list[dict[str, Any]]:
        return [orjson.loads(http_request.content) for http_request in self.sent(request)]
